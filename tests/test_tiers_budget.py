"""A SuperNode that states a budget (``memory-mb``, ``gflops-per-round``) gets the deepest tier
whose training needs fit, the needs pinned here to the accounting ``reefl costs`` prints."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import TINY
from reefl.config import RunConfig
from reefl.federation.inputs import source_task
from reefl.federation.tiers import MIB, client_tier, tier_needs, tier_of
from reefl.methods import build_method
from reefl.outputs.accounting import tier_costs

EXAMPLES = 50  # the client's training examples per epoch
ABOVE, BELOW = 1 + 1e-9, 1 - 1e-9
Need = Callable[[RunConfig, int], float]
"""A tier's need in a budget key's unit, for the run config."""


def _cfg(**overrides: object) -> RunConfig:
    return RunConfig.from_flat({**TINY, "local-epochs": 2, **overrides})


def _accounting(cfg: RunConfig) -> list[dict]:
    """What ``reefl costs`` prints for ``cfg`` (built as ``cmd_costs`` builds it)."""
    return tier_costs(build_method(cfg, source_task(cfg)))


@pytest.mark.parametrize(("optimizer", "copies"), [("adamw", 4), ("sgd", 2)])
def test_needs_are_the_accounting_numbers(optimizer: str, copies: int) -> None:
    """Memory: fp32 weights of the tier's model plus gradient, sent copy (and AdamW's two
    moments) of what it trains; compute: forward + backward, 3 × the forward FLOPs."""
    cfg = _cfg(optimizer=optimizer)
    for need, cost in zip(tier_needs(cfg), _accounting(cfg), strict=True):
        assert need.memory_mib == (4 * cost["params_model"] + copies * cost["bytes_up"]) / MIB
        assert need.gflop_per_example == 3 * cost["forward_flops"] / 1e9


def _memory(cfg: RunConfig, tier: int) -> float:
    return tier_needs(cfg)[tier].memory_mib


def _gflops(cfg: RunConfig, tier: int) -> float:
    return tier_needs(cfg)[tier].gflop_per_example * EXAMPLES * cfg.local_epochs


@pytest.mark.parametrize(("key", "need"), [("memory-mb", _memory),
                                           ("gflops-per-round", _gflops)])
def test_budget_picks_the_deepest_tier_that_fits(key: str, need: Need) -> None:
    cfg = _cfg()
    needs = [need(cfg, tier) for tier in range(cfg.num_exits)]
    assert needs == sorted(needs) and len(set(needs)) == len(needs)  # deeper costs more
    for tier in range(cfg.num_exits):
        assert client_tier(0, cfg, {key: needs[tier] * ABOVE}, EXAMPLES) == tier
        if tier > 0:
            assert client_tier(0, cfg, {key: needs[tier] * BELOW}, EXAMPLES) == tier - 1
    assert client_tier(0, cfg, {key: str(needs[2] * ABOVE)}, EXAMPLES) == 2  # given as text


def test_both_budgets_must_fit() -> None:
    cfg = _cfg()
    budget = {"memory-mb": _memory(cfg, 3) * ABOVE, "gflops-per-round": _gflops(cfg, 1) * ABOVE}
    assert client_tier(0, cfg, budget, EXAMPLES) == 1
    budget = {"memory-mb": _memory(cfg, 2) * ABOVE, "gflops-per-round": _gflops(cfg, 3) * ABOVE}
    assert client_tier(0, cfg, budget, EXAMPLES) == 2


def test_a_stated_tier_wins_and_maximum_wins_over_all() -> None:
    cfg = _cfg()
    small = {"memory-mb": _memory(cfg, 0) * ABOVE}
    assert client_tier(5, cfg, {**small, "tier": 3}) == 3
    assert client_tier(5, cfg, small) == 0 != tier_of(5, cfg)
    assert client_tier(5, _cfg(maximum=True), small) == 3


@pytest.mark.parametrize(("key", "need", "unit"),
                         [("memory-mb", _memory, "MiB of training memory"),
                          ("gflops-per-round", _gflops, "GFLOP of training per round")])
def test_a_budget_below_the_shallowest_tier_names_the_key_and_the_need(
        key: str, need: Need, unit: str) -> None:
    cfg = _cfg()
    smallest = need(cfg, 0)
    with pytest.raises(ValueError) as error:
        client_tier(0, cfg, {key: smallest * BELOW}, EXAMPLES)
    assert str(error.value) == (f"node config {key}={smallest * BELOW:g} fits no tier: "
                                f"tier 0 needs {smallest:.4g} {unit}")


@pytest.mark.parametrize("value", [0, -1.0, "plenty", float("nan")])
def test_a_budget_that_is_not_a_positive_number_is_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="^node config memory-mb must be a number > 0"):
        client_tier(0, _cfg(), {"memory-mb": value})


def test_a_compute_budget_needs_the_number_of_examples() -> None:
    with pytest.raises(ValueError, match="needs the client's number of training examples"):
        client_tier(0, _cfg(), {"gflops-per-round": 1.0})
