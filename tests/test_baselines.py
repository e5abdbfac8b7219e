"""DepthFL (mutual KL, FedDyn), ExclusiveFL (sampling from the deepest tier) and the per-exit heads
(docs/method.md §6) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from reefl.config import ConfigError, RunConfig
from reefl.federation.replies import RoundRecord
from reefl.federation.strategy import (
    ClientInfo,
    Roster,
    TieredStrategy,
    round_participants,
    sample_clients,
)
from reefl.methods import ClientUpdate, Method, TaskSpec, build_method
from reefl.methods.depthfl import feddyn_client_state, feddyn_penalty, feddyn_server_step
from reefl.models import EarlyExitModel, PerExitHeads, VisionTransformer

LN3 = math.log(3.0)
# Three exits, one example, two classes, label 0:
#   exit 0 [0, 0]    -> p0 = [0.5, 0.5],   CE0 = ln 2     = 0.693147
#   exit 1 [ln 3, 0] -> p1 = [0.75, 0.25], CE1 = −ln 0.75 = 0.287682
#   exit 2 [0, ln 3] -> p2 = [0.25, 0.75], CE2 = ln 4     = 1.386294
#   KL(p1‖p0) = KL(p2‖p0) = 0.75·ln 1.5 + 0.25·ln 0.5       = 0.130812
#   KL(p0‖p1) = KL(p0‖p2) = 0.5·ln(0.5/0.75) + 0.5·ln 2     = 0.143841
#   KL(p1‖p2) = KL(p2‖p1) = 0.75·ln 3 + 0.25·ln(1/3) = ½ ln 3 = 0.549306
#   Σ_k Σ_{j≠k} KL(p_j‖p_k) = 2·(0.130812 + 0.143841 + 0.549306) = 1.647918; / t (t = 2) = 0.823959
LOGITS = [torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, LN3]])]
LABELS = torch.tensor([0])
CE = [0.693147, 0.287682, 1.386294]
TASK = TaskSpec(num_classes=2, in_chans=1)


def _method(**overrides):
    cfg = RunConfig.from_flat({"method": "depthfl", "depth": 3, "num-exits": 3,
                               "embed-dim": 16, "num-heads": 2, **overrides})
    return build_method(cfg, TASK)


# -- DepthFL's loss -------------------------------------------------------------------------
def test_depthfl_loss_is_ce_plus_mutual_kl_over_t() -> None:
    method = _method()
    loss, ces = method.local_loss(LOGITS, LABELS, 300, method.new_loss_state())
    assert ces == pytest.approx(CE, abs=1e-6)
    assert loss.item() == pytest.approx(sum(CE) + 0.823959, abs=1e-5)  # λ(300) = 1
    loss, _ = method.local_loss(LOGITS, LABELS, 150, None)  # λ(150) = e^−1.25
    assert loss.item() == pytest.approx(sum(CE) + math.exp(-1.25) * 0.823959, abs=1e-5)
    # two exits: t = 1, KL(p1‖p0) + KL(p0‖p1) = 0.274653
    loss, _ = method.local_loss(LOGITS[:2], LABELS, 300, None)
    assert loss.item() == pytest.approx(CE[0] + CE[1] + 0.274653, abs=1e-5)
    loss, _ = method.local_loss(LOGITS[:1], LABELS, 300, None)  # one exit: no KL
    assert loss.item() == pytest.approx(CE[0], abs=1e-6)


def test_depthfl_teachers_are_detached() -> None:
    # d loss / d z_k = (p_k − y) + (1/t)·Σ_{j≠k} (p_k − p_j) when only the student gets
    # gradient. Exit 1: [−0.25, 0.25] + ½·(2·[0.75, 0.25] − [0.5, 0.5] − [0.25, 0.75])
    #                 = [−0.25, 0.25] + [0.375, −0.375] = [0.125, −0.125]
    # Exit 0: [−0.5, 0.5] + ½·(2·[0.5, 0.5] − [0.75, 0.25] − [0.25, 0.75]) = [−0.5, 0.5]
    logits = [z.clone().requires_grad_() for z in LOGITS]
    loss, _ = _method().local_loss(logits, LABELS, 300, None)
    loss.backward()
    torch.testing.assert_close(logits[1].grad, torch.tensor([[0.125, -0.125]]))
    torch.testing.assert_close(logits[0].grad, torch.tensor([[-0.5, 0.5]]))


# -- FedDyn ------------------------------------------------------------------------------------
def test_feddyn_client_penalty_and_state_update() -> None:
    # w = [1, 2], w_server = [0, 1], g = [0.5, −1], α = 0.1:
    #   penalty = 0.05·(1² + 1²) − (0.5·1 − 1·2) = 0.1 + 1.5 = 1.6
    #   d/dw = −g + α·(w − w_server) = [−0.4, 1.1];  next g = g − α·(w − w_server) = [0.4, −1.1]
    w = {"a": torch.tensor([1.0, 2.0], requires_grad=True)}
    sent, g = {"a": torch.tensor([0.0, 1.0])}, {"a": torch.tensor([0.5, -1.0])}
    penalty = feddyn_penalty(w, sent, g, 0.1)
    penalty.backward()
    assert penalty.item() == pytest.approx(1.6)
    torch.testing.assert_close(w["a"].grad, torch.tensor([-0.4, 1.1]))
    torch.testing.assert_close(feddyn_client_state(w, sent, g, 0.1)["a"], torch.tensor([0.4, -1.1]))
    # first round (no g yet): penalty 0.1, next g = −α·(w − w_server) = [−0.1, −0.1]
    assert feddyn_penalty(w, sent, {}, 0.1).item() == pytest.approx(0.1)
    torch.testing.assert_close(feddyn_client_state(w, sent, {}, 0.1)["a"],
                               torch.tensor([-0.1, -0.1]))


def test_feddyn_server_step_by_hand() -> None:
    # α = 0.1, N = 4. "a" returned by 2 clients with mean [3, 1]; "b" by 1 with value 7.
    #   h_a = −0.1·(2/4)·([3, 1] − [1, 2]) = [−0.1, 0.05];  w_a = [3, 1] − h_a/0.1 = [4, 0.5]
    #   h_b = −0.1·(1/4)·(7 − 5) = −0.05;                   w_b = 7 + 0.5 = 7.5
    # "c" returned by nobody keeps its value and gets no h.
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0]), "c": torch.tensor([9.0])}
    mean = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([7.0]), "c": torch.tensor([9.0])}
    state, h = feddyn_server_step(w, mean, {"a": 2, "b": 1}, {}, 0.1, 4)
    torch.testing.assert_close(h["a"], torch.tensor([-0.1, 0.05]))
    torch.testing.assert_close(h["b"], torch.tensor([-0.05]))
    torch.testing.assert_close(state["a"], torch.tensor([4.0, 0.5]))
    torch.testing.assert_close(state["b"], torch.tensor([7.5]))
    assert state["c"].item() == 9.0 and "c" not in h
    # next round, "a" from one client at [4, 1]: h_a = [−0.1, 0.05] − 0.025·([4, 1] − [4, 0.5])
    #   = [−0.1, 0.0375];  w_a = [4, 1] − [−1, 0.375] = [5, 0.625]
    state, h = feddyn_server_step(state, {"a": torch.tensor([4.0, 1.0])}, {"a": 1}, h, 0.1, 4)
    torch.testing.assert_close(h["a"], torch.tensor([-0.1, 0.0375]))
    torch.testing.assert_close(state["a"], torch.tensor([5.0, 0.625]))
    torch.testing.assert_close(state["b"], torch.tensor([7.5]))


def test_depthfl_feddyn_aggregate_uses_plain_mean_and_keeps_h_equal_to_mean_client_g() -> None:
    method = _method(**{"server-update": "feddyn", "num-clients": 4, "feddyn-alpha": 0.1})
    w = {"shared": torch.tensor([0.0, 0.0]), "deep": torch.tensor([1.0])}
    # client 0 (tier 0) holds "shared"; client 1 (deeper) holds both; 10 vs 90 examples:
    # the plain mean of "shared" is [2, 1], whatever the example counts.
    trained = [{"shared": torch.tensor([1.0, 2.0])},
               {"shared": torch.tensor([3.0, 0.0]), "deep": torch.tensor([3.0])}]
    updates = [ClientUpdate(i, i, s, n) for i, (s, n) in enumerate(zip(trained, [10, 90],
                                                                        strict=True))]
    state = method.aggregate(w, updates)
    # h_shared = −0.1·(2/4)·[2, 1] = [−0.1, −0.05] -> w = [2, 1] + [1, 0.5] = [3, 1.5]
    # h_deep = −0.1·(1/4)·2 = −0.05 -> w = 3 + 0.5 = 3.5
    torch.testing.assert_close(state["shared"], torch.tensor([3.0, 1.5]))
    torch.testing.assert_close(state["deep"], torch.tensor([3.5]))
    # FedDyn's invariant, per parameter: h = (1/N)·Σ over all N clients of g_i
    # (the two idle clients have g = 0, client 0 has no g for "deep")
    gs = [feddyn_client_state(s, w, {}, 0.1) for s in trained]
    for name in w:
        total = sum(g[name] for g in gs if name in g)
        torch.testing.assert_close(method.server_h[name], total / 4)


def test_depthfl_fedavg_adds_no_penalty_and_keeps_no_state() -> None:
    method = _method()
    w = {"a": torch.ones(2)}
    assert method.local_penalty(w, w, {}) is None
    assert method.finish_local(w, w, {}) == {}


def test_server_update_is_validated_per_method() -> None:
    assert _method(**{"server-update": "feddyn"}).cfg.server_update == "feddyn"
    for method in ("reefl", "exclusivefl"):
        with pytest.raises(ConfigError) as error:
            RunConfig.from_flat({"method": method, "server-update": "feddyn"})
        message = str(error.value)
        assert "server-update" in message and method in message and "\n" not in message
    with pytest.raises(ConfigError, match="feddyn-alpha"):
        RunConfig.from_flat({"method": "depthfl", "feddyn-alpha": 0.0})
    RunConfig.from_flat({"method": "reefl", "feddyn-alpha": 0.0})  # DepthFL's key, unused


# -- ExclusiveFL --------------------------------------------------------------------------------
def _sampling(num_clients: int, fraction: float, method: str = "reefl"
              ) -> tuple[RunConfig, Method]:
    flat = {"num-clients": num_clients, "num-exits": 4, "fraction-train": fraction, "seed": 0,
            "method": method}
    cfg = RunConfig.from_flat(flat)
    return cfg, build_method(cfg, TASK)


def test_other_methods_draw_exactly_as_before() -> None:
    """Every tier takes part: the same ids as before ExclusiveFL drew from its own tier
    (pinned from the earlier code: seed 0)."""
    for num_clients, fraction, server_round, ids in [
            (20, 0.5, 1, [1, 3, 4, 5, 7, 10, 12, 15, 16, 17]),
            (100, 0.1, 3, [29, 30, 31, 45, 56, 66, 80, 82, 88, 97])]:
        cfg, reefl = _sampling(num_clients, fraction)
        tiers = {pid: pid % 4 for pid in range(num_clients)}
        assert sample_clients(cfg, server_round, list(tiers)) == ids
        assert round_participants(cfg, server_round, tiers, reefl.takes_part) == ids


def test_exclusivefl_draws_the_quota_from_the_deepest_tier_alone() -> None:
    # 20 clients, K = 4 round-robin: 5 of tier 3 (3, 7, 11, 15, 19); quota round(0.5·20) =
    # 10 > 5, so all five train every round
    cfg, exclusive = _sampling(20, 0.5, "exclusivefl")
    tiers = {pid: pid % 4 for pid in range(20)}
    for server_round in range(1, 6):
        assert round_participants(cfg, server_round, tiers, exclusive.takes_part) == [
            3, 7, 11, 15, 19]
    # 100 clients: 25 of tier 3; quota round(0.1·100) = 10, all of them from tier 3
    cfg, exclusive = _sampling(100, 0.1, "exclusivefl")
    tiers = {pid: pid % 4 for pid in range(100)}
    draws = [round_participants(cfg, r, tiers, exclusive.takes_part) for r in range(1, 4)]
    for drawn in draws:
        assert len(drawn) == 10 and len(set(drawn)) == 10 and all(p % 4 == 3 for p in drawn)
    assert draws[0] != draws[1]  # a new seeded draw each round
    assert draws == [round_participants(cfg, r, tiers, exclusive.takes_part)
                     for r in range(1, 4)]
    assert round_participants(cfg, 1, dict.fromkeys(range(12), 2), exclusive.takes_part) == []


def test_exclusivefl_round_without_full_clients_is_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for field in ("_run_id", "_node_id", "_task_id"):  # a Flower Message needs them
        monkeypatch.setattr(TaskIdentity, field, 1)
    cfg = RunConfig.from_flat({"method": "exclusivefl", "num-clients": 4, "num-exits": 2,
                               "depth": 2, "embed-dim": 16, "num-heads": 2,
                               "fraction-train": 1.0})
    method = build_method(cfg, TASK)
    global_state = {k: v.detach() for k, v in method.build_global_model().state_dict().items()}
    online = {100 + pid for pid in range(4)}
    roster = Roster(cfg)
    roster.clients = {pid: ClientInfo(node_id=100 + pid, tier=pid % 2, num_examples=10)
                      for pid in range(4)}
    messages, _ = TieredStrategy(cfg, method, roster).configure_train(
        1, global_state, online, RoundRecord())
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 103]  # tier 1 only
    assert all(set(m.content["arrays"]) == set(global_state) for m in messages)
    roster.clients = {pid: ClientInfo(100 + pid, 0, 10) for pid in range(4)}
    strategy = TieredStrategy(cfg, method, roster)
    record = RoundRecord()
    messages, sent = strategy.configure_train(1, global_state, online, record)
    assert messages == [] and record.sampled == []
    assert strategy.aggregate_train(1, global_state, [], sent, record) is None  # unchanged
    assert strategy.last_train_metrics == {}


def test_exclusivefl_loss_is_plain_sum_of_ce() -> None:
    method = build_method(RunConfig.from_flat({"method": "exclusivefl", "depth": 3,
                                               "num-exits": 3}), TASK)
    loss, _ = method.local_loss(LOGITS, LABELS, 300, method.new_loss_state())
    assert loss.item() == pytest.approx(sum(CE), abs=1e-5)


# -- per-exit heads ----------------------------------------------------------------------------
def test_per_exit_heads_read_the_class_token_and_leave_the_backbone_alone() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=4,
                            num_heads=2, mlp_ratio=2.0)
    heads = PerExitHeads(16, 5, exit_blocks=[1, 3])
    model = EarlyExitModel(vit, heads).eval()
    assert sorted(k for k in model.state_dict() if k.startswith("exits.")) == sorted(
        f"exits.heads.{k}.{part}.{p}" for k in (0, 1) for part in ("norm", "fc")
        for p in ("weight", "bias"))
    assert heads.heads[0].norm.eps == 1e-5
    x = torch.randn(3, 1, 8, 8)
    seen: list[torch.Tensor] = []
    for block in vit.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        logits = model(x)
        h = vit.embed(x)
        for index, block in enumerate(vit.blocks):  # the plain ViT: every token untouched
            torch.testing.assert_close(seen[index], h, rtol=0, atol=0)
            h = block(h)
            if index == 1:
                torch.testing.assert_close(logits[0], heads.heads[0](h[:, 0]), rtol=0, atol=0)
        torch.testing.assert_close(logits[1], heads.heads[1](h[:, 0]), rtol=0, atol=0)
    assert [tuple(z.shape) for z in logits] == [(3, 5), (3, 5)]


@pytest.mark.parametrize("name", ["depthfl", "exclusivefl"])
def test_baseline_tier_models_have_heads_up_to_their_exit(name: str) -> None:
    method = build_method(RunConfig.from_flat({"method": name, "depth": 4, "num-exits": 2,
                                               "embed-dim": 16, "num-heads": 2}), TASK)
    keys = method.trainable_keys(0)
    assert not any(k.startswith(("exits.heads.1.", "backbone.blocks.2.")) for k in keys)
    assert "exits.heads.0.fc.weight" in keys and "backbone.blocks.1.norm1.weight" in keys
    assert len(method.build_global_model()(torch.randn(2, 1, 28, 28))) == 2
