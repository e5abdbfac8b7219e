"""reefl run: the checks made before Flower starts, the failure check after it ran, and
``--resume``. Nothing here starts Flower: ``simulation._run_flower`` is refused or faked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from reefl import cli
from reefl.config import RunConfig
from reefl.launch import resources, run_config, simulation
from reefl.launch.errors import RunConfigError
from reefl.launch.run_config import PreparedRun
from reefl.models.checkpoints import CheckpointError, check_checkpoint_file
from reefl.outputs import run_folder
from test_launcher import make_app

REPO_APP = run_config._installed_repo_root()


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


@pytest.fixture
def no_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(prepared: PreparedRun, federation: object, log: object) -> tuple[int, str]:
        raise AssertionError("Flower was started")

    monkeypatch.setattr(simulation, "_run_flower", refuse)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("reefl: error: ") and err.count("\n") == 1, err
    return err


# -- --run-config and --federation-config ---------------------------------------------------


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("seed=", "'seed=' has no value"),  # Flower would silently keep the default
        ("num-server-rounds=2 seed=", "'seed=' has no value"),
        ("num-server-rounds=2 foo", "'foo' is not key=value (in 'num-server-rounds=2 foo')"),
    ],
)
def test_run_config_drops_nothing(item: str, fragment: str) -> None:
    from flwr.common.config import parse_config_args

    assert "seed" not in parse_config_args([item])  # what Flower makes of it
    with pytest.raises(RunConfigError, match="^--run-config: ") as error:
        run_config.parse_overrides([item])
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["num-supernodes=3"], "num-supernodes=3 differs from the run config's num-clients=4"),
        (["client-resources-num-cpus=0"], "client-resources-num-cpus must be at least 1; got '0'"),
        (["client-resources-num-gpus=-0.5"], "client-resources-num-gpus must be 0 or more"),
        (["num-supernodes=4 foo"], "'foo' is not key=value"),
        (["verbose"], "'verbose' is not key=value"),
    ],
)
def test_bad_federation_config_is_one_line(app: Path, items: list[str], fragment: str) -> None:
    with pytest.raises(RunConfigError, match="^--federation-config: |^--federation-config '"
                       ) as error:
        resources.federation_config(run_config.prepare_run([], app_dir=app).config, items)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_federation_config_matching_the_run_config_is_fine(app: Path) -> None:
    run = run_config.prepare_run(["num-clients=6"], app_dir=app)
    federation = resources.federation_config(run.config, [
        "num-supernodes=6 client-resources-num-cpus=1 client-resources-num-gpus=0.0"])
    assert federation["num-supernodes"] == 6


# -- output-dir -----------------------------------------------------------------------------


def test_output_dir_is_probed_and_left_clean(tmp_path: Path) -> None:
    simulation.check_output_dir(tmp_path / "new" / "out")
    assert list((tmp_path / "new" / "out").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunConfigError, match=f"^output-dir '{blocker / 'out'}' cannot be "
                                             "written: "):
        simulation.check_output_dir(blocker / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunConfigError, match="cannot be written: Permission denied"):
            simulation.check_output_dir(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_an_unwritable_output_dir_exits_2_before_flower(
        app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.main(["run", "--app", str(app), "-c", f"output-dir='{blocker / 'out'}'"])
    assert code == 2 and "output-dir" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ('dataset=""', "dataset must be a source name or a path, not empty"),
        ('output-dir=""', "output-dir must be a folder, not empty"),
        ("num-server-rounds=1000000000", "num-server-rounds must be an integer from 1 to "),
        ("img-size=7000", "img-size=7000 with batch-size=32: one training batch needs at "
                          "least ~268.4 GB"),
        ("batch-size=10000000", "batch-size=10000000 with img-size=28: one training batch "),
        ("seed=1180591620717411303424", "seed must be an integer from 0 to "),
        ("dirichlet-alpha=inf", "dirichlet-alpha must be a finite number > 0"),
    ],
)
def test_issue_24_values_start_nothing_and_write_nothing(
        override: str, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty output-dir or dataset would point
    monkeypatch.setattr("reefl.config.machine_memory", lambda: 16 * 10**9)
    assert cli.main(["run", "-c", override]) == 2
    assert one_error_line(capsys).startswith(f"reefl: error: {start}")
    assert not any(tmp_path.iterdir())


# -- run-name -------------------------------------------------------------------------------


def test_an_explicit_run_name_of_a_used_folder_is_refused(app: Path, tmp_path: Path) -> None:
    overrides = [f"run-name='mine' output-dir='{tmp_path / 'out'}'"]
    (tmp_path / "out" / "mine").mkdir(parents=True)
    assert run_config.prepare_run(overrides, app_dir=app).run_dir == tmp_path / "out" / "mine"
    (tmp_path / "out" / "mine" / "config.json").write_text("{}")
    with pytest.raises(RunConfigError, match="^run-name 'mine': .* already exists and is not "
                                             r"empty; continue that run with `reefl run "
                                             r"--resume .*` or choose another run-name$"):
        run_config.prepare_run(overrides, app_dir=app)
    assert run_config.prepare_run(overrides, app_dir=app, existing_ok=True)


# -- pretrained -----------------------------------------------------------------------------


def test_check_checkpoint_file_reads_only_headers(tmp_path: Path) -> None:
    import safetensors.torch
    import torch

    good = {"zip.pth": lambda p: torch.save({"w": torch.zeros(1)}, p),
            "legacy.pt": lambda p: torch.save({"w": torch.zeros(1)}, p,
                                              _use_new_zipfile_serialization=False),
            "t.safetensors": lambda p: safetensors.torch.save_file({"w": torch.zeros(1)}, p)}
    for name, write in good.items():
        write(str(tmp_path / name))
        check_checkpoint_file(tmp_path / name)
    bad = {"text.pth": b"not a checkpoint", "empty.bin": b"",
           "short.safetensors": b"\x05", "huge.safetensors": b"\xff" * 8 + b"{}",
           "notjson.safetensors": (5).to_bytes(8, "little") + b"{abc}",
           "list.safetensors": (2).to_bytes(8, "little") + b"[]"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"^checkpoint '{tmp_path / name}' is "):
            check_checkpoint_file(tmp_path / name)


def test_a_garbage_pretrained_file_exits_2_before_flower(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    garbage = tmp_path / "weights.pth"
    garbage.write_text("<html>404</html>")
    code = cli.main(["run", "-c", f"pretrained='{garbage}' output-dir='{tmp_path / 'out'}'"])
    err = one_error_line(capsys)
    assert code == 2 and err.startswith(f"reefl: error: pretrained: checkpoint '{garbage}' is ")


# -- after the run: success is a final.json of this run's config -----------------------------


def _prepared(tmp_path: Path, run_name: str = "r") -> PreparedRun:
    return run_config.prepare_run([f"output-dir='{tmp_path}' run-name='{run_name}'"],
                                app_dir=REPO_APP)


def _write_final(prepared: PreparedRun, **extra: Any) -> Path:
    prepared.run_dir.mkdir(parents=True, exist_ok=True)
    final = {"method": "reefl", "seed": 0, "rounds": 1, "wall_seconds": 1.0,
             "exit_blocks": [0], "exit_accuracy": [50.0], "exit_loss": [1.0],
             "mean_accuracy": 50.0, "ensemble_accuracy": 50.0, **extra}
    path = prepared.run_dir / "final.json"
    path.write_text(json.dumps(final))
    return path


def test_run_failure(tmp_path: Path) -> None:
    prepared = _prepared(tmp_path)
    started = time.time()
    assert simulation.run_failure(prepared, 1, started) == "flwr run exited with 1"
    assert simulation.run_failure(prepared, 0, started) == "no final.json written"
    path = _write_final(prepared)
    assert simulation.run_failure(prepared, 0, started) is None  # a ServerApp without digests
    os.utime(path, (started - 60, started - 60))
    assert simulation.run_failure(prepared, 0, started) == "no final.json written by this run"
    _write_final(prepared, config_digest="0123456789abcdef")
    assert simulation.run_failure(prepared, 0, started) == (
        f"final.json has config_digest 0123456789abcdef, not {prepared.digest} of this run's "
        "config")
    _write_final(prepared, config_digest=prepared.digest)
    assert simulation.run_failure(prepared, 0, started) is None


def test_a_server_app_failure_is_a_failure_though_flwr_run_exits_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(simulation, "_run_flower", lambda prepared, federation, log: (0, ""))
    code = cli.main(["run", "-q", "-c", f"output-dir='{tmp_path}' run-name='r'"])
    err = capsys.readouterr().err
    assert code == 1 and "run failed (no final.json written)" in err


def test_quiet_prints_only_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`reefl run -q`: no progress line, none of reefl's own lines; the final table."""

    def finished(prepared: PreparedRun, federation: object, log: object) -> tuple[int, str]:
        _write_final(prepared, config_digest=prepared.digest)
        return 0, ""

    monkeypatch.setattr(simulation, "_run_flower", finished)
    assert cli.main(["run", "-q", "-c", f"output-dir='{tmp_path}' run-name='r'"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[0] == "reefl · seed 0 · 1 round · 1 s of training"
    assert "mean" in captured.out and "reefl:" not in captured.out


# -- --resume ---------------------------------------------------------------------------------


def _interrupted_run(tmp_path: Path, checkpoint: bool = True) -> PreparedRun:
    """A run folder as the ServerApp leaves it when stopped after a round."""
    prepared = _prepared(tmp_path)
    prepared.run_dir.mkdir(parents=True)
    flat = RunConfig.from_flat(prepared.config).to_flat()
    (prepared.run_dir / "config.json").write_text(json.dumps(flat))
    if checkpoint:  # a real one: a resume checks it, and the config.json it recorded
        import torch

        from reefl.federation.checkpoint import Checkpoint, save_checkpoint
        from reefl.outputs.files import sha256_file

        assert prepared.digest is not None
        save_checkpoint(prepared.run_dir, Checkpoint(
            1, prepared.digest, {"w": torch.zeros(2)},
            config_sha256=sha256_file(prepared.run_dir / "config.json")))
    return prepared


def test_resume_runs_the_folders_own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    prepared = _interrupted_run(tmp_path)
    seen: list[PreparedRun] = []

    def fake_flower(resumed: PreparedRun, federation: object, log: object) -> tuple[int, str]:
        seen.append(resumed)
        _write_final(resumed, config_digest=resumed.digest)
        return 0, ""

    monkeypatch.setattr(simulation, "_run_flower", fake_flower)
    code = cli.main(["run", "--resume", str(prepared.run_dir),
                     "--federation-config", "client-resources-num-cpus=1"])
    assert code == 0 and len(seen) == 1
    resumed = seen[0]
    assert resumed.run_dir == prepared.run_dir and resumed.digest == prepared.digest
    assert resumed.overrides["resume"] is True
    assert resumed.overrides["run-name"] == "r" and resumed.overrides["output-dir"] == str(tmp_path)
    def settings(config: dict) -> dict:  # as the ServerApp reads them (method-options unpacked)
        return {k: v for k, v in RunConfig.from_flat(config).to_flat().items() if k != "resume"}

    assert settings(resumed.config) == settings(prepared.config)
    assert "ensemble" in capsys.readouterr().out


def test_resuming_a_finished_run_prints_its_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: None) -> None:
    prepared = _interrupted_run(tmp_path, checkpoint=False)
    _write_final(prepared, config_digest=prepared.digest)
    assert cli.main(["run", "--resume", str(prepared.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run {prepared.run_dir} has already finished" in out and "ensemble" in out


@pytest.mark.parametrize(
    ("setup", "extra", "fragment"),
    [
        ("empty", [], "has no readable config.json"),
        ("no-checkpoint", [], "has no checkpoint.safetensors"),
        ("other-final", [], "has no checkpoint.safetensors"),
        ("ok", ["-c", "seed=1"], "--run-config and --preset cannot be given with it"),
        ("ok", ["--preset", "cifar100-frozen-k4"], "--run-config and --preset cannot be given"),
    ],
)
def test_resume_errors_start_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: None,
        setup: str, extra: list[str], fragment: str) -> None:
    folder = tmp_path / "r"
    if setup == "empty":
        folder.mkdir()
    else:
        prepared = _interrupted_run(tmp_path, checkpoint=setup == "ok")
        if setup == "other-final":
            _write_final(prepared, config_digest="0123456789abcdef")
    assert cli.main(["run", "--resume", str(folder), *extra]) == 2
    assert fragment in one_error_line(capsys)


def test_ctrl_c_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(prepared: PreparedRun, federation: object, log: object) -> tuple[int, str]:
        prepared.run_dir.mkdir(parents=True, exist_ok=True)
        if prepared.run_dir.name == "saved":
            (prepared.run_dir / run_folder.CHECKPOINT_FILE).write_bytes(b"saved")
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "_run_flower", interrupted)
    for name, hint in (("saved", f"continue it with `reefl run --resume {tmp_path / 'saved'}`"),
                       ("early", f"no round was saved in {tmp_path / 'early'}")):
        code = cli.main(["run", "-q", "-c", f"output-dir='{tmp_path}' run-name='{name}'"])
        err = one_error_line(capsys)
        assert code == 130 and err.startswith("reefl: error: interrupted; all Flower processes "
                                              "stopped; ") and hint in err


def test_the_pair_pattern_is_flowers_own() -> None:
    """``run_config.FLOWER_PAIR`` finds the tokens Flower's parser would drop; it must be the
    very pattern of flwr.common.config.parse_config_args (local there, so copied)."""
    import inspect

    from flwr.common.config import parse_config_args

    source = inspect.getsource(parse_config_args)
    assert f're.compile(r"{run_config.FLOWER_PAIR.pattern}")' in source
