"""Experiment tracking (``tracking``, outputs/tracking.py): every round's metrics reach
TensorBoard, MLflow and W&B (offline) exactly once, also across a resume, read back through
each tool's own reader; ``tracking`` off writes nothing new; the key is checked before
anything starts."""

from __future__ import annotations

import dataclasses
import glob
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from reefl.config import ConfigError, RunConfig
from reefl.federation.local import run_local
from reefl.outputs import tracking
from reefl.outputs.run_folder import config_digest
from reefl.outputs.tracking import Trackers, scalars

TINY_RUN = {"num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
            "num-server-rounds": 4, "eval-every": 2, "fraction-train": 0.5, "local-epochs": 1,
            "train-examples": 400, "test-examples": 100, "seed": 1}
TRACKING_FILES = {"tensorboard", "mlruns", "wandb", "tracking.json"}


class Stop(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _config(tmp_path: Path, name: str, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY_RUN, **extra, "output-dir": str(tmp_path),
                                "run-name": name})


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- what a record becomes ----------------------------------------------------------------
def test_a_record_becomes_named_numbers() -> None:
    record = {"round": 3, "lr": 0.001, "train-loss": 2.5, "model_updated": True,
              "exit_accuracy": [40.0, 55.5], "mean_accuracy": 47.75, "dp_epsilon": 1.2,
              "diverged": "training is not finite", "round_seconds": float("nan"),
              "clients": {"sampled": [0, 2], "used": [0], "failed": {"2": "timeout"},
                          "rejected": {}, "clipped": []}}
    assert scalars(record) == {
        "lr": 0.001, "train-loss": 2.5, "model_updated": 1.0, "exit_accuracy/exit0": 40.0,
        "exit_accuracy/exit1": 55.5, "mean_accuracy": 47.75, "dp_epsilon": 1.2,
        "clients/sampled": 2.0, "clients/used": 1.0, "clients/failed": 1.0,
        "clients/rejected": 0.0, "clients/clipped": 0.0}


# -- the key ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["tensorbored", "mlflow,", "mlflow,mlflow", ",", "csv"])
def test_a_bad_tracking_value_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat({"tracking": value})
    assert str(err.value) == ('tracking must be "" (off) or a comma-separated list of '
                              f"tensorboard, mlflow, wandb, each once; got '{value}'")


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^tracking: mlflow needs `pip install "
                                          r"'reefl\[mlflow\]'`$"):
        RunConfig.from_flat({"tracking": "mlflow"})
    assert RunConfig.from_flat({"tracking": ""}).tracker_list == []


def test_tracking_is_not_part_of_the_config_digest() -> None:
    plain = RunConfig.from_flat({})
    assert config_digest(dataclasses.replace(plain, tracking="tensorboard")) == \
        config_digest(plain)


def test_tracking_off_writes_nothing_new(tmp_path: Path) -> None:
    run_dir = run_local(_config(tmp_path, "off", **{"num-server-rounds": 1}))
    assert not {p.name for p in run_dir.iterdir()} & TRACKING_FILES


# -- TensorBoard and MLflow across a resume -------------------------------------------------
def _tensorboard_steps(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar's (step, value) as TensorBoard shows it, and also as the event files
    hold it (no round written twice, purged or not)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logdir = run_dir / "tensorboard"
    shown = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    shown.Reload()
    steps = {tag: [(e.step, e.value) for e in shown.Scalars(tag)]
             for tag in shown.Tags()["scalars"]}
    raw: dict[str, list[int]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                raw.setdefault(value.tag, []).append(event.step)
    assert {tag: sorted(s for s, _ in pairs) for tag, pairs in steps.items()} == \
        {tag: sorted(s) for tag, s in raw.items() if tag in steps}
    return steps


def test_tensorboard_and_mlflow_get_every_round_once_across_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after round 3's checkpoint, before its metrics reached the trackers (the
    worst moment): the resumed run sends round 3 from metrics.jsonl, then round 4, and each
    tool holds rounds 1-4 once, with metrics.jsonl's values."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _config(tmp_path, "tracked", tracking="tensorboard,mlflow")
    real_log = Trackers.log

    def stop_at_round_3(self: Trackers, record: dict[str, Any]) -> None:
        if record["round"] == 3:
            raise Stop
        real_log(self, record)

    monkeypatch.setattr(Trackers, "log", stop_at_round_3)
    with pytest.raises(Stop):
        run_local(cfg)
    monkeypatch.setattr(Trackers, "log", real_log)
    state = json.loads((tmp_path / "tracked" / tracking.STATE_FILE).read_text())
    assert state["rounds"] == {"tensorboard": 2, "mlflow": 2}
    run_dir = run_local(dataclasses.replace(cfg, resume=True))

    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    expected = {r["round"]: scalars(r) for r in records}
    assert {"exit_accuracy/exit1", "mean_accuracy", "clients/used"} <= set(expected[4])

    steps = _tensorboard_steps(run_dir)
    for tag in ("lr", "train-loss", "clients/used", "round_seconds"):
        assert [s for s, _ in steps[tag]] == [1, 2, 3, 4], tag
    assert [s for s, _ in steps["mean_accuracy"]] == [2, 4]  # eval-every 2
    for tag, pairs in steps.items():
        for step, value in pairs:
            assert value == pytest.approx(expected[step][tag], rel=1e-6), (tag, step)

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "1"
    assert run.data.params["tracking"] == "tensorboard,mlflow"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run, resumed
    for key in expected[4]:
        history = client.get_metric_history(run.info.run_id, key)
        rounds = [r for r in expected if key in expected[r]]
        assert sorted(m.step for m in history) == rounds, key
        assert {m.step: m.value for m in history} == {r: expected[r][key] for r in rounds}


# -- W&B offline ------------------------------------------------------------------------
def _wandb_history(path: str) -> list[dict[str, Any]]:
    """The history rows of an offline ``.wandb`` file (LevelDB's log format after W&B's
    7-byte header: 32 KiB blocks of records with a 7-byte header of their own)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, pos, part = Path(path).read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_gets_every_round_once(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    run_dir = run_local(_config(tmp_path, "wandb", tracking="wandb"))
    state = json.loads((run_dir / tracking.STATE_FILE).read_text())
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{state['wandb_run_id']}"
                                                               ".wandb"))
    assert len(files) == 1
    rows = _wandb_history(files[0])
    records = _records(run_dir)
    assert [row["_step"] for row in rows] == [r["round"] for r in records] == [1, 2, 3, 4]
    for row, record in zip(rows, records, strict=True):
        assert {k: row[k] for k in scalars(record)} == pytest.approx(scalars(record))
