"""Checkpoint and resume: a run stopped after any round and resumed ends with exactly the
parameters of a run that was never stopped (in process, through the real ServerApp loop and
ClientApp handlers; ``test_launcher`` stops a real ``reefl run`` and resumes it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file

from reefl.config import RunConfig
from reefl.federation.checkpoint import CHECKPOINT_NAME, load_checkpoint
from reefl.federation.local import LocalGrid, run_local
from reefl.methods.aggregate import FedAdam
from reefl.outputs.run_folder import config_digest

TINY = {"num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 4, "eval-every": 2, "fraction-train": 0.5, "local-epochs": 1,
        "seed": 3, "train-examples": 400, "test-examples": 100, "batch-size": 16}


class Stop(BaseException):
    """Stands for SIGINT/SIGKILL: not an Exception, so nothing on the way catches it."""


def _config(tmp_path: Path, name: str, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY, **extra, "output-dir": str(tmp_path),
                                "run-name": name})


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _stop_after(last: int) -> Any:
    def on_round(record: dict[str, Any]) -> None:
        if record["round"] == last:
            raise Stop
    return on_round


@pytest.mark.parametrize("extra", [
    {},
    {"method": "depthfl", "server-update": "feddyn"},
    {"method": "inclusivefl", "server-update": "fedadam"},
    {"method": "scalefl", "server-update": "fedadam", "scalefl-widths": "0.5,1.0"},
], ids=["reefl", "depthfl-feddyn", "inclusivefl-fedadam", "scalefl-fedadam"])
def test_a_run_stopped_after_round_2_and_resumed_equals_an_unstopped_run(
        extra: dict[str, Any], tmp_path: Path) -> None:
    whole = _model(run_local(_config(tmp_path, "whole", **extra)))
    cut = _config(tmp_path, "cut", **extra)
    with pytest.raises(Stop):
        run_local(cut, on_round=_stop_after(2))
    saved = load_checkpoint(tmp_path / "cut", config_digest(cut))
    assert saved.round == 2
    if extra.get("server-update") in ("feddyn", "fedadam"):
        assert saved.server_state  # FedDyn's h, FedAdam's moments, InclusiveFL's momentum
    if extra.get("server-update") == "feddyn":
        assert saved.client_rounds  # FedDyn's g_i live on the server (client-states/)
    run_dir = run_local(dataclasses.replace(cut, resume=True))
    resumed = _model(run_dir)
    assert set(resumed) == set(whole)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    rounds = [json.loads(line)["round"]
              for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["config_digest"] == config_digest(cut)
    assert final["clients"]["sampled"] == 8 and final["clients"]["used"] == 8


def test_a_run_stopped_inside_a_round_redoes_that_round(tmp_path: Path) -> None:
    """Stopped while round 3 trains: the checkpoint is round 2's, metrics.jsonl keeps rounds
    1-2, and the resumed run ends as an unstopped one."""
    whole = _model(run_local(_config(tmp_path, "whole")))
    cut = _config(tmp_path, "cut")
    trained: list[int] = []

    def stop_in_round_3(pid: int, reply: Message) -> Message:
        if reply.metadata.message_type == "train":
            trained.append(pid)
            if len(trained) == 5:  # two clients a round: the first of round 3
                raise Stop
        return reply

    with pytest.raises(Stop):
        run_local(cut, LocalGrid(cut, stop_in_round_3))
    assert load_checkpoint(tmp_path / "cut", config_digest(cut)).round == 2
    resumed = run_local(dataclasses.replace(cut, resume=True))
    assert all(torch.equal(_model(resumed)[k], whole[k]) for k in whole)
    assert not list(resumed.glob("*.partial"))


def test_a_finished_run_folder_is_never_overwritten(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "done", **{"num-server-rounds": 1})
    run_local(cfg)
    before = (tmp_path / "done" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="already holds a run"):
        run_local(cfg)
    assert (tmp_path / "done" / "model.safetensors").read_bytes() == before


def test_resume_refuses_another_config_and_a_missing_checkpoint(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "a", **{"num-server-rounds": 1})
    run_local(cfg)
    other = dataclasses.replace(cfg, lr_max=0.01, resume=True)
    with pytest.raises(RuntimeError, match="another config"):
        run_local(other)
    with pytest.raises(RuntimeError, match="nothing to resume"):
        run_local(dataclasses.replace(cfg, run_name="never-run", resume=True))


def test_checkpoint_is_replaced_whole(tmp_path: Path) -> None:
    """Written to a temporary name and renamed: after a run only the checkpoint is there,
    and it reads back as the last round with the final model."""
    cfg = _config(tmp_path, "c", **{"num-server-rounds": 2})
    run_dir = run_local(cfg)
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == [
        CHECKPOINT_NAME]
    saved = load_checkpoint(run_dir, config_digest(cfg))
    model = _model(run_dir)
    assert saved.round == 2 and all(torch.equal(saved.global_state[k], model[k]) for k in model)
    assert set(saved.partitions) == {0, 1, 2, 3}


def test_fedadam_moments_round_trip() -> None:
    adam = FedAdam()
    state = {"w": torch.tensor([1.0, 2.0])}
    state = adam.step(state, {"w": torch.tensor([0.5, -0.5])})
    again = FedAdam()
    again.load_state_dict(adam.state_dict())
    delta = {"w": torch.tensor([0.25, 0.25])}
    assert torch.equal(adam.step(state, delta)["w"], again.step(state, delta)["w"])
    assert set(adam.state_dict()) == {"m/w", "v/w"}
