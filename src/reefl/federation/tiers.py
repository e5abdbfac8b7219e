"""Which tier a client is: one rule, used by both the ServerApp and the ClientApp.

A client's tier comes from the run's tier rule (``tier_of``), unless its SuperNode states
one in its node config: a ``tier``, or a budget (``memory-mb``, ``gflops-per-round``), which
gets the deepest tier whose training cost fits (``budget_tier``). The costs are the ones
``reefl costs`` prints (``reefl.outputs.accounting.tier_costs``), turned into what training needs
(``TierNeed``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reefl.config import RunConfig

MIB = 2**20
GIGA = 1e9
FP32_BYTES = 4  # weights and optimiser state stay fp32, also under bf16 autocast
TRAINED_COPIES = {"sgd": 2, "adamw": 4}
"""Copies of every trained parameter that local training holds besides the weights: its
gradient and the copy of what the server sent (``training.train_locally``), plus AdamW's two
moments (SGD runs with momentum 0: no state)."""
TRAIN_OVER_FORWARD_FLOPS = 3
"""Training FLOPs of one example over its forward FLOPs: the backward pass computes the
products for the inputs' and the weights' gradients, about twice the forward's."""
BUDGET_UNITS = {"memory-mb": "MiB of training memory",
                "gflops-per-round": "GFLOP of training per round"}


def tier_of(partition_id: int, cfg: RunConfig) -> int:
    """Tier of client ``partition_id`` under ``cfg.tier_rule``.

    ``maximum`` mode: K − 1 for everyone (every client affords the full model; docs/method.md §1).
    ``round-robin``: ``partition_id mod K``. ``ratios``: the ids 0..N−1 are cut into K
    consecutive runs whose lengths follow ``tier-ratios``, shallowest tier first.
    """
    num_tiers = cfg.num_exits
    if cfg.maximum:
        return num_tiers - 1
    if cfg.tier_rule == "round-robin":
        return partition_id % num_tiers
    ratios = cfg.tier_ratio_list
    position = (partition_id + 0.5) / cfg.num_clients * sum(ratios)
    cumulative = 0.0
    for tier, ratio in enumerate(ratios):
        cumulative += ratio
        if position < cumulative:
            return tier
    return num_tiers - 1


def client_tier(partition_id: int, cfg: RunConfig, node_config: Mapping[str, Any],
                num_examples: int | None = None) -> int:
    """A real device may state its own tier (node config ``tier``) or its budget
    (``budget_tier``; a stated tier wins); otherwise the rule. ``maximum`` mode overrides
    all: it is the ablation where every client is tier K − 1. ``num_examples`` (the client's
    training examples per epoch) is needed only for a ``gflops-per-round`` budget."""
    if cfg.maximum:
        return cfg.num_exits - 1
    if "tier" in node_config:
        tier = int(node_config["tier"])
        if not 0 <= tier < cfg.num_exits:
            raise ValueError(f"node config tier must be in 0..{cfg.num_exits - 1}, got {tier}")
        return tier
    budget = stated_budget(node_config)
    if budget:
        return budget_tier(cfg, budget, num_examples)
    return tier_of(partition_id, cfg)


@dataclass(frozen=True)
class TierNeed:
    """What a client needs to train one tier's sub-model for a round.

    ``memory_mib``: the model's weights (``params_model``, fp32) and ``TRAINED_COPIES`` of
    its trained parameters (``bytes_up``); activations are not counted (the accounting has
    no figure for them). ``gflop_per_example``: ``TRAIN_OVER_FORWARD_FLOPS`` × ``forward_flops``
    (one example, what the accounting counts: products, not element-wise work)."""

    tier: int
    memory_mib: float
    gflop_per_example: float

    def of(self, key: str, examples_per_round: int | None) -> float:
        """The need in budget ``key``'s unit (``BUDGET_UNITS``); a compute need scales with
        the examples trained in a round (examples × local epochs)."""
        if key == "memory-mb":
            return self.memory_mib
        if examples_per_round is None:
            raise ValueError("node config gflops-per-round needs the client's number of "
                             "training examples (client_tier's num_examples)")
        return self.gflop_per_example * examples_per_round


@functools.lru_cache(maxsize=4)
def tier_needs(cfg: RunConfig) -> tuple[TierNeed, ...]:
    """Every tier's ``TierNeed`` (shallowest first) under ``cfg``, from the accounting that
    ``reefl costs`` prints: the method built for the run's data source, as ``cmd_costs``
    builds it. Computed once per config (the models are built on the meta device)."""
    from reefl.federation.inputs import source_task
    from reefl.methods import build_method
    from reefl.outputs.accounting import tier_costs

    copies = TRAINED_COPIES[cfg.optimizer]
    return tuple(
        TierNeed(cost["tier"],
                 (FP32_BYTES * cost["params_model"] + copies * cost["bytes_up"]) / MIB,
                 TRAIN_OVER_FORWARD_FLOPS * cost["forward_flops"] / GIGA)
        for cost in tier_costs(build_method(cfg, source_task(cfg))))


def stated_budget(node_config: Mapping[str, Any]) -> dict[str, float]:
    """The budget keys a node config states (``BUDGET_UNITS``), each a number > 0."""
    return {key: _budget_value(key, node_config[key]) for key in BUDGET_UNITS
            if key in node_config}


def _budget_value(key: str, raw: Any) -> float:
    """``raw`` (a node-config value, which may be text) as a number > 0; ValueError naming
    ``key`` otherwise."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = 0.0  # rejected below, with every other value that is not > 0
    if not value > 0:
        raise ValueError(f"node config {key} must be a number > 0 ({BUDGET_UNITS[key]}), "
                         f"got '{raw}'")
    return value


def budget_tier(cfg: RunConfig, budget: Mapping[str, float],
                num_examples: int | None = None) -> int:
    """The deepest tier whose every need fits ``budget`` (``stated_budget``); ValueError
    naming the key the shallowest tier does not fit if none does."""
    examples = None if num_examples is None else num_examples * cfg.local_epochs
    needs = tier_needs(cfg)
    fitting = [need.tier for need in needs
               if all(need.of(key, examples) <= value for key, value in budget.items())]
    if fitting:
        return max(fitting)
    smallest = needs[0]
    key = next(key for key, value in budget.items() if smallest.of(key, examples) > value)
    raise ValueError(f"node config {key}={budget[key]:g} fits no tier: tier 0 needs "
                     f"{smallest.of(key, examples):.4g} {BUDGET_UNITS[key]}")
