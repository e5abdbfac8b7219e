"""The rounds' logic on the server: the roster of partitions and their SuperNodes, seeded
sampling over partition ids, per-tier sub-model messages, checked replies, and the method's
server update. The per-client states the method keeps on the server (FedDyn's g_i) are in a
``ClientStateStore`` (on disk in a run; RAM holds only which round each one is from): read
for the clients a round samples, written for those whose reply is used."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore import log

from reefl.config import RunConfig
from reefl.federation.client_store import ClientStateStore
from reefl.federation.replies import (
    RejectedReply,
    RoundRecord,
    SentTo,
    bound_update,
    checked_update,
)
from reefl.methods import ClientUpdate, Method
from reefl.training import server_learning_rate

Checked = TypeVar("Checked")
"""What a reply check makes of a reply (``accepted_replies``)."""

NO_NODE = -1
"""The node id of a partition whose SuperNode has not announced itself (yet) in this run."""


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


def sampling_rate(cfg: RunConfig, tiers: dict[int, int],
                  takes_part: Callable[[int], bool]) -> float:
    """Each eligible client's chance of being trained in a round (``round_participants``):
    the round's quota over the clients whose tier ``takes_part``, at most 1; what the
    privacy accountant takes as its sampling rate q (docs/privacy.md)."""
    eligible = sum(1 for tier in tiers.values() if takes_part(tier))
    if not eligible:
        return 0.0
    count = max(1, round(cfg.fraction_train * len(tiers)))
    return min(count, eligible) / eligible


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


class Roster:
    """The partition ids of the run and the SuperNode that holds each one now.

    Sampling is over partition ids, never node ids: a SuperNode that restarts (and gets a new
    node id) and announces its partition id again takes that partition's place. A node that
    announces a partition id held by another node that is still online is refused (the
    newcomer, not the run). ``discover`` asks every online node not seen before who it is.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.clients: dict[int, ClientInfo] = {}  # partition id -> its holder now
        self.refused: dict[int, str] = {}  # node id -> why
        self.unanswered: set[int] = set()  # node ids asked that did not answer (asked again)

    @property
    def tiers(self) -> dict[int, int]:
        return {pid: info.tier for pid, info in self.clients.items()}

    def discover(self, grid: Grid, online: set[int], timeout: float) -> tuple[
            dict[int, int], dict[int, str]]:
        """Ask the ``online`` nodes the roster does not know for their partition id, tier and
        size (a ``query`` message); returns who joined (partition id -> node id) and who was
        refused (node id -> reason)."""
        known = {info.node_id for info in self.clients.values()} | set(self.refused)
        new = sorted(online - known)
        if not new:
            return {}, {}
        messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                            message_type="query") for node in new]
        joined: dict[int, int] = {}
        refused: dict[int, str] = {}
        answered: set[int] = set()
        for reply in _send(grid, messages, timeout):
            node = reply.metadata.src_node_id
            if node not in new or node in answered:
                continue
            answered.add(node)
            try:
                pid, info = self._announced(reply, node)
            except ValueError as err:
                refused[node] = str(err)
                continue
            holder = self.clients.get(pid)
            if holder is not None and holder.node_id in online and holder.node_id != node:
                refused[node] = (f"partition-id {pid} is held by node {holder.node_id}, "
                                 "which is online")
                continue
            self.clients[pid] = info
            joined[pid] = node
        self.refused.update(refused)
        self.unanswered = set(new) - answered
        for node, reason in refused.items():
            log(WARNING, "reefl: SuperNode %s refused: %s", node, reason)
        return joined, refused

    def _announced(self, reply: Message, node: int) -> tuple[int, ClientInfo]:
        """The partition id and client info a roll-call reply announces; ValueError (one
        line) if it is an error or out of range."""
        if reply.has_error():
            raise ValueError(f"roll call failed: {reply.error.reason}")
        try:
            info = reply.content["client"]
            pid, tier, size = (info["partition-id"], info["tier"], info["num-examples"])
        except (KeyError, TypeError):
            raise ValueError("roll-call reply without partition-id, tier and num-examples"
                             ) from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, tier, size)):
            raise ValueError("partition-id, tier and num-examples must be integers")
        if not 0 <= pid < self.cfg.num_clients:
            raise ValueError(f"partition-id {pid} is not in 0..{self.cfg.num_clients - 1} "
                             "(num-clients)")
        if not 0 <= tier < self.cfg.num_exits:
            raise ValueError(f"tier {tier} is not in 0..{self.cfg.num_exits - 1}")
        if size < 1:
            raise ValueError(f"partition {pid} has no training examples")
        return pid, ClientInfo(node, tier, size)


