"""Checked replies and nodes that come and go: every bad reply is rejected or survived, the
server never crashes, the model stays finite, and metrics.jsonl says what happened. The
clients are the real ClientApp handlers, in process (``federation.local.LocalGrid``), with a
hook that spoils one client's reply."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from safetensors.torch import load_file

from reefl.config import RunConfig
from reefl.federation.local import LocalGrid, run_local
from reefl.federation.replies import bound_update
from reefl.methods import ClientUpdate

TINY = {"num-clients": 3, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 1, "eval-every": 1, "fraction-train": 1.0, "local-epochs": 1,
        "seed": 4, "train-examples": 300, "test-examples": 100, "batch-size": 16}
BAD = 1  # the partition whose reply is spoiled


def _config(tmp_path: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY, **extra, "output-dir": str(tmp_path),
                                "run-name": "run"})


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _set_tensor(reply: Message, change: Callable[[dict[str, torch.Tensor]], None]) -> Message:
    state = reply.content["arrays"].to_torch_state_dict()
    change(state)
    reply.content["arrays"] = ArrayRecord(state)
    return reply


def _first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point())


def _nan(state: dict[str, torch.Tensor]) -> None:
    state[_first_float(state)].view(-1)[0] = float("nan")


def _inf(state: dict[str, torch.Tensor]) -> None:
    state[_first_float(state)].view(-1)[-1] = float("inf")


def _shape(state: dict[str, torch.Tensor]) -> None:
    key = _first_float(state)
    state[key] = torch.zeros(state[key].numel() + 1)


def _dtype(state: dict[str, torch.Tensor]) -> None:
    key = _first_float(state)
    state[key] = state[key].double()


def _extra(state: dict[str, torch.Tensor]) -> None:
    state["backdoor.weight"] = torch.zeros(3)


def _missing(state: dict[str, torch.Tensor]) -> None:
    del state[next(iter(state))]


def _count(value: Any) -> Callable[[Message], Message]:
    def spoil(reply: Message) -> Message:
        metrics = dict(reply.content["metrics"])
        if value is None:
            del metrics["num-examples"]
        else:
            metrics["num-examples"] = value
        reply.content["metrics"] = MetricRecord(metrics)
        return reply
    return spoil


def _raise(reply: Message) -> Message:
    raise RuntimeError("out of memory (injected)")


def _superlink_error(reply: Message) -> Message:
    """What the SuperLink delivers when the node went offline: an error reply to the
    message, sent by the SuperLink (node id 1), not by the node."""
    error = Message(Error(code=1, reason="node went offline (injected)"), reply_to=reply)
    error.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
    error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return error


def _nan_metric(reply: Message) -> Message:
    metrics = dict(reply.content["metrics"])
    metrics["train-loss"] = float("nan")
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


SPOILERS: dict[str, tuple[Callable[[Message], Message | None], str, str]] = {
    # name: (what the bad client does, where it is recorded, words of the reason)
    "raises": (_raise, "failed", "out of memory"),
    "times-out": (lambda reply: None, "failed", "no reply within round-timeout"),
    "node-gone": (_superlink_error, "failed", "SuperLink error: node went offline"),
    "nan": (lambda r: _set_tensor(r, _nan), "rejected", "non-finite"),
    "inf": (lambda r: _set_tensor(r, _inf), "rejected", "non-finite"),
    "wrong-shape": (lambda r: _set_tensor(r, _shape), "rejected", "has shape"),
    "wrong-dtype": (lambda r: _set_tensor(r, _dtype), "rejected", "dtype"),
    "extra-key": (lambda r: _set_tensor(r, _extra), "rejected", "1 unexpected"),
    "missing-key": (lambda r: _set_tensor(r, _missing), "rejected", "1 missing"),
    "zero-count": (_count(0), "rejected", "num-examples"),
    "negative-count": (_count(-100), "rejected", "num-examples"),
    "huge-count": (_count(10**9), "rejected", "num-examples"),
    "nan-count": (_count(float("nan")), "rejected", "num-examples"),
    "fractional-count": (_count(10.5), "rejected", "num-examples"),
    "missing-count": (_count(None), "rejected", "no num-examples"),
    "nan-metric": (_nan_metric, "rejected", "train-loss"),
}


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The one-round model when client BAD's reply is simply not there."""
    tmp = tmp_path_factory.mktemp("clean")
    cfg = _config(tmp)
    grid = LocalGrid(cfg, _spoil_train(lambda reply: None))
    return load_file(str(run_local(cfg, grid) / "model.safetensors"))


def _spoil_train(spoil: Callable[[Message], Message | None]
                 ) -> Callable[[int, Message], Message | None]:
    def hook(pid: int, reply: Message) -> Message | None:
        if pid == BAD and reply.metadata.message_type == "train":
            return spoil(reply)
        return reply
    return hook


