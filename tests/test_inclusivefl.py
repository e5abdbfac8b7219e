"""InclusiveFL (METHOD §6): momentum distillation, the FedAdam step, the per-tier global state,
payload/aggregate naming and the exit evaluator, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reefl.config import ConfigError, RunConfig
from reefl.federation.aggregate import AdamHyperParams, FedAdam, fedadam_step
from reefl.methods import ClientUpdate, TaskSpec, build_method
from reefl.methods.inclusivefl import InclusiveFL, momentum_distillation
from reefl.training import train_locally

TASK = TaskSpec(num_classes=5, in_chans=1)
# 4 blocks, 2 exits after blocks 1 and 3: the server holds shared blocks 0, 1, 2, tier 0's
# copy of block 1 and tier 1's copy of block 3 (plus one head per tier).
TWO_TIERS = {"method": "inclusivefl", "img-size": 8, "patch-size": 4, "embed-dim": 16,
             "depth": 4, "num-heads": 2, "num-exits": 2, "mlp-ratio": 2.0}


def _method(**overrides: object) -> InclusiveFL:
    return build_method(RunConfig.from_flat({**TWO_TIERS, **overrides}), TASK)


def _global_state(method: InclusiveFL) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach() for k, v in method.build_global_model().state_dict().items()}


def _scalar(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(value, dtype=torch.float64)}


# -- momentum distillation ------------------------------------------------------------------
def test_momentum_distillation_three_tiers_deepest_first() -> None:
    mixed = momentum_distillation([_scalar(1.0), _scalar(5.0), _scalar(10.0)], beta=0.2)
    # m2 = g2 = 10;  m1 = 0.2·10 + 0.8·5 = 6;  m0 = 0.2·6 + 0.8·1 = 2
    assert [m["w"].item() for m in mixed] == pytest.approx([2.0, 6.0, 10.0])


def test_a_tier_without_clients_is_not_updated_and_passes_the_deeper_update_on() -> None:
    mixed = momentum_distillation([_scalar(1.0), {}, _scalar(10.0)], beta=0.2)
    # tier 1 returned nothing: no update for it; m0 = 0.2·10 + 0.8·1 = 2.8
    assert mixed[1] == {}
    assert mixed[0]["w"].item() == pytest.approx(2.8)
    mixed = momentum_distillation([_scalar(1.0), _scalar(5.0), {}], beta=0.2)
    # nothing deeper than tier 1: m1 = g1 = 5;  m0 = 0.2·5 + 0.8·1 = 1.8
    assert [m.get("w", torch.tensor(float("nan"))).item() for m in mixed[:2]] == \
        pytest.approx([1.8, 5.0])
    assert mixed[2] == {}


# -- FedAdam --------------------------------------------------------------------------------
def test_fedadam_defaults_are_method_s() -> None:
    assert AdamHyperParams() == AdamHyperParams(lr=1e-3, beta1=0.9, beta2=0.999, tau=1e-6)


def test_fedadam_step_two_rounds_by_hand() -> None:
    hp = AdamHyperParams(lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)
    w, m, v = (torch.tensor(x, dtype=torch.float64) for x in (1.0, 0.0, 0.0))
    w, m, v = fedadam_step(w, torch.tensor(2.0, dtype=torch.float64), m, v, hp)
    # m = 0.5·2 = 1;  v = 0.25·4 = 1;  w = 1 + 0.1·1/(1 + 0.5) = 1.0666667
    assert (m.item(), v.item(), w.item()) == pytest.approx((1.0, 1.0, 1.0 + 0.1 / 1.5))
    w, m, v = fedadam_step(w, torch.tensor(-2.0, dtype=torch.float64), m, v, hp)
    # m = 0.5·1 + 0.5·(−2) = −0.5;  v = 0.75·1 + 0.25·4 = 1.75;
    # w = 1.0666667 + 0.1·(−0.5)/(√1.75 + 0.5) = 1.0666667 − 0.0274292 = 1.0392375
    assert (m.item(), v.item(), w.item()) == pytest.approx((-0.5, 1.75, 1.0392374781))


def test_fedadam_keeps_moments_per_parameter_and_skips_parameters_without_update() -> None:
    adam = FedAdam(AdamHyperParams(lr=0.1, beta1=0.5, beta2=0.75, tau=0.5))
    state = {"a": torch.tensor([1.0]), "b": torch.tensor([3.0])}
    stepped = adam.step(state, {"a": torch.tensor([2.0])})
    torch.testing.assert_close(stepped["a"], torch.tensor([1.0 + 0.1 / 1.5]))
    assert stepped["b"] is state["b"] and set(adam.moments) == {"a"}
    adam.step(stepped, {"a": torch.tensor([-2.0])})
    torch.testing.assert_close(adam.moments["a"][1], torch.tensor([1.75]))


# -- global state, payload, aggregation -----------------------------------------------------
def test_global_state_keeps_a_top_block_and_head_per_tier() -> None:
    state = _global_state(_method())
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.blocks.")}
    assert blocks == {"0", "1", "2"}  # block 3 exists only as tier 1's copy
    assert {k.split(".")[1] for k in state if k.startswith("tiers.")} == {"0", "1"}
    assert "tiers.0.exits.heads.0.fc.weight" in state
    # copies start equal to the shared block they duplicate (as from a pretrained checkpoint)
    torch.testing.assert_close(state["tiers.0.block.attn.q.weight"],
                               state["backbone.blocks.1.attn.q.weight"], rtol=0, atol=0)


def test_payload_maps_the_tier_s_own_copies_to_its_model_s_names() -> None:
    method = _method()
    state = _global_state(method)
    payload = method.client_payload(state, 0)
    assert set(payload) == set(method.build_model(0).state_dict())
    pairs = [(0, "backbone.blocks.1.mlp.fc1.weight", "tiers.0.block.mlp.fc1.weight"),
             (0, "exits.heads.0.fc.bias", "tiers.0.exits.heads.0.fc.bias"),
             (0, "backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.weight"),
             (1, "backbone.blocks.1.attn.q.bias", "backbone.blocks.1.attn.q.bias"),
             (1, "backbone.blocks.3.attn.q.bias", "tiers.1.block.attn.q.bias")]
    for tier, name, global_name in pairs:
        assert torch.equal(method.client_payload(state, tier)[name], state[global_name])


def _shifted(method: InclusiveFL, state: dict[str, torch.Tensor], pid: int, tier: int,
             shift: float, examples: int) -> ClientUpdate:
    """A client of ``tier`` that returns what it was sent plus ``shift`` everywhere."""
    sent = method.client_payload(state, tier)
    return ClientUpdate(pid, tier, {k: v + shift for k, v in sent.items()}, examples)


@pytest.mark.parametrize("server_update", ["fedavg", "fedadam"])
def test_clients_returning_what_they_were_sent_leave_the_state_unchanged(
        server_update: str) -> None:
    method = _method(**{"server-update": server_update})
    state = _global_state(method)
    updates = [_shifted(method, state, pid, tier, 0.0, 7)
               for pid, tier in [(0, 0), (1, 1), (2, 0)]]
    merged = method.aggregate(state, updates)
    assert merged.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0)


def test_aggregate_two_tiers_by_hand() -> None:
    method = _method()
    state = _global_state(method)
    updates = [_shifted(method, state, 0, 0, 1.0, 10), _shifted(method, state, 1, 0, 3.0, 30),
               _shifted(method, state, 2, 1, 6.0, 60)]
    merged = method.aggregate(state, updates)
    expected_shift = {
        # held by both tiers: (10·1 + 30·3 + 60·6) / 100 = 4.6
        "backbone.pos_embed": 4.6, "backbone.blocks.0.attn.v.weight": 4.6,
        # the shared copy of block 1 is held by tier 1 only (tier 0 trains its own copy)
        "backbone.blocks.1.attn.v.weight": 6.0, "backbone.blocks.2.mlp.fc2.bias": 6.0,
        # tier 0's copy: g0 = (10·1 + 30·3)/40 = 2.5, mixed: 0.2·6 + 0.8·2.5 = 3.2
        "tiers.0.block.norm2.weight": 3.2,
        # heads are averaged within their tier, not mixed
        "tiers.0.exits.heads.0.fc.weight": 2.5, "tiers.1.exits.heads.0.norm.bias": 6.0,
        # the deepest tier's copy: its own mean
        "tiers.1.block.attn.proj.weight": 6.0,
    }
    for key, shift in expected_shift.items():
        torch.testing.assert_close(merged[key], state[key] + shift, atol=1e-5, rtol=0)


def test_a_missing_tier_keeps_its_copies() -> None:
    method = _method()
    state = _global_state(method)
    merged = method.aggregate(state, [_shifted(method, state, 1, 1, 6.0, 60)])
    torch.testing.assert_close(merged["tiers.0.block.norm1.bias"],
                               state["tiers.0.block.norm1.bias"], rtol=0, atol=0)
    torch.testing.assert_close(merged["tiers.1.block.norm1.bias"],
                               state["tiers.1.block.norm1.bias"] + 6.0, atol=1e-5, rtol=0)


# -- evaluation -----------------------------------------------------------------------------
def test_exit_k_is_tier_k_s_own_sub_model() -> None:
    method = _method(**{"num-exits": 4})
    torch.manual_seed(0)
    # random values everywhere, so each tier's copy differs from the shared block it mirrors
    state = {k: torch.randn_like(v) * 0.5 for k, v in _global_state(method).items()}
    evaluator = method.exit_evaluator(state).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    exits = evaluator(x)
    assert len(exits) == 4
    for tier in range(4):
        model = method.build_model(tier).eval()
        model.load_state_dict(method.client_payload(state, tier), strict=True)
        (logits,) = model(x)
        torch.testing.assert_close(exits[tier], logits, rtol=0, atol=0)


def test_loss_is_the_ce_of_the_tier_s_only_exit() -> None:
    logits = [torch.tensor([[0.0, 0.0]])]
    loss, values = _method().local_loss(logits, torch.tensor([1]), 1, None)
    assert loss.item() == pytest.approx(0.6931472) and values == pytest.approx([0.6931472])


# -- config ---------------------------------------------------------------------------------
def test_server_update_and_beta_are_checked() -> None:
    assert _method(**{"server-update": "fedadam"}).cfg.server_update == "fedadam"
    with pytest.raises(ConfigError, match="server-update"):
        RunConfig.from_flat({"method": "inclusivefl", "server-update": "feddyn"})
    with pytest.raises(ConfigError, match="inclusivefl-beta"):
        RunConfig.from_flat({**TWO_TIERS, "inclusivefl-beta": 1.5})


def test_training_metrics_name_the_tier_s_own_exit() -> None:
    method = _method(**{"local-epochs": 1})
    data = TensorDataset(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    metrics = train_locally(method.build_model(1), DataLoader(data, batch_size=2), method,
                            method.cfg, 1e-3, 1, torch.device("cpu"),
                            exit_ids=method.exit_ids(1))
    assert method.exit_ids(1) == [1]
    assert set(metrics) == {"train-loss", "train-ce-exit1", "train-seconds",
                            "train-data-seconds"}
    assert 0 <= metrics["train-data-seconds"] <= metrics["train-seconds"]
    assert metrics["train-ce-exit1"] == pytest.approx(metrics["train-loss"])


def test_fedadam_server_update_steps_what_was_returned_with_fedadam_lr() -> None:
    method = _method(**{"server-update": "fedadam", "fedadam-lr": 0.5})
    state = _global_state(method)
    merged = method.aggregate(state, [_shifted(method, state, 1, 1, 1.0, 60)])
    # first FedAdam step with Δ = 1: m = 0.1, v = 0.001, w += 0.5·0.1/(√0.001 + 1e-6) = 1.58109
    for key in ("backbone.cls_token", "backbone.blocks.1.norm1.weight",
                "tiers.1.block.attn.q.bias"):
        torch.testing.assert_close(merged[key], state[key] + 1.58109, atol=1e-4, rtol=0)
    assert merged["tiers.0.block.attn.q.bias"] is state["tiers.0.block.attn.q.bias"]
