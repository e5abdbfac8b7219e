"""Differential privacy of the clients' updates (docs/privacy.md): clipping, the per-key noise
against hand-computed values, the accountant against dp-accounting called directly, the run's
records, the refused combinations, and DP off leaving the old aggregate untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch

from reefl.config import ConfigError, RunConfig
from reefl.federation.local import run_local
from reefl.methods import ClientUpdate, TaskSpec, build_method
from reefl.methods import privacy as privacy_module
from reefl.methods.aggregate import sliced_mean, weighted_mean_per_key
from reefl.methods.depthfl import DepthFL
from reefl.methods.privacy import (
    clip_update,
    epsilon,
    epsilon_over_rounds,
    noise_generator,
    noised_mean,
)

TASK = TaskSpec(num_classes=2, in_chans=1)
F64 = torch.float64


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _depthfl(**overrides: object) -> DepthFL:
    cfg = RunConfig.from_flat({"method": "depthfl", "depth": 2, "num-exits": 2,
                               "embed-dim": 16, "num-heads": 2, **overrides})
    return build_method(cfg, TASK)


# -- clipping -----------------------------------------------------------------------------
def test_an_update_above_the_bound_is_scaled_to_it_one_below_is_unchanged() -> None:
    delta = {"a": _t(3.0, 0.0), "b": _t(0.0, 4.0)}  # ‖Δ‖ = 5 over both keys together
    clipped, norm = clip_update(delta, 2.5)
    assert norm == 5.0
    assert torch.equal(clipped["a"], _t(1.5, 0.0)) and torch.equal(clipped["b"], _t(0.0, 2.0))
    assert math.sqrt(sum(float(d.pow(2).sum()) for d in clipped.values())) == pytest.approx(2.5)
    same, norm = clip_update(delta, 5.0)  # at the bound: unchanged
    assert norm == 5.0 and all(torch.equal(same[k], delta[k]) for k in delta)
    same, _ = clip_update(delta, 100.0)
    assert all(torch.equal(same[k], delta[k]) for k in delta)


# -- the noised mean ------------------------------------------------------------------------
# Two tiers, C = 1, z = 0.7, every global value 1:
#   "frozen" (2,): nobody holds it -> unchanged, draws nothing
#   "shallow" (3,): clients A, B (tier 0) and C (tier 1) -> n = 3
#   "deep" (2,): client C alone -> n = 1
# A sends Δ = [3, 4, 0] (‖·‖ = 5 -> clipped to [0.6, 0.8, 0]); B Δ = [0.3, 0, 0]; C Δ =
# [0, 0, 0.5] and [0, 0.5] (‖·‖ = 0.707 < 1, unchanged); B's and C's are kept as they are.
#   shallow = 1 + ([0.6, 0.8, 0] + [0.3, 0, 0] + [0, 0, 0.5]) / 3 + 0.7·1·ξ_shallow / 3
#   deep    = 1 + [0, 0.5] / 1                                   + 0.7·1·ξ_deep / 1
# with ξ_shallow then ξ_deep drawn from noise_generator(seed, round), in that order.
GLOBAL = {"frozen": _t(1.0, 1.0), "shallow": _t(1.0, 1.0, 1.0), "deep": _t(1.0, 1.0)}
CLIENTS = [{"shallow": _t(4.0, 5.0, 1.0)},
           {"shallow": _t(1.3, 1.0, 1.0)},
           {"shallow": _t(1.0, 1.0, 1.5), "deep": _t(1.0, 1.5)}]
CLEAN = {"shallow": 1 + _t(0.9, 0.8, 0.5) / 3, "deep": _t(1.0, 1.5)}


def test_noise_is_z_c_over_the_holders_times_the_seeded_draw() -> None:
    merged = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(3, 5))
    replay = noise_generator(3, 5)
    xi_shallow = torch.randn(3, generator=replay, dtype=F64)
    xi_deep = torch.randn(2, generator=replay, dtype=F64)
    assert torch.equal(merged["frozen"], GLOBAL["frozen"])
    torch.testing.assert_close(merged["shallow"], CLEAN["shallow"] + 0.7 * xi_shallow / 3,
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(merged["deep"], CLEAN["deep"] + 0.7 * xi_deep / 1,
                               rtol=0, atol=1e-14)
    # without noise: exactly the clean, unweighted mean of the clipped updates
    clean = noised_mean(GLOBAL, CLIENTS, 1.0, 0.0, None)
    torch.testing.assert_close(clean["shallow"], CLEAN["shallow"], rtol=0, atol=1e-15)
    torch.testing.assert_close(clean["deep"], CLEAN["deep"], rtol=0, atol=1e-15)


def test_the_noise_is_fixed_by_seed_and_round() -> None:
    first = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(3, 5))
    again = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(3, 5))
    other_round = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(3, 6))
    other_seed = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(4, 5))
    assert all(torch.equal(first[k], again[k]) for k in GLOBAL)
    assert not torch.equal(first["deep"], other_round["deep"])
    assert not torch.equal(first["deep"], other_seed["deep"])


def test_width_slices_are_noised_per_element_by_the_clients_covering_it() -> None:
    """ScaleFL: a narrow client covers the leading 2 of 4 entries; counts [2, 2, 1, 1]."""
    global_state = {"w": torch.zeros(4, dtype=F64)}
    states = [{"w": _t(0.2, 0.2, 0.4, 0.4)}, {"w": _t(0.6, 0.0)}]
    merged = noised_mean(global_state, states, 10.0, 0.5, noise_generator(0, 1))
    xi = torch.randn(4, generator=noise_generator(0, 1), dtype=F64)
    expected = _t(0.4, 0.1, 0.4, 0.4) + 0.5 * 10.0 * xi / _t(2, 2, 1, 1)
    torch.testing.assert_close(merged["w"], expected, rtol=0, atol=1e-14)


def test_with_dp_the_mean_is_unweighted_and_fedadam_steps_on_the_noised_mean() -> None:
    method = _depthfl(**{"dp-clip-norm": 1.0, "dp-noise-multiplier": 0.7,
                         "server-update": "fedadam"})
    updates = [ClientUpdate(pid, tier, state, examples) for pid, tier, state, examples in
               [(0, 0, CLIENTS[0], 1), (1, 0, CLIENTS[1], 100), (2, 1, CLIENTS[2], 7)]]
    method.privacy.start_round(5)
    stepped = method.aggregate(GLOBAL, updates)
    noised = noised_mean(GLOBAL, CLIENTS, 1.0, 0.7, noise_generator(0, 5))  # seed 0
    for key in ("shallow", "deep"):  # m = (1 − β1)·(noised − w): the moments saw the noise
        m, _ = method.fedadam.moments[key]
        torch.testing.assert_close(m, 0.1 * (noised[key] - GLOBAL[key]), rtol=0, atol=1e-15)
    assert "frozen" not in method.fedadam.moments and torch.equal(stepped["frozen"],
                                                                  GLOBAL["frozen"])


def test_inclusivefl_tier_means_are_unweighted_under_dp() -> None:
    """Two tier-0 clients moving every parameter by +1 and +3, with 1 and 99 examples: the
    tier's own head is the plain mean, +2 (z = 0, a bound no update reaches)."""
    cfg = RunConfig.from_flat({"method": "inclusivefl", "depth": 2, "num-exits": 2,
                               "embed-dim": 16, "num-heads": 2, "inclusivefl-beta": 0.0,
                               "dp-clip-norm": 1e9})
    method = build_method(cfg, TASK)
    state = {k: v.to(F64) for k, v in method.initial_state().items()}
    sent = method.client_payload(state, 0)
    updates = [ClientUpdate(pid, 0, {k: v + shift for k, v in sent.items()}, examples)
               for pid, shift, examples in [(0, 1.0, 1), (1, 3.0, 99)]]
    method.privacy.start_round(1)
    merged = method.aggregate(state, updates)
    for key in ("tiers.0.exits.heads.0.fc.weight", "tiers.0.block.mlp.fc1.weight",
                "backbone.cls_token"):  # its own head and top block, and a shared one
        torch.testing.assert_close(merged[key], state[key] + 2.0, rtol=0, atol=1e-12)


