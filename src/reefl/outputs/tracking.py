"""Experiment tracking: every round's metrics.jsonl record and the run config, written through
TensorBoard's, MLflow's or Weights & Biases' own client library into the run folder, offline.

``open_trackers`` (called by the ServerApp once the run folder is open) gives a ``Trackers``
holding one writer per name of the run-config key ``tracking``:

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``torch.utils.tensorboard``), every
  scalar with the round as its step, the config as text;
- ``mlflow``: an MLflow file store in ``<run>/mlruns/`` (experiment ``reefl``, one MLflow run
  per reefl run), metrics with ``step=round``, the config as params;
- ``wandb``: a W&B run in offline mode in ``<run>/wandb/`` (``wandb sync`` uploads it), the
  config as its config, metrics with ``step=round``.

A resumed run continues the same curves: ``tracking.json`` in the run folder keeps the MLflow
and W&B run ids and the last round each tracker got; the resumed run first sends the rounds of
metrics.jsonl that a tracker missed (a run stopped between its checkpoint and the tracker),
then the new ones, so each round reaches each tracker once. The libraries are optional and
imported here only when a tracker is opened; ``RunConfig.validate`` checks that they are
installed.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

STATE_FILE = "tracking.json"
"""In the run folder: ``{"rounds": {tracker: last round sent}, "mlflow_run_id": ...,
"wandb_run_id": ...}``."""
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
WANDB_DIR = "wandb"  # wandb itself makes <dir>/wandb/, so the writer's dir is the run folder
MLFLOW_EXPERIMENT = "reefl"
MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as named numbers: every number (``lr``, ``train-loss``,
    ``mean_accuracy``, ``round_seconds``, ``dp_epsilon``, ...; a bool as 0/1) under its
    key; a list of numbers one per entry (``exit_accuracy/exit0``, ...); a dict (``clients``,
    ``nodes``) one count per entry (``clients/used``: how many). Text (``diverged``'s
    reason) and ``round`` (the step) are left out, as are non-finite numbers."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "round":
            continue
        if _is_number(value):
            out[key] = float(value)
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            prefix = "exit" if key.startswith("exit_") else ""
            out.update({f"{key}/{prefix}{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, dict):
            for name, entry in value.items():
                if _is_number(entry):
                    out[f"{key}/{name}"] = float(entry)
                elif isinstance(entry, (list, dict)):
                    out[f"{key}/{name}"] = float(len(entry))
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool is an int: model_updated → 0/1


class Tracker:
    """One tracker: ``log`` a round's scalars once, ``close`` at the end."""

    name = ""

    def log(self, server_round: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard/``; a resumed run adds a new file whose first event
    purges any step after the last round sent (so TensorBoard shows each round once even if
    an earlier process wrote a round and died before saying so)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], last_round: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        resumed = last_round is not None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR),
                                    purge_step=last_round + 1 if resumed else None)
        if not resumed:
            text = "\n".join(f"    {k} = {json.dumps(v)}" for k, v in config.items())
            self.writer.add_text("config", text, global_step=0)
            self.writer.flush()

    def log(self, server_round: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=server_round)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow file store in ``<run>/mlruns/``: one MLflow run per reefl run, created with
    the config as params and reused (by its id) when the run resumes."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None,
                 run_name: str) -> None:
        # MLflow 3 keeps the file store (no database, nothing to migrate) behind this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run_dir / MLFLOW_DIR).resolve().as_uri())
        if run_id is None:
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(MLFLOW_EXPERIMENT))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in config.items()]
            for start in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(run_id, params=params[start:start + MLFLOW_BATCH])
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id

    def last_logged_round(self) -> int:
        """The last step of ``lr`` (which every round has) in the store: 0 if none."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, "lr")),
                   default=0)

    def log(self, server_round: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, server_round) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    """A W&B run in offline mode under ``<run>/wandb/``; a resumed run reopens the same run
    id (``wandb sync`` puts both parts into one run)."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None,
                 run_name: str) -> None:
        import wandb

        settings = wandb.Settings(mode="offline", silent=True, console="off",
                                  x_disable_stats=True, save_code=False)
        self.run = wandb.init(project="reefl", name=run_name, dir=str(run_dir),
                              id=run_id or uuid.uuid4().hex[:8], resume="allow",
                              config=config, settings=settings)
        self.run_id = self.run.id

    def log(self, server_round: int, values: dict[str, float]) -> None:
        self.run.log(values, step=server_round)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The run's trackers (none when ``tracking`` is off): ``log`` each round's record once,
    then ``close``."""

    def __init__(self, run_dir: Path, trackers: list[Tracker], state: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.trackers = trackers
        self.state = state

    def log(self, record: dict[str, Any]) -> None:
        """Send ``record`` (a metrics.jsonl line) to every tracker that has not had its
        round, then note the round in tracking.json."""
        if not self.trackers:
            return
        server_round = int(record["round"])
        values = scalars(record)
        rounds = self.state.setdefault("rounds", {})
        for tracker in self.trackers:
            if rounds.get(tracker.name, 0) < server_round:
                tracker.log(server_round, values)
                rounds[tracker.name] = server_round
        self._save()

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []

    def _save(self) -> None:
        from reefl.outputs.files import atomic_write

        with atomic_write(self.run_dir / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2) + "\n")


def open_trackers(run_dir: Path, names: list[str], config: dict[str, Any], run_name: str,
                  earlier: list[dict[str, Any]]) -> Trackers:
    """The trackers ``names`` (``RunConfig.tracker_list``) for the run in ``run_dir``, which
    ``config`` (its flat config) describes; ``earlier``: metrics.jsonl's records so far (a
    resumed run's), of which each tracker is sent those it has not had yet."""
    if not names:
        return Trackers(run_dir, [], {})
    path = run_dir / STATE_FILE
    state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    rounds: dict[str, int] = state.setdefault("rounds", {})
    trackers: list[Tracker] = []
    opened = Trackers(run_dir, trackers, state)
    try:
        for name in names:
            last = rounds.get(name)
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, config, last))
            elif name == "mlflow":
                mlflow = MlflowTracker(run_dir, config, state.get("mlflow_run_id"), run_name)
                state["mlflow_run_id"] = mlflow.run_id
                trackers.append(mlflow)
                if last is not None:  # the store knows best what reached it
                    rounds[name] = max(last, mlflow.last_logged_round())
            elif name == "wandb":
                tracker = WandbTracker(run_dir, config, state.get("wandb_run_id"), run_name)
                state["wandb_run_id"] = tracker.run_id
                trackers.append(tracker)
            else:
                raise ValueError(f"unknown tracker {name!r}")
            rounds.setdefault(name, 0)
            opened._save()  # the run ids, before anything else may fail
        for record in earlier:
            opened.log(record)
    except BaseException:
        opened.close(failed=True)
        raise
    return opened
