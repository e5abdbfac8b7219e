"""InclusiveFL (docs/method.md §6): momentum distillation, the FedAdam step, the per-tier global
state, payload/aggregate naming and the exit evaluator, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reefl.config import ConfigError, RunConfig
from reefl.methods import ClientUpdate, TaskSpec, build_method
from reefl.methods.aggregate import AdamHyperParams, FedAdam, fedadam_step
from reefl.methods.inclusivefl import InclusiveFL, block_mean, momentum_distillation
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
def test_momentum_distillation_mixes_the_deeper_tier_s_momentum_in() -> None:
    mixed = momentum_distillation({"w": torch.tensor(5.0), "b": torch.tensor(1.0)},
                                  {"w": torch.tensor(10.0)}, beta=0.2)
    # w: 0.2·10 + 0.8·5 = 6;  b has no momentum (zero): 0.8·1 = 0.8
    assert mixed["w"].item() == pytest.approx(6.0) and mixed["b"].item() == pytest.approx(0.8)
    assert momentum_distillation({"w": torch.tensor(5.0)}, {}, beta=0.2)["w"].item() == \
        pytest.approx(4.0)


def test_block_mean_is_element_wise_over_blocks() -> None:
    mean = block_mean([{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)},
                       {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(8.0)},
                       {"w": torch.tensor([5.0, 1.0]), "b": torch.tensor(0.0)}])
    # w: [(1 + 3 + 5)/3, (2 + 6 + 1)/3] = [3, 3];  b: (4 + 8 + 0)/3 = 4
    torch.testing.assert_close(mean["w"], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(mean["b"], torch.tensor(4.0))


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
        # held by both tiers: tier means 2.5 = (10·1 + 30·3)/40 and 6, weighted by number of
        # clients (2 and 1), not examples: (2·2.5 + 1·6)/3 = 11/3
        "backbone.pos_embed": 11 / 3, "backbone.blocks.0.attn.v.weight": 11 / 3,
        # the shared copy of block 1 is held by tier 1 only (tier 0 trains its own copy)
        "backbone.blocks.1.attn.v.weight": 6.0, "backbone.blocks.2.mlp.fc2.bias": 6.0,
        # tier 0's copy: g0 = 2.5, mixed with tier 1's momentum of the previous round, zero
        # in round 1: 0.2·0 + 0.8·2.5 = 2
        "tiers.0.block.norm2.weight": 2.0,
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


# -- the server update on a toy: one scalar "w" per block, two and three rounds -------------
def _toy_state(method: InclusiveFL) -> dict[str, torch.Tensor]:
    """A zero global state with one scalar per block (shared blocks below the deepest exit,
    one copy of block e_t per tier), a shared ``cls_token`` and one head scalar per tier."""
    zero = torch.tensor(0.0, dtype=torch.float64)
    state = {"backbone.cls_token": zero}
    state.update({f"backbone.blocks.{b}.w": zero for b in range(method.exit_blocks[-1])})
    for tier in range(method.num_exits):
        state.update({f"tiers.{tier}.block.w": zero, f"tiers.{tier}.exits.heads.0.w": zero})
    return state


def _toy_client(method: InclusiveFL, state: dict[str, torch.Tensor], tier: int,
                examples: int, shift: float, **block_shifts: float) -> ClientUpdate:
    """A tier-``tier`` client returning what it was sent (its model's names: blocks
    0..e_t, one head) plus ``shift``, or ``block_shifts["b<i>"]`` for block i."""
    names = (["backbone.cls_token"] + [f"backbone.blocks.{b}.w"
                                       for b in range(method.exit_blocks[tier] + 1)]
             + ["exits.heads.0.w"])
    shifts = {f"backbone.blocks.{b[1:]}.w": v for b, v in block_shifts.items()}
    return ClientUpdate(0, tier, {n: state[method.global_name(n, tier)] + shifts.get(n, shift)
                                  for n in names}, examples)


def _assert_toy(state: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert {k: v.item() for k, v in state.items()} == pytest.approx(expected, abs=1e-9)


def test_fedavg_three_tiers_two_rounds_with_last_round_s_momentum_by_hand() -> None:
    method = _method(**{"depth": 6, "num-exits": 3})  # exits after blocks 1, 3, 5
    state = _toy_state(method)
    round1 = [_toy_client(method, state, 0, 10, 1.0), _toy_client(method, state, 0, 30, 3.0),
              _toy_client(method, state, 1, 20, 4.0, b2=2.0, b3=6.0),
              _toy_client(method, state, 2, 50, 8.0, b4=10.0, b5=20.0)]
    state = method.aggregate(state, round1)
    _assert_toy(state, {
        # g0 = (10·1 + 30·3)/40 = 2.5; g1 = the client's; g2 = the client's
        # shared by all three tiers, tier means weighted by clients (2, 1, 1): (5 + 4 + 8)/4
        "backbone.cls_token": 4.25, "backbone.blocks.0.w": 4.25,
        "backbone.blocks.1.w": 6.0,   # tiers 1 and 2 (tier 0 has its own copy): (4 + 8)/2
        "backbone.blocks.2.w": 5.0,   # tiers 1 and 2: (2 + 8)/2
        "backbone.blocks.3.w": 8.0, "backbone.blocks.4.w": 10.0,  # tier 2 alone
        # top blocks: no momentum yet (round 1), so 0.8·g: 0.8·2.5 and 0.8·6; the deepest
        # tier's is not mixed
        "tiers.0.block.w": 2.0, "tiers.1.block.w": 4.8, "tiers.2.block.w": 20.0,
        "tiers.0.exits.heads.0.w": 2.5, "tiers.1.exits.heads.0.w": 4.0,
        "tiers.2.exits.heads.0.w": 8.0})
    # momentum left for round 2: m̄1 = mean over blocks 2, 3 of g1 (block 3 mixed):
    # (2 + 4.8)/2 = 3.4;  m̄2 = mean over blocks 4, 5 of g2: (10 + 20)/2 = 15
    round2 = [_toy_client(method, state, 0, 5, 1.0),
              _toy_client(method, state, 1, 7, 2.0, b2=-1.0, b3=3.0)]  # tier 2 absent
    state = method.aggregate(state, round2)
    _assert_toy(state, {
        "backbone.cls_token": 5.75, "backbone.blocks.0.w": 5.75,  # (4.25+1 + 4.25+2)/2
        "backbone.blocks.1.w": 8.0, "backbone.blocks.2.w": 4.0,  # tier 1 alone: 6+2, 5−1
        "backbone.blocks.3.w": 8.0, "backbone.blocks.4.w": 10.0,  # nobody: unchanged
        "tiers.0.block.w": 3.48,   # 2 + (0.2·3.4 + 0.8·1)
        "tiers.1.block.w": 10.2,   # 4.8 + (0.2·15 + 0.8·3): tier 2's momentum of round 1
        "tiers.2.block.w": 20.0,
        "tiers.0.exits.heads.0.w": 3.5, "tiers.1.exits.heads.0.w": 6.0,
        "tiers.2.exits.heads.0.w": 8.0})
    # tier 2 had no clients in round 2: no momentum reaches tier 1 in round 3
    state = method.aggregate(state, [_toy_client(method, state, 1, 7, 0.0, b3=1.0)])
    assert state["tiers.1.block.w"].item() == pytest.approx(10.2 + 0.8 * 1.0, abs=1e-9)


def test_beta_zero_is_plain_per_tier_averaging_by_hand() -> None:
    method = _method(**{"depth": 6, "num-exits": 3, "inclusivefl-beta": 0.0})
    state = _toy_state(method)
    for shifts in ([(0, 10, 1.0), (0, 30, 3.0), (1, 20, 6.0)], [(0, 5, 1.0), (1, 7, 3.0)]):
        state = method.aggregate(state, [_toy_client(method, state, t, n, s)
                                         for t, n, s in shifts])
    _assert_toy(state, {
        # round 1: tier means 2.5 and 6; shared by both (2 and 1 clients): 11/3;
        # round 2: 11/3 + (1 + 3)/2
        "backbone.cls_token": 11 / 3 + 2, "backbone.blocks.0.w": 11 / 3 + 2,
        "backbone.blocks.1.w": 9.0, "backbone.blocks.2.w": 9.0,  # tier 1 alone: 6 + 3
        "backbone.blocks.3.w": 0.0, "backbone.blocks.4.w": 0.0,
        "tiers.0.block.w": 3.5, "tiers.1.block.w": 9.0,  # 2.5 + 1 and 6 + 3: nothing mixed
        "tiers.2.block.w": 0.0,
        "tiers.0.exits.heads.0.w": 3.5, "tiers.1.exits.heads.0.w": 9.0,
        "tiers.2.exits.heads.0.w": 0.0})


def test_beta_zero_takes_the_tier_means_exactly() -> None:
    """With β = 0 (FedAvg) the tiers' own parameters are their tier's example-weighted mean,
    bit for bit, and a shared one the client-weighted mean of the tier means."""
    method = _method(**{"inclusivefl-beta": 0.0})
    state = _global_state(method)
    noise = torch.Generator().manual_seed(2)
    updates = [ClientUpdate(pid, tier, {k: v + torch.randn(v.shape, generator=noise)
                                        for k, v in method.client_payload(state, tier).items()},
                            examples)
               for pid, tier, examples in [(0, 0, 10), (1, 0, 30), (2, 1, 60)]]
    merged = method.aggregate(state, updates)
    tier0 = {method.global_name(k, 0): (updates[0].state[k].double() * 0.25  # in float64
                                        + updates[1].state[k].double() * 0.75).float()
             for k in updates[0].state}
    tier1 = {method.global_name(k, 1): v for k, v in updates[2].state.items()}
    for key, value in merged.items():
        if key.startswith("tiers.0."):
            expected = tier0[key]
        elif key.startswith("tiers.1.") or key not in tier0:
            expected = tier1[key]
        else:  # (2·tier-0 mean + 1·tier-1 mean)/3, in float64
            expected = ((2 * tier0[key].double() + tier1[key].double()) / 3).float()
        assert torch.equal(value, expected), key


def test_fedadam_one_state_per_tier_two_rounds_by_hand() -> None:
    method = _method(**{"server-update": "fedadam", "fedadam-lr": 1.0})  # exits 1, 3
    state = _toy_state(method)
    round1 = [_toy_client(method, state, 0, 10, 1.0), _toy_client(method, state, 0, 30, 3.0),
              _toy_client(method, state, 1, 60, 6.0, b2=4.0, b3=8.0)]
    state = method.aggregate(state, round1)
    # First step of a fresh Adam state along g: m = 0.1·g, v = 0.001·g², w = 0.1·g/(√v + 1e-6)
    # = f(g): f(2.5) = 3.1622376607, f(2) = 3.1622276610, f(6) = 3.1622609936.
    # Tier 0: g0 = 2.5 (top block mixed with zero momentum: 0.8·2.5 = 2); tier 1: g1 = 6
    # (block 2: 4, block 3: 8). Shared: (2·f(2.5) + 1·f(6))/3 = 3.1622454383
    # (one Adam step on the merged update, example-weighted 4.6, would give 3.1622559).
    _assert_toy({k: state[k] for k in ("backbone.cls_token", "tiers.0.block.w",
                                       "tiers.0.exits.heads.0.w")},
                {"backbone.cls_token": 3.1622454383, "tiers.0.block.w": 3.1622276610,
                 "tiers.0.exits.heads.0.w": 3.1622376607})
    # momentum for round 2: m̄1 = mean of g1 over blocks 2, 3 = (4 + 8)/2 = 6
    round2 = [_toy_client(method, state, 0, 5, -1.0), _toy_client(method, state, 1, 7, 2.0)]
    state = method.aggregate(state, round2)
    # tier 0, g = −1, its own moments: m = 0.9·0.25 − 0.1 = 0.125,
    #   v = 0.999·0.00625 + 0.001 = 0.00724375, step 0.125/(√v + 1e-6) = 1.4686664826
    # tier 1, g = 2: m = 0.9·0.6 + 0.2 = 0.74, v = 0.999·0.036 + 0.004 = 0.039964,
    #   step 0.74/(√v + 1e-6) = 3.7016476081
    # shared: ((3.1622454383 + 1.4686664826) + (3.1622454383 + 3.7016476081))/2
    # tier 0's top block, g = 0.2·6 + 0.8·(−1) = 0.4: m = 0.9·0.2 + 0.04 = 0.22,
    #   v = 0.999·0.004 + 0.00016 = 0.004156: 3.1622276610 + 0.22/(√v + 1e-6)
    _assert_toy({k: state[k] for k in ("backbone.cls_token", "tiers.0.block.w",
                                       "tiers.0.exits.heads.0.w", "backbone.blocks.1.w")},
                {"backbone.cls_token": 5.7474024837, "tiers.0.block.w": 6.5747709933,
                 "tiers.0.exits.heads.0.w": 4.6309041432,
                 "backbone.blocks.1.w": 3.1622609936 + 3.7016476081})  # tier 1 alone


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