# -- DP off: the old aggregate, bit for bit -------------------------------------------------
def test_dp_off_never_enters_the_private_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the DP path was entered with DP off")

    monkeypatch.setattr(privacy_module, "noised_mean", refuse)
    monkeypatch.setattr(privacy_module.GaussianMechanism, "mean", refuse)
    monkeypatch.setattr(privacy_module.GaussianMechanism, "start_round", refuse)
    states = [(CLIENTS[0], 1), (CLIENTS[1], 100), (CLIENTS[2], 7)]
    updates = [ClientUpdate(i, 0, s, n) for i, (s, n) in enumerate(states)]
    for server_update in ("fedavg", "fedadam"):
        method = _depthfl(**{"server-update": server_update})
        assert not method.privacy.on
        merged = method.merge(GLOBAL, updates)
        old = weighted_mean_per_key(GLOBAL, states)
        assert all(torch.equal(merged[k], old[k]) for k in GLOBAL)
        method.aggregate(GLOBAL, updates)
    scalefl = build_method(RunConfig.from_flat({"method": "scalefl", "depth": 2,
                                                "num-exits": 2, "embed-dim": 16,
                                                "num-heads": 2, "scalefl-widths": "0.5,1.0"}),
                           TASK)
    merged = scalefl.merge(GLOBAL, updates)
    old = sliced_mean(GLOBAL, [(s, 1.0) for s, _ in states])
    assert all(torch.equal(merged[k], old[k]) for k in GLOBAL)


