"""The Flower strategy: seeded sampling over partition ids, per-tier sub-model messages,
checked replies, and the method's server update."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from reefl.config import RunConfig
from reefl.methods import ClientUpdate, Method
from reefl.training import server_learning_rate


@dataclass(frozen=True)
class ClientInfo:
    """What a client told the server when the run started."""

    node_id: int
    tier: int
    num_examples: int


def sample_clients(cfg: RunConfig, server_round: int, partition_ids: list[int],
                   eligible: list[int] | None = None) -> list[int]:
    """The partition ids trained in ``server_round``: the round's quota,
    max(1, round(fraction-train × all of ``partition_ids``)), drawn uniformly at random
    whatever their tier from ``eligible`` (default: all of them; every one of them if
    fewer), with a generator seeded by (seed, round). With every id eligible the draw is the
    same whatever the method."""
    count = max(1, round(cfg.fraction_train * len(partition_ids)))
    pool = sorted(partition_ids if eligible is None else eligible)
    if not pool:
        return []
    rng = np.random.default_rng([cfg.seed, server_round])
    return sorted(int(p) for p in rng.choice(pool, size=min(count, len(pool)), replace=False))


def round_participants(cfg: RunConfig, server_round: int, tiers: dict[int, int],
                       takes_part: Callable[[int], bool]) -> list[int]:
    """The partition ids that train in ``server_round``: the quota of all of ``tiers``
    (partition id -> tier) drawn from those whose tier ``takes_part`` (``sample_clients``;
    ExclusiveFL: the deepest tier alone). When every tier takes part, it is the draw over
    all ids, the same for every such method."""
    eligible = [pid for pid, tier in tiers.items() if takes_part(tier)]
    return sample_clients(cfg, server_round, list(tiers), eligible)


def train_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The training metrics of a client's reply (``train-*``), as floats."""
    return {k: float(v) for k, v in metrics.items() if k.startswith("train-")}


def weighted_metrics(updates: list[ClientUpdate]) -> dict[str, float]:
    """Example-weighted mean of each training metric over the clients that report it."""
    names = sorted({name for u in updates for name in u.metrics})
    merged = {}
    for name in names:
        pairs = [(u.metrics[name], u.num_examples) for u in updates if name in u.metrics]
        merged[name] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
    return merged


class TieredStrategy(Strategy):
    """Each sampled client gets only its tier's trainable parameters and returns them with
    its example count; the method merges the replies into the global model."""

    def __init__(self, cfg: RunConfig, method: Method, roster: dict[int, ClientInfo]) -> None:
        self.cfg = cfg
        self.method = method
        self.roster = roster
        self.partition_of_node = {info.node_id: pid for pid, info in roster.items()}
        self.global_state: dict[str, torch.Tensor] = {}
        self.sent_shapes: dict[int, dict[str, torch.Size]] = {}
        self.last_train_metrics: dict[str, float] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        self.sent_shapes = {}
        self.last_train_metrics = {}
        lr = server_learning_rate(server_round - 1, self.cfg)
        tiers = {pid: info.tier for pid, info in self.roster.items()}
        participants = round_participants(self.cfg, server_round, tiers, self.method.takes_part)
        if not participants:
            log(INFO, "round %s: no sampled client takes part in %s; round skipped, the "
                "global model is unchanged", server_round, self.cfg.method)
        messages = []
        for pid in participants:
            info = self.roster[pid]
            payload = self.method.client_payload(self.global_state, info.tier)
            self.sent_shapes[pid] = {k: v.shape for k, v in payload.items()}
            content = RecordDict({
                "arrays": ArrayRecord(payload),
                "config": ConfigRecord({"lr": lr, "server-round": server_round, **config}),
            })
            messages.append(Message(content, dst_node_id=info.node_id, message_type="train"))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = sorted((u for u in map(self._checked_update, replies) if u is not None),
                         key=lambda u: u.partition_id)
        if not updates:
            if self.sent_shapes:  # clients were asked (a skipped round was logged already)
                log(WARNING, "round %s: no usable replies; the global model is unchanged",
                    server_round)
            return None, None
        self.global_state = self.method.aggregate(self.global_state, updates)
        self.last_train_metrics = weighted_metrics(updates)
        return ArrayRecord(self.global_state), MetricRecord(self.last_train_metrics)

    def _checked_update(self, reply: Message) -> ClientUpdate | None:
        """The reply as an update, or None (with a warning) if it failed or does not return
        exactly the names and shapes it was sent."""
        if reply.has_error():
            log(WARNING, "a client failed: %s", reply.error.reason)
            return None
        pid = self.partition_of_node[reply.metadata.src_node_id]
        tier = self.roster[pid].tier
        metrics = reply.content["metrics"]
        state = reply.content["arrays"].to_torch_state_dict()
        if {k: v.shape for k, v in state.items()} != self.sent_shapes[pid]:
            log(WARNING, "client %s sent parameters that do not match tier %s; ignored", pid, tier)
            return None
        return ClientUpdate(pid, tier, state, int(metrics["num-examples"]),
                            train_metrics(metrics))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is centralised on the server (see server_app)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        tiers = [info.tier for info in self.roster.values()]
        log(INFO, "TieredStrategy: %s clients, tiers %s, fraction-train %s",
            len(self.roster), {t: tiers.count(t) for t in sorted(set(tiers))},
            self.cfg.fraction_train)
