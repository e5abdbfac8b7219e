"""A real ``reefl run`` (launcher, private SuperLink, Flower simulation) interrupted twice and
resumed: Ctrl-C (SIGINT to its process group, as a terminal sends it) once round 2 of 10 is
saved, then SIGKILL of the launcher alone (as a test timeout or the OOM killer would) once
the resumed run saved one more round; ``reefl run --resume`` finishes it. Its final
parameters equal an uninterrupted run's, tensor for tensor, and no Flower process is left
behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reefl.federation.checkpoint import CHECKPOINT_NAME

# Rounds of a few seconds: Flower's processes take a moment to stop, and tinier rounds
# would let the run finish meanwhile (measured: 4 rounds of 0.3 s all ran after a Ctrl-C;
# after issue 12's faster steps one CI run with local-epochs=3 exited 0 instead of 130,
# cause not pinned down, so 6 for more margin).
TINY = ("num-clients=3 num-exits=2 depth=2 embed-dim=16 num-heads=2 num-server-rounds=10 "
        "eval-every=10 fraction-train=1.0 local-epochs=6 seed=5 train-examples=1500 "
        "test-examples=100 batch-size=16")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _reefl(*args: str) -> subprocess.Popen[str]:
    """``reefl ...`` in its own process group (so a SIGINT to it reaches only this run), with
    SIGINT at its default: an ignored SIGINT is inherited across exec, and Python then never
    raises KeyboardInterrupt. A shell without job control starts background commands with
    SIGINT ignored, so a `.ci/run` started with `&` made this run ignore the test's Ctrl-C
    and finish (exit 0)."""
    return subprocess.Popen([sys.executable, "-m", "reefl.cli", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _saved_round(run_dir: Path) -> int:
    """The round of the run's checkpoint, -1 if there is none yet."""
    try:
        with safe_open(str(run_dir / CHECKPOINT_NAME), "pt") as stream:
            return int(stream.metadata()["round"])
    except (OSError, KeyError, ValueError, RuntimeError):
        return -1


def _stop_after(process: subprocess.Popen[str], run_dir: Path, saved: int, how: str,
                timeout: float = 400) -> tuple[int, str, list[psutil.Process]]:
    """Wait until round ``saved`` is checkpointed, then interrupt ``process``: "sigint" to
    its process group, "sigkill" to the launcher alone. Its exit code, its output and the
    processes below it just before (SuperLink, SuperExec, simulation, Ray...)."""
    deadline = time.monotonic() + timeout
    while _saved_round(run_dir) < saved and process.poll() is None:
        assert time.monotonic() < deadline, f"round {saved} was never saved"
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    below = psutil.Process(process.pid).children(recursive=True)
    if how == "sigint":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.kill()
    output, _ = process.communicate(timeout=120)
    return process.returncode, output, below


def _left(processes: list[psutil.Process], timeout: float = 60) -> list[psutil.Process]:
    """Those of ``processes`` still running (not zombies) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.extended
def test_sigint_then_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["--app", str(Path(__file__).parents[1]), "-q"]
    whole = tmp_path / "whole"
    cut = tmp_path / "cut"
    reference = _reefl("run", *common, "-c", f"{TINY} output-dir='{tmp_path}' run-name='whole'")
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output

    first = _reefl("run", *common, "-c", f"{TINY} output-dir='{tmp_path}' run-name='cut'")
    code, output, below = _stop_after(first, cut, saved=2, how="sigint")
    assert code == 130, output
    assert len(below) > 3 and not _left(below, timeout=0)  # stopped before it returned
    assert f"reefl run --resume {cut}" in output  # the hint the user reads
    assert not (cut / "final.json").exists()

    stopped_at = _saved_round(cut)  # Flower's processes may have finished a round or two
    assert 2 <= stopped_at < 10
    second = _reefl("run", *common, "--resume", str(cut))
    code, _, below = _stop_after(second, cut, saved=stopped_at + 1, how="sigkill")
    assert code == -signal.SIGKILL
    assert len(below) > 3 and not _left(below)  # the watchdog stopped them

    third = _reefl("run", *common, "--resume", str(cut))
    output, _ = third.communicate(timeout=600)
    assert third.returncode == 0, output

    expected, got = load_file(str(whole / "model.safetensors")), load_file(
        str(cut / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    rounds = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, 11))  # none twice
    # no round was saved with clients missing because they were being stopped
    assert all(r["clients"]["used"] == [0, 1, 2] for r in rounds), [r["clients"] for r in rounds]


@pytest.mark.slow
@pytest.mark.extended
def test_a_dead_server_app_is_noticed_at_once(tmp_path: Path) -> None:
    """SIGKILL the ServerApp's process (flwr-simulation) once round 1 is saved: `reefl run`
    says so within 10 s (flwr run alone waits a minute or more), with the resume command,
    and leaves nothing running."""
    run_dir = tmp_path / "runs" / "dead"
    run = _reefl("run", "-q", "-c", f"{TINY} output-dir='{tmp_path / 'runs'}' run-name='dead'")
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / CHECKPOINT_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run_dir / CHECKPOINT_NAME).is_file(), "no round was saved"
        family = psutil.Process(run.pid).children(recursive=True)
        server_apps = [p for p in family if any(Path(arg).name == "flwr-simulation"
                                                for arg in p.cmdline()[:2])]
        assert len(server_apps) == 1
        server_apps[0].kill()
        killed = time.monotonic()
        assert run.stdout is not None
        err = ""
        while "ServerApp's process ended" not in err and (line := run.stdout.readline()):
            err += line  # stderr goes with stdout
        noticed = time.monotonic() - killed
        err += run.communicate(timeout=120)[0]
    finally:
        run.kill()
        run.wait()
    print(f"dead ServerApp noticed after {noticed:.1f} s")
    assert run.returncode == 1 and noticed <= 10, (noticed, err)
    assert "the ServerApp's process ended without finishing the run" in err
    assert f"reefl run --resume {run_dir}" in err
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
