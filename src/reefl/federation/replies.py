"""Checking a client's training reply before it reaches aggregation (and a personalised
evaluation's reply before it reaches personalised.json), and the record of who took part in
a round.

A reply is used only if it carries, for the tier it was sent, exactly the tensors it was sent
(names, shapes, dtypes), all finite, an integer example count in 1..the count the client gave
at the roll call, finite training metrics, and (when the method keeps per-client state on the
server) a finite client state of the sent tensors' names and shapes. Anything else is
rejected with a one-line reason; nothing in a reply can crash the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from reefl.methods import ClientUpdate

Tensors = dict[str, torch.Tensor]


class RejectedReply(Exception):
    """A reply that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True)
class SentTo:
    """What the server sent one client this round (to check its reply against)."""

    partition_id: int
    node_id: int
    tier: int
    max_examples: int
    payload: Tensors
    message_id: str = ""  # set once sent: what the reply's reply_to_message_id names


@dataclass
class RoundRecord:
    """Who took part in a round: partition ids sampled, used (reply aggregated), failed
    (no usable answer: timeout, error, node gone) or rejected (a reply that failed a check),
    each with its reason; updates shrunk to ``max-update-norm``; roster changes."""

    sampled: list[int] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: list[int] = field(default_factory=list)
    joined: dict[int, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``clients`` and ``nodes`` entries of the round's metrics.jsonl line."""
        return {
            "clients": {"sampled": self.sampled, "used": sorted(self.used),
                        "failed": _keyed(self.failed), "rejected": _keyed(self.rejected),
                        "clipped": sorted(self.clipped)},
            "nodes": {"joined": _keyed(self.joined), "refused": _keyed(self.refused)},
        }


def _keyed(mapping: dict[int, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in sorted(mapping.items())}


def checked_update(reply: Message, sent: SentTo, with_client_state: bool
                   ) -> tuple[ClientUpdate, Tensors]:
    """The reply as an update and the client's new state; RejectedReply otherwise."""
    content = reply.content
    arrays = _record(content, "arrays", ArrayRecord)
    metrics = _record(content, "metrics", MetricRecord)
    state = _tensors(arrays, "parameters")
    _same_layout(state, sent.payload, "parameters")
    num_examples = _example_count(metrics, sent.max_examples)
    train = {}
    for name, value in metrics.items():
        if name.startswith("train-"):
            if isinstance(value, list) or not math.isfinite(float(value)):
                raise RejectedReply(f"metric {name} is not a finite number")
            train[name] = float(value)
    client_state: Tensors = {}
    if with_client_state and "client-state" in content:
        client_state = _tensors(_record(content, "client-state", ArrayRecord), "client state")
        unknown = sorted(set(client_state) - set(sent.payload))
        if unknown:
            raise RejectedReply(f"client state has tensors it was not sent: {unknown[:3]}")
        _same_layout(client_state, {k: sent.payload[k] for k in client_state}, "client state")
    return (ClientUpdate(sent.partition_id, sent.tier, state, num_examples, train),
            client_state)


@dataclass(frozen=True)
class ClientAccuracies:
    """One client's personalised evaluation: the accuracy (%) of each of its tier's exits
    (``exits``, global indices) on its local test split, with the global model and after
    fine-tuning; both lists are empty when the split is."""

    partition_id: int
    tier: int
    exits: list[int]
    num_test_examples: int
    global_accuracy: list[float]
    personalised_accuracy: list[float]

    def as_json(self) -> dict[str, Any]:
        """The client's entry of personalised.json."""
        return {"partition_id": self.partition_id, "tier": self.tier, "exits": self.exits,
                "num_test_examples": self.num_test_examples,
                "global_accuracy": self.global_accuracy,
                "personalised_accuracy": self.personalised_accuracy}


ACCURACY_LISTS = ("global-accuracy", "personalised-accuracy")
"""The metrics of a personalised-evaluation reply, besides ``num-test-examples``."""


def checked_accuracies(reply: Message, sent: SentTo, exits: list[int]) -> ClientAccuracies:
    """A personalised-evaluation reply as accuracies: ``num-test-examples`` an integer
    >= 0, and each of ``ACCURACY_LISTS`` one percentage in [0, 100] per exit of ``exits``
    (none when there are no test examples); RejectedReply otherwise."""
    metrics = _record(reply.content, "metrics", MetricRecord)
    count = metrics.get("num-test-examples")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise RejectedReply(f"num-test-examples must be an integer >= 0; got {count!r}")
    want = len(exits) if count else 0
    lists = []
    for name in ACCURACY_LISTS:
        values = metrics.get(name)
        if not isinstance(values, list) or len(values) != want:
            raise RejectedReply(f"{name} must be a list of {want} accuracies; got {values!r}")
        if not all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in values):
            raise RejectedReply(f"{name} has values outside [0, 100]: {values!r}")
        lists.append([float(v) for v in values])
    return ClientAccuracies(sent.partition_id, sent.tier, exits, count, *lists)


def _record(content: Any, key: str, kind: type) -> Any:
    if key not in content:
        raise RejectedReply(f"no '{key}' in the reply")
    record = content[key]
    if not isinstance(record, kind):
        raise RejectedReply(f"'{key}' is not a {kind.__name__}")
    return record


def _tensors(record: ArrayRecord, what: str) -> Tensors:
    try:
        return record.to_torch_state_dict()
    except Exception as err:  # a malformed array: any error of the deserialiser
        raise RejectedReply(f"{what} cannot be read: {' '.join(str(err).split())[:120]}"
                            ) from None


def _same_layout(state: Tensors, sent: Tensors, what: str) -> None:
    """Same names, shapes and dtypes as sent, and every value finite."""
    missing, extra = sorted(set(sent) - set(state)), sorted(set(state) - set(sent))
    if missing or extra:
        raise RejectedReply(f"{what}: {len(missing)} missing {missing[:3]}, "
                            f"{len(extra)} unexpected {extra[:3]}")
    for name, tensor in state.items():
        want = sent[name]
        if tensor.shape != want.shape:
            raise RejectedReply(f"{what}: {name} has shape {tuple(tensor.shape)}, "
                                f"sent {tuple(want.shape)}")
        if tensor.dtype != want.dtype:
            raise RejectedReply(f"{what}: {name} has dtype {tensor.dtype}, sent {want.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RejectedReply(f"{what}: {name} has non-finite values")


def _example_count(metrics: MetricRecord, most: int) -> int:
    """``num-examples``: an integer in 1..``most`` (what the client said at the roll call)."""
    if "num-examples" not in metrics:
        raise RejectedReply("no num-examples in the metrics")
    value = metrics["num-examples"]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise RejectedReply(f"num-examples must be an integer in 1..{most}; got {value!r}")
    return value


def bound_update(update: ClientUpdate, sent: Tensors, max_norm: float) -> bool:
    """Shrink the update ``w_i − w_sent`` (all of a reply's tensors together) to L2 norm
    ``max_norm`` if it is longer: ``w_i ← w_sent + Δ·max_norm/‖Δ‖`` (norm bounding, a
    defence against a client that moves the model far). Returns whether it was shrunk;
    ``max_norm`` 0 turns the bound off."""
    if max_norm <= 0:
        return False
    deltas = {k: update.state[k].to(torch.float64) - sent[k].to(torch.float64)
              for k in update.state if update.state[k].is_floating_point()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    if norm <= max_norm:
        return False
    scale = max_norm / norm
    for key, delta in deltas.items():
        update.state[key] = (sent[key].to(torch.float64) + delta * scale).to(sent[key].dtype)
    return True
