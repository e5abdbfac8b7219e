"""State you can trust: every file a resume reads (the checkpoint, config.json, the FedDyn
client states it names) is checked against the digests recorded when it was written, before
Flower starts; a changed bit, a truncation, a missing state or another config is one line
naming the file (exit code 2). Temporary files a killed write left are removed on resume,
a moved run folder resumes in its new place, and a checkpoint of an older reefl (no
digests) resumes with a warning. Real run folders come from the in-process driver."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reefl import cli
from reefl.config import RunConfig
from reefl.federation.checkpoint import CHECKPOINT_NAME
from reefl.federation.client_store import STORE_DIR
from reefl.federation.local import run_local
from reefl.launch import run_config, simulation
from reefl.launch.errors import RunConfigError
from reefl.launch.run_config import PreparedRun
from reefl.outputs.files import DIGEST_KEY
from reefl.outputs.run_folder import config_digest

FEDDYN = {"method": "depthfl", "server-update": "feddyn", "num-clients": 4, "num-exits": 2,
          "depth": 2, "embed-dim": 16, "num-heads": 2, "num-server-rounds": 4,
          "eval-every": 2, "fraction-train": 0.5, "local-epochs": 1, "seed": 3,
          "train-examples": 400, "test-examples": 100, "batch-size": 16}


class Stop(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _config(output_dir: Path, name: str) -> RunConfig:
    return RunConfig.from_flat({**FEDDYN, "output-dir": str(output_dir), "run-name": name})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A whole FedDyn run's model, and a run folder stopped after round 2 (kept pristine as
    a copy, to restore)."""
    root = tmp_path_factory.mktemp("runs")
    whole = load_file(str(run_local(_config(root, "whole")) / "model.safetensors"))

    def stop_after_2(line: dict[str, Any]) -> None:
        if line["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_local(_config(root, "cut"), on_round=stop_after_2)
    shutil.copytree(root / "cut", root / "pristine")
    return {"whole": whole, "cut": root / "cut", "pristine": root / "pristine"}


@pytest.fixture
def cut(runs: dict[str, Any]) -> Path:
    """The stopped run, in the place it ran in, as the run left it."""
    shutil.rmtree(runs["cut"])
    shutil.copytree(runs["pristine"], runs["cut"])
    return runs["cut"]


@pytest.fixture
def moved(runs: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the stopped run in another place than config.json names."""
    folder = tmp_path / "moved"
    shutil.copytree(runs["pristine"], folder)
    return folder


@pytest.fixture
def no_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(prepared: PreparedRun, federation: object, log: object) -> tuple[int, str]:
        raise AssertionError("Flower was started")

    monkeypatch.setattr(simulation, "_run_flower", refuse)


def _refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``reefl run --resume folder``: exit code 2 and one error line, which is returned."""
    assert cli.main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reefl: error: --resume: ") and err.count("\n") == 1, err
    return err


def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _client_state(folder: Path) -> Path:
    return sorted((folder / STORE_DIR).glob("*.safetensors"))[0]


@pytest.mark.parametrize("at", [0.02, 0.5, 0.999], ids=["header", "middle", "end"])
def test_a_flipped_bit_in_the_checkpoint_is_one_line(
        cut: Path, at: float, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    _flip_bit(cut / CHECKPOINT_NAME, at)
    err = _refused(cut, capsys)
    assert f"{cut / CHECKPOINT_NAME} is damaged" in err or f"{cut / CHECKPOINT_NAME} " in err


def test_a_truncated_checkpoint_is_one_line(
        cut: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    _truncate(cut / CHECKPOINT_NAME)
    assert f"{cut / CHECKPOINT_NAME} is damaged: truncated" in _refused(cut, capsys)


@pytest.mark.parametrize("damage", [_flip_bit, _truncate], ids=["flipped-bit", "truncated"])
def test_a_damaged_client_state_is_one_line(
        cut: Path, damage: Any, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    state = _client_state(cut)
    damage(state)
    assert f"{state} is damaged" in _refused(cut, capsys)


def test_a_client_state_swapped_for_another_whole_file_is_one_line(
        cut: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    """A whole, self-consistent file that is not the one the checkpoint recorded."""
    state = _client_state(cut)
    tensors = load_file(str(state))
    save_file({k: v + 1 for k, v in tensors.items()}, str(state))
    assert f"{state} is not the client state the checkpoint recorded" in _refused(cut, capsys)


def test_a_missing_client_state_is_one_line(
        cut: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    state = _client_state(cut)
    state.unlink()
    assert f"{state} is missing" in _refused(cut, capsys)


@pytest.mark.parametrize("edit", [
    lambda flat: {**flat, "num-server-rounds": 6},
    lambda flat: {**flat, "lr-max": flat["lr-max"] * 2},
], ids=["rounds", "lr-max"])
def test_an_edited_config_is_one_line(
        cut: Path, edit: Any, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    config = cut / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    assert f"{config} is not the config the run was saved with" in _refused(cut, capsys)


def test_a_flipped_bit_in_config_json_is_one_line(
        cut: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    """A flip that still parses (a digit of the seed): the config's digest names it."""
    config = cut / "config.json"
    text = config.read_text()
    assert '"seed": 3' in text
    config.write_text(text.replace('"seed": 3', '"seed": 7'))  # 0x33 ^ 0x04
    assert f"{config} is not the config the run was saved with" in _refused(cut, capsys)


def test_the_server_app_checks_too(cut: Path) -> None:
    """Defence in depth: a resume that does not come through the launcher (here the
    in-process driver) refuses a damaged client state before any round."""
    state = _client_state(cut)
    _flip_bit(state)
    cfg = dataclasses.replace(_config(cut.parent, cut.name), resume=True)
    with pytest.raises(RuntimeError, match=f"^{state} is damaged"):
        run_local(cfg, on_round=lambda line: pytest.fail("a round ran"))


def test_orphaned_temporary_files_are_removed_on_resume(cut: Path) -> None:
    orphans = [cut / ".checkpoint.safetensors.k2j4x9.partial", cut / ".tmpAbC123",
               cut / STORE_DIR / ".1.r3.safetensors.x1y2z3.partial",
               cut / STORE_DIR / ".tmpXyZ789"]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    (cut / ".model.safetensors.q1w2e3.partial").mkdir()
    kept = [cut / "notes.txt", cut / ".tmp", cut / "x.partial"]
    for path in kept:
        path.write_text("mine")
    run_config.prepare_resumable([], cut)
    assert not any(p.exists() for p in orphans)
    assert not (cut / ".model.safetensors.q1w2e3.partial").exists()
    assert all(p.exists() for p in kept)


def test_a_moved_run_folder_resumes_in_its_new_place(runs: dict[str, Any], moved: Path
                                                     ) -> None:
    """A copy in another place than config.json names resumes there, and ends with the
    model of an unstopped run."""
    assert json.loads((moved / "config.json").read_text())["output-dir"] != str(moved.parent)
    prepared = run_config.prepare_resumable([], moved)
    assert prepared.run_dir == moved and prepared.warnings == ()
    assert prepared.config["output-dir"] == str(moved.parent)
    resumed = load_file(str(run_local(RunConfig.from_flat(prepared.config))
                            / "model.safetensors"))
    assert set(resumed) == set(runs["whole"])
    assert all(torch.equal(resumed[k], runs["whole"][k]) for k in resumed)


def _as_older_reefl(folder: Path, started_in: Path) -> None:
    """Rewrite ``folder``'s checkpoint as reefl wrote it before digests: format 2, no
    digests, a config digest that covers the place the run started in."""
    path = folder / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as stream:
        metadata = dict(stream.metadata())
        tensors = {k: stream.get_tensor(k) for k in stream.keys()}  # noqa: SIM118
    for key in (DIGEST_KEY, "config_sha256", "client_digests"):
        del metadata[key]
    metadata["format"] = "reefl-checkpoint-2"
    metadata["config_digest"] = config_digest(_config(started_in.parent, started_in.name),
                                              legacy=True)
    save_file(tensors, str(path), metadata=metadata)


def test_an_older_checkpoint_resumes_with_a_warning(cut: Path) -> None:
    _as_older_reefl(cut, cut)
    prepared = run_config.prepare_resumable([], cut)
    assert len(prepared.warnings) == 1 and "without digests" in prepared.warnings[0]


def test_an_older_checkpoint_in_a_moved_folder_says_where_it_belongs(
        runs: dict[str, Any], moved: Path) -> None:
    _as_older_reefl(moved, runs["cut"])
    with pytest.raises(RunConfigError,
                       match=f"move {moved} back to {runs['cut']} to resume it"):
        run_config.prepare_resumable([], moved)


def test_a_finished_run_of_an_older_reefl_is_still_reused(runs: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """final.json files written before the location left the digest keep being found
    (``reefl compare --resume`` reuses them) where the run is."""
    cfg = _config(tmp_path, "old")
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "final.json").write_text(json.dumps(
        {"config_digest": config_digest(cfg, legacy=True)}))
    prepared = run_config.prepare_run([f"{k}={json.dumps(v)}" for k, v in cfg.to_flat().items()
                                       if k in FEDDYN or k in ("output-dir", "run-name")],
                                      existing_ok=True)
    assert prepared.digest == config_digest(cfg) != prepared.legacy_digest
    assert run_config.finished_final(folder, prepared.digests) is not None
    assert run_config.finished_final(folder, prepared.digest) is None
