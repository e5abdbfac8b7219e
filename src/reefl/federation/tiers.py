"""Which tier a client is: one rule, used by both the ServerApp and the ClientApp."""

from __future__ import annotations

from reefl.config import RunConfig


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


def client_tier(partition_id: int, cfg: RunConfig, node_config: dict) -> int:
    """A real device may state its own tier (node config ``tier``); otherwise the rule.
    ``maximum`` mode overrides both: it is the ablation where every client is tier K − 1."""
    if "tier" in node_config and not cfg.maximum:
        tier = int(node_config["tier"])
        if not 0 <= tier < cfg.num_exits:
            raise ValueError(f"node config tier must be in 0..{cfg.num_exits - 1}, got {tier}")
        return tier
    return tier_of(partition_id, cfg)