# -- the accountant -------------------------------------------------------------------------
def _direct(z: float, q: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("z", "q", "rounds", "delta"),
                         [(1.1, 0.1, 40, 1e-5), (0.5, 0.5, 3, 1e-3), (4.0, 1.0, 1, 1e-6)])
def test_epsilon_is_dp_accountings(z: float, q: float, rounds: int, delta: float) -> None:
    assert epsilon(z, q, rounds, delta) == _direct(z, q, rounds, delta)


def test_epsilon_over_changing_rates_composes_them() -> None:
    accountant = dp_accounting.rdp.RdpAccountant()
    for q in (0.2, 0.5, 0.2):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(1.5)))
    assert epsilon_over_rounds(1.5, [0.2, 0.5, 0.2], 1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-12)
    assert epsilon(0.0, 0.5, 3, 1e-5) == math.inf and epsilon(1.0, 0.5, 0, 1e-5) == 0.0


# -- the run's records ----------------------------------------------------------------------
def test_a_private_run_reports_epsilon_each_round_and_at_the_end(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({
        "num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 2, "eval-every": 2, "fraction-train": 0.5, "local-epochs": 1,
        "train-examples": 200, "test-examples": 50, "seed": 1, "dp-clip-norm": 0.5,
        "dp-noise-multiplier": 0.8, "dp-delta": 1e-4, "output-dir": str(tmp_path),
        "run-name": "dp"})
    run_dir = run_local(cfg)
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 2 of 4 clients a round: q = 0.5
    assert [r["dp_sampling_rate"] for r in records] == [0.5, 0.5]
    assert [r["dp_epsilon"] for r in records] == [_direct(0.8, 0.5, 1, 1e-4),
                                                  _direct(0.8, 0.5, 2, 1e-4)]
    assert final["dp_epsilon"] == _direct(0.8, 0.5, 2, 1e-4) and final["dp_delta"] == 1e-4
    assert all(math.isfinite(a) for a in final["exit_accuracy"])


# -- refused combinations -------------------------------------------------------------------
@pytest.mark.parametrize(("flat", "start"), [
    ({"method": "depthfl", "server-update": "feddyn", "dp-clip-norm": 1.0},
     "server-update must be fedavg or fedadam when dp-clip-norm > 0"),
    ({"dp-noise-multiplier": 1.0}, "dp-noise-multiplier must be 0 while dp-clip-norm is 0"),
    ({"dp-clip-norm": -1.0}, "dp-clip-norm must be a number >= 0"),
    ({"dp-clip-norm": 1.0, "dp-noise-multiplier": -0.1},
     "dp-noise-multiplier must be a number >= 0"),
    ({"dp-delta": 0.0}, "dp-delta must be a number in (0, 1)"),
    ({"dp-delta": 1.0}, "dp-delta must be a number in (0, 1)"),
])
def test_refused_combinations_say_why_in_one_line(flat: dict[str, object], start: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(flat)
    assert str(err.value).startswith(start) and "\n" not in str(err.value)


def test_a_method_with_its_own_merge_is_refused_unless_it_declares_privacy() -> None:
    class OwnMerge(DepthFL):  # no name: not registered
        def merge(self, global_state, updates):  # type: ignore[no-untyped-def]
            return dict(global_state)

    class PrivateMerge(OwnMerge):
        private_aggregate = True

    cfg = RunConfig.from_flat({"method": "depthfl", "dp-clip-norm": 1.0})
    with pytest.raises(ConfigError,
                       match="^dp-clip-norm must be 0 for method depthfl: its server update"):
        OwnMerge._check_all(cfg)
    PrivateMerge._check_all(cfg)
    for name in ("reefl", "depthfl", "inclusivefl", "scalefl", "exclusivefl"):
        RunConfig.from_flat({"method": name, "dp-clip-norm": 1.0, "dp-noise-multiplier": 1.0})