def _send(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive``, returning what arrived within ``timeout`` seconds (a
    failure of the transport itself is logged and returns nothing: the round goes on)."""
    if not messages:
        return []
    try:
        return list(grid.send_and_receive(messages, timeout=timeout))
    except Exception as err:  # the SuperLink's connection: gRPC/HTTP errors of many kinds
        log(WARNING, "reefl: sending %s messages failed: %s", len(messages), err)
        return []


def _addressee(reply: Message, by_message: dict[str, SentTo], by_node: dict[int, SentTo]
               ) -> SentTo | None:
    """Whom a reply answers: the message it replies to (by id; by sender when ids are not
    set), and only if it comes from that message's node, or is an error reply the SuperLink
    sent in the node's stead (e.g. the node went offline). None for anything else."""
    sender = reply.metadata.src_node_id
    target = by_message.get(reply.metadata.reply_to_message_id)
    if target is None:
        return None if by_message else by_node.get(sender)
    if sender == target.node_id or (sender == SUPERLINK_NODE_ID and reply.has_error()):
        return target
    return None


def accepted_replies(replies: Iterable[Message], sent: dict[int, SentTo], record: RoundRecord,
                     what: str, timeout: float, check: Callable[[Message, SentTo], Checked]
                     ) -> dict[int, Checked]:
    """What ``check`` makes of the first reply to each message in ``sent``, by partition id,
    in the order the replies came. An error reply, or no reply (``timeout`` seconds, the
    ``round-timeout``), is recorded as failed; a reply that ``check`` rejects
    (``RejectedReply``) as rejected; a reply from a node that was not asked as refused (and
    logged, for ``what``: "round 3")."""
    by_message = {s.message_id: s for s in sent.values() if s.message_id}
    by_node = {s.node_id: s for s in sent.values()}
    accepted: dict[int, Checked] = {}
    for reply in replies:
        target = _addressee(reply, by_message, by_node)
        if target is None:
            node = reply.metadata.src_node_id
            record.refused[node] = "sent a reply it was not asked for; ignored"
            log(WARNING, "%s: a reply from node %s, which was not asked, ignored", what, node)
            continue
        pid = target.partition_id
        if pid in accepted or pid in record.rejected or pid in record.failed:
            continue  # a second reply for the same message
        if reply.has_error():
            who = "SuperLink" if reply.metadata.src_node_id != target.node_id else "client"
            record.failed[pid] = f"{who} error: {' '.join(reply.error.reason.split())}"
            continue
        try:
            accepted[pid] = check(reply, target)
        except RejectedReply as err:
            record.rejected[pid] = str(err)
    for pid in sent:
        if pid not in accepted and pid not in record.rejected and pid not in record.failed:
            record.failed[pid] = f"no reply within round-timeout={timeout:g} s"
    return accepted


class TieredStrategy:
    """One training round of a tiered method: sample partition ids, send each sampled
    client its tier's trainable parameters (and its state kept on the server, from
    ``client_store``), check every reply (``replies.checked_update``), merge the usable ones
    with the method's server update, store the states they return, and record who took part.
    Without a ``client_store`` the states are kept in memory (``ClientStateStore(None)``).

    The ServerApp drives the rounds itself (rather than Flower's ``Strategy.start``) so that
    it can start at any round (resume), save a checkpoint after each, and look for new
    SuperNodes before each."""

    def __init__(self, cfg: RunConfig, method: Method, roster: Roster,
                 client_store: ClientStateStore | None = None) -> None:
        self.cfg = cfg
        self.method = method
        self.roster = roster
        self.client_store = ClientStateStore() if client_store is None else client_store
        self.last_train_metrics: dict[str, float] = {}

    def configure_train(self, server_round: int, global_state: dict[str, torch.Tensor],
                        online: set[int], record: RoundRecord) -> tuple[
                            list[Message], dict[int, SentTo]]:
        """The round's messages (one per sampled partition whose node is online) and what
        each was sent; a sampled partition without an online node is recorded as failed."""
        lr = server_learning_rate(server_round - 1, self.cfg)
        participants = round_participants(self.cfg, server_round, self.roster.tiers,
                                          self.method.takes_part)
        record.sampled = participants
        if not participants:
            log(INFO, "round %s: no sampled client takes part in %s; round skipped, the "
                "global model is unchanged", server_round, self.cfg.method)
        return self.client_messages(participants, global_state,
                                    {"lr": lr, "server-round": server_round}, "train",
                                    online, record)

    def client_messages(self, partition_ids: list[int], global_state: dict[str, torch.Tensor],
                        config: dict[str, int | float], message_type: str, online: set[int],
                        record: RoundRecord) -> tuple[list[Message], dict[int, SentTo]]:
        """One ``message_type`` message per partition in ``partition_ids`` whose node is
        ``online``: its tier's payload of ``global_state``, ``config``, and its state kept on
        the server (if any); and what each was sent. A partition without an online node is
        recorded as failed."""
        messages, sent = [], {}
        for pid in partition_ids:
            info = self.roster.clients[pid]
            if info.node_id not in online:
                record.failed[pid] = ("no SuperNode holds it" if info.node_id == NO_NODE
                                      else f"its SuperNode (node {info.node_id}) is gone")
                continue
            payload = self.method.client_payload(global_state, info.tier)
            content = RecordDict({"arrays": ArrayRecord(payload),
                                  "config": ConfigRecord(config)})
            client_state = self.client_store.get(pid)
            if client_state:
                content["client-state"] = ArrayRecord(client_state)
            messages.append(Message(content, dst_node_id=info.node_id,
                                    message_type=message_type))
            sent[pid] = SentTo(pid, info.node_id, info.tier, info.num_examples, payload)
        return messages, sent

    def aggregate_train(self, server_round: int, global_state: dict[str, torch.Tensor],
                        replies: Iterable[Message], sent: dict[int, SentTo],
                        record: RoundRecord) -> dict[str, torch.Tensor] | None:
        """The new global state from the usable replies, or None when no reply survived
        (the model is unchanged and the log says so)."""
        self.last_train_metrics = {}
        checked = accepted_replies(
            replies, sent, record, f"round {server_round}", self.cfg.round_timeout,
            lambda reply, target: checked_update(reply, target,
                                                 self.method.keeps_client_state))
        updates, states = [], {}
        for pid, (update, state) in checked.items():
            if bound_update(update, sent[pid].payload, self.cfg.max_update_norm):
                record.clipped.append(pid)
            updates.append(update)
            states[pid] = state
            record.used.append(pid)
        for pid, reason in sorted({**record.failed, **record.rejected}.items()):
            log(WARNING, "round %s: client %s not used: %s", server_round, pid, reason)
        if not updates:
            if sent:
                log(WARNING, "round %s: no reply survived; the global model is unchanged",
                    server_round)
            return None
        updates.sort(key=lambda u: u.partition_id)
        for pid, state in states.items():
            if state:
                self.client_store.put(pid, server_round, state)
        self.last_train_metrics = weighted_metrics(updates)
        if self.method.privacy.on:  # the round's noise, seeded by (seed, round)
            self.method.privacy.start_round(server_round)
        return self.method.aggregate(global_state, updates)

    def run_round(self, grid: Grid, server_round: int, global_state: dict[str, torch.Tensor],
                  record: RoundRecord) -> dict[str, torch.Tensor] | None:
        """Look for new nodes, then configure, send, receive and aggregate one round."""
        online = set(grid.get_node_ids())
        if online - {c.node_id for c in self.roster.clients.values()} - set(
                self.roster.refused):
            record.joined, record.refused = self.roster.discover(
                grid, online, self.cfg.roll_call_timeout)
        messages, sent = self.configure_train(server_round, global_state, online, record)
        replies, sent = self.exchange(grid, messages, sent)
        return self.aggregate_train(server_round, global_state, replies, sent, record)

    def exchange(self, grid: Grid, messages: list[Message], sent: dict[int, SentTo]
                 ) -> tuple[list[Message], dict[int, SentTo]]:
        """Send ``messages`` (made by ``client_messages``) and wait at most ``round-timeout``
        seconds; returns the replies and ``sent`` with each message's id, which the replies
        name (``accepted_replies``)."""
        replies = _send(grid, messages, self.cfg.round_timeout)
        return replies, {pid: replace(target, message_id=message.metadata.message_id)
                         for message, (pid, target) in zip(messages, sent.items(), strict=True)}

    def summary(self) -> None:
        tiers = list(self.roster.tiers.values())
        log(INFO, "TieredStrategy: %s clients, tiers %s, fraction-train %s",
            len(tiers), {t: tiers.count(t) for t in sorted(set(tiers))},
            self.cfg.fraction_train)