@pytest.mark.parametrize("name", list(SPOILERS))
def test_a_bad_reply_is_recorded_and_left_out(name: str, tmp_path: Path,
                                              clean_model: dict[str, torch.Tensor]) -> None:
    spoil, where, reason = SPOILERS[name]
    cfg = _config(tmp_path)
    run_dir = run_local(cfg, LocalGrid(cfg, _spoil_train(spoil)))
    (record,) = _records(run_dir)
    clients = record["clients"]
    assert clients["sampled"] == [0, 1, 2] and clients["used"] == [0, 2]
    assert reason in clients[where][str(BAD)]
    assert record["model_updated"] is True
    model = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert all(torch.equal(model[k], clean_model[k]) for k in model)  # as if it never replied
    final = json.loads((run_dir / "final.json").read_text())
    assert final["clients"][where] == 1 and final["clients"]["used"] == 2


def test_a_round_without_a_usable_reply_leaves_the_model_unchanged(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"num-server-rounds": 2})
    grid = LocalGrid(cfg, lambda pid, reply: _set_tensor(reply, _nan)
                     if reply.metadata.message_type == "train" else reply)
    run_dir = run_local(cfg, grid)
    records = _records(run_dir)
    assert [r["model_updated"] for r in records] == [False, False]
    assert all(r["clients"]["used"] == [] for r in records)
    model = load_file(str(run_dir / "model.safetensors"))
    from reefl.federation.inputs import run_data
    from reefl.methods import build_method

    initial = build_method(cfg, run_data(cfg)[2]).initial_state()
    assert all(torch.equal(model[k], initial[k]) for k in model)
    assert json.loads((run_dir / "final.json").read_text())["clients"]["rounds_unchanged"] == 2


def test_a_reply_from_a_node_that_was_not_asked_is_ignored(tmp_path: Path) -> None:
    cfg = _config(tmp_path)

    def impostor(pid: int, reply: Message) -> Message:
        if pid == BAD and reply.metadata.message_type == "train":
            reply.metadata.__dict__["_src_node_id"] = 999
        return reply

    (record,) = _records(run_local(cfg, LocalGrid(cfg, impostor)))
    assert record["clients"]["used"] == [0, 2]
    assert "not asked" in record["nodes"]["refused"]["999"]
    assert "no reply" in record["clients"]["failed"][str(BAD)]


def test_a_duplicate_partition_id_is_refused_for_the_newcomer(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"num-server-rounds": 2})
    grid = LocalGrid(cfg)

    def newcomer(record: dict[str, Any]) -> None:
        if record["round"] == 1:
            grid.add_node(77, {"partition-id": 0}, cfg.to_flat())

    run_dir = run_local(cfg, grid, on_round=newcomer)
    first, second = _records(run_dir)
    assert "held by node 1" in second["nodes"]["refused"]["77"]
    assert second["clients"]["used"] == [0, 1, 2]  # the run goes on with node 1


def test_a_node_that_leaves_and_returns_is_used_again(tmp_path: Path) -> None:
    """Partition 1's SuperNode goes away after round 1 and comes back (a new node id, as
    after a restart) after round 2: round 2 records it as gone, round 3 uses it again."""
    cfg = _config(tmp_path, **{"num-server-rounds": 3})
    grid = LocalGrid(cfg)
    old_node = 1 + BAD

    def churn(record: dict[str, Any]) -> None:
        if record["round"] == 1:
            grid.online.discard(old_node)
        if record["round"] == 2:
            grid.add_node(50, {"partition-id": BAD, "num-partitions": 3}, cfg.to_flat())

    records = _records(run_local(cfg, grid, on_round=churn))
    assert records[1]["clients"]["used"] == [0, 2]
    assert "gone" in records[1]["clients"]["failed"][str(BAD)]
    assert records[2]["nodes"]["joined"] == {str(BAD): 50}
    assert records[2]["clients"]["used"] == [0, 1, 2]


def test_update_norm_bound_shrinks_only_long_updates() -> None:
    """Δ = (3, 4) has norm 5: bound 1 makes it (0.6, 0.8); bound 10 leaves it."""
    sent = {"w": torch.tensor([1.0, 1.0])}
    long = ClientUpdate(0, 0, {"w": torch.tensor([4.0, 5.0])}, 10)
    assert bound_update(long, sent, 1.0)
    assert torch.allclose(long.state["w"], torch.tensor([1.6, 1.8]))
    short = ClientUpdate(0, 0, {"w": torch.tensor([4.0, 5.0])}, 10)
    assert not bound_update(short, sent, 10.0)
    assert torch.equal(short.state["w"], torch.tensor([4.0, 5.0]))
    assert not bound_update(short, sent, 0.0)  # 0: off
    assert math.isclose(float((long.state["w"] - sent["w"]).norm()), 1.0, rel_tol=1e-6)


def test_max_update_norm_is_recorded(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"max-update-norm": 1e-6})
    (record,) = _records(run_local(cfg))
    assert record["clients"]["clipped"] == [0, 1, 2]
