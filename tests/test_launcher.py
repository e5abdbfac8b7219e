"""reefl run: config merge, app discovery, run names, the error path, process cleanup.

Only the smoke test (marked slow) starts Flower; every test stops what it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

from reefl import cli  # noqa: E402
from reefl.launch import processes, resources, run_config, simulation, superlink, watchdog  # noqa: E402
from reefl.launch.errors import RunConfigError  # noqa: E402
from reefl.outputs.progress import StreamView  # noqa: E402
from reefl.outputs.run_folder import FLOWER_LOG  # noqa: E402

TOY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "toyapp"
version = "0.1.0"
description = "toy"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
method = "{method}"
num-clients = 4
fraction-train = 0.5
seed = 0
num-server-rounds = 2
output-dir = "outputs"
run-name = ""
"""

TOY_SERVER = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = []
    while len(nodes) < int(cfg["num-clients"]):
        nodes = list(grid.get_node_ids())
    for rnd in range(1, int(cfg["num-server-rounds"]) + 1):
        msgs = [Message(content=RecordDict({"c": ConfigRecord({"r": rnd})}), dst_node_id=n,
                        message_type="train") for n in nodes]
        replies = list(grid.send_and_receive(msgs))
        print(f"round {rnd}: {sum(r.has_content() for r in replies)} replies", flush=True)
    run_dir = Path(cfg["output-dir"]) / cfg["run-name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "final.json").write_text(json.dumps({"rounds": cfg["num-server-rounds"]}))
"""

TOY_CLIENT = """\
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"m": MetricRecord({"ok": 1})}), reply_to=msg)
"""


def make_app(root: Path, method: str = "toy", package: str = "toyapp") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(TOY_PYPROJECT.format(method=method, package=package))
    if package == "toyapp":
        (root / "toyapp").mkdir(exist_ok=True)
        (root / "toyapp" / "__init__.py").write_text("")
        (root / "toyapp" / "server_app.py").write_text(TOY_SERVER)
        (root / "toyapp" / "client_app.py").write_text(TOY_CLIENT)
    return root


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


@pytest.fixture
def no_flower(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly (and record) if anything tries to start a process."""
    started: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        started.append(repr(args))
        raise AssertionError("a process was started")

    monkeypatch.setattr(superlink.SuperLink, "start", refuse)
    monkeypatch.setattr(processes.subprocess, "Popen", refuse)
    return started


# -- config ---------------------------------------------------------------------------------


def test_overrides_parse_like_flwr_run(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    items = ["num-clients=8 method='a b'", "seed=3", "num-clients=9 fraction-train=1.0"]
    parsed = run_config.parse_overrides(items)
    assert parsed == parse_config_args(items)
    assert parsed == {"num-clients": 9, "method": "a b", "seed": 3, "fraction-train": 1.0}

    toml = tmp_path / "over.toml"
    toml.write_text('num-clients = 6\nrun-name = "x"\n')
    assert run_config.parse_overrides([str(toml)]) == {"num-clients": 6, "run-name": "x"}
    # files and k=v strings mix, in order: later wins
    assert run_config.parse_overrides(["seed=3 num-clients=2", str(toml), "num-clients=7"]) == {
        "seed": 3, "num-clients": 7, "run-name": "x"}


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["seed:3"], "seed:3"),  # no key=value at all: Flower would silently ignore it
        (["missing.toml"], "missing.toml"),
        (["seed=[1"], "seed must be an integer; got '[1'"),  # Flower: "invalid format"
    ],
)
def test_bad_overrides_are_one_line_errors(items: list[str], fragment: str) -> None:
    with pytest.raises(RunConfigError) as error:
        run_config.parse_overrides(items)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_unknown_key_is_rejected(app: Path) -> None:
    with pytest.raises(RunConfigError, match="unknown run-config key 'num-client'"):
        run_config.prepare_run(["num-client=3"], app_dir=app)


def test_prepare_run_merges_and_completes(app: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    toml = tmp_path / "over.toml"
    toml.write_text("num-clients = 10\nseed = 7\n")
    now = time.mktime((2025, 1, 2, 3, 4, 5, 0, 0, -1))
    run = run_config.prepare_run([str(toml)], app_dir=app, cwd=cwd, now=now)

    assert run.app_dir == app.resolve()
    assert run.config["num-clients"] == 10 and run.config["fraction-train"] == 0.5
    assert run.config["output-dir"] == str(cwd / "outputs")  # absolute, against the cwd
    assert run.config["run-name"] == "toy-s7-20250102-030405"
    assert run.run_dir == cwd / "outputs" / "toy-s7-20250102-030405"
    # Sent to Flower: the user's overrides plus the two completed keys, nothing else.
    assert run.overrides == {
        "num-clients": 10,
        "seed": 7,
        "output-dir": str(cwd / "outputs"),
        "run-name": "toy-s7-20250102-030405",
    }
    assert resources.federation_config(run.config)["num-supernodes"] == 10


def test_explicit_run_name_and_absolute_output_dir_are_kept(app: Path, tmp_path: Path) -> None:
    run = run_config.prepare_run(
        [f"run-name='mine' output-dir='{tmp_path / 'out'}'"], app_dir=app, cwd=tmp_path
    )
    assert run.run_dir == tmp_path / "out" / "mine"


def test_run_name_format_and_uniqueness(tmp_path: Path) -> None:
    name = run_config.make_run_name({"method": "reefl", "seed": 3})
    assert re.fullmatch(r"reefl-s3-\d{8}-\d{6}", name)
    (tmp_path / "a").mkdir()
    (tmp_path / "a-2").mkdir()
    assert run_config._unique_run_name(tmp_path, "a") == "a-3"
    assert run_config._unique_run_name(tmp_path, "b") == "b"


# -- simulation settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "clients", "fraction", "per_client"),
    [(2, 20, 0.5, 1), (2, 1, 1.0, 2), (16, 4, 1.0, 4), (16, 20, 0.5, 1), (8, 8, 0.25, 4)],
)
def test_default_federation(cpus: int, clients: int, fraction: float, per_client: int) -> None:
    config = {"num-clients": clients, "fraction-train": fraction}
    federation = resources.default_federation(config, cpus=cpus, gpus=0)
    assert federation == {"num-supernodes": clients, "client-resources-num-cpus": per_client}


@pytest.mark.parametrize(
    ("cpus", "gpus", "clients", "fraction", "share"),
    # 16 cores, 10 clients a round on one GPU: 10 would run at once, 4 share it at most
    [(16, 1, 100, 0.1, 0.25), (16, 1, 2, 1.0, 0.5), (16, 8, 10, 1.0, 0.8),
     (16, 4, 2, 1.0, 1.0), (2, 1, 20, 0.5, 0.5)],
)
def test_default_federation_shares_gpus_among_parallel_clients(
        cpus: int, gpus: int, clients: int, fraction: float, share: float) -> None:
    config = {"num-clients": clients, "fraction-train": fraction}
    federation = resources.default_federation(config, cpus=cpus, gpus=gpus)
    assert federation["client-resources-num-gpus"] == pytest.approx(share)


def test_user_federation_config_wins(app: Path) -> None:
    run = run_config.prepare_run([], app_dir=app)
    federation = resources.federation_config(
        run.config, ["client-resources-num-cpus=3", "init-args-num-cpus=2"])
    assert federation["num-supernodes"] == 4  # num-clients
    assert federation["client-resources-num-cpus"] == 3
    assert federation["init-args-num-cpus"] == 2
    arg = resources.federation_arg(federation)
    assert "client-resources-num-cpus=3" in arg and "init-args-num-cpus=2" in arg


def test_bad_federation_key_is_rejected_before_start(app: Path) -> None:
    with pytest.raises(RunConfigError, match="num_supernode"):
        resources.federation_config(run_config.prepare_run([], app_dir=app).config,
                                    ["num-supernode=3"])


def test_flwr_run_command(tmp_path: Path) -> None:
    command = simulation.flwr_run_command(
        "flwr", tmp_path, tmp_path / "rc.toml", {"num-supernodes": 4, "verbose": True}
    )
    assert command == [
        "flwr", "run", str(tmp_path), simulation.CONNECTION, "--stream",
        "--run-config", str(tmp_path / "rc.toml"),
        "--federation-config", "num-supernodes=4 verbose=true",
    ]  # fmt: skip


def test_flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # the user's choice is kept
    monkeypatch.delenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", raising=False)
    env = processes.flower_env(tmp_path, Path("/opt/bin"))
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/bin" + os.pathsep)


def test_private_flower_config_is_read_by_flwr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    superlink.write_flower_config(tmp_path, "127.0.0.1:40123", simulation.CONNECTION)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection(None)
    assert connection.name == simulation.CONNECTION
    assert connection.address == "127.0.0.1:40123" and connection.insecure


# -- app discovery ----------------------------------------------------------------------------


def test_app_dir_is_found_upwards(app: Path) -> None:
    deep = app / "a" / "b"
    deep.mkdir(parents=True)
    assert run_config.find_app_dir(deep) == app.resolve()


def test_app_dir_falls_back_to_the_installed_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_app(tmp_path / "repo")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(run_config, "_installed_repo_root", lambda: repo)
    assert run_config.find_app_dir(elsewhere) == repo


def test_no_app_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_config, "_installed_repo_root", lambda: None)
    with pytest.raises(RunConfigError, match="no Flower app found"):
        run_config.find_app_dir(tmp_path)
    with pytest.raises(RunConfigError, match="is not a Flower app"):
        run_config.resolve_app_dir(tmp_path)


def test_installed_repo_root_is_this_checkout() -> None:
    root = run_config._installed_repo_root()
    assert root is not None and (root / "src" / "reefl" / "launch" / "run_config.py").is_file()


# -- the CLI error path ---------------------------------------------------------------------


def test_validation_error_exits_2_before_flower_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_flower: list[str]
) -> None:
    app = make_app(tmp_path / "reefl-app", method="reefl", package="reefl.federation")
    code = cli.main(["run", "--app", str(app), "--run-config", "num-clients=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("reefl: error: ") and err.count("\n") == 1
    assert "num-clients" in err
    assert no_flower == []


def test_unknown_key_exits_2_before_flower_starts(
    app: Path, capsys: pytest.CaptureFixture[str], no_flower: list[str]
) -> None:
    code = cli.main(["run", "--app", str(app), "-c", "no-such-key=1"])
    err = capsys.readouterr().err
    assert code == 2 and err == "reefl: error: " + (
        "unknown run-config key 'no-such-key' (not in the app's [tool.flwr.app.config])\n"
    )
    assert no_flower == []


def test_validation_runs_on_the_merged_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict] = []

    def validate(merged: dict) -> tuple[str, str]:
        seen.append(merged)
        return "digest", "legacy digest"

    monkeypatch.setattr(run_config, "_validate", validate)
    app = make_app(tmp_path / "reefl-app", method="reefl", package="reefl.federation")
    run_config.prepare_run(["seed=4"], app_dir=app, cwd=tmp_path)
    assert seen and seen[0]["seed"] == 4 and seen[0]["run-name"].startswith("reefl-s4-")
    assert seen[0]["output-dir"] == str(tmp_path / "outputs")


# -- process cleanup --------------------------------------------------------------------------


# A parent whose child starts its own session and ignores SIGTERM, like Ray's agents.
STUBBORN = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'], "
    "start_new_session=True)\n"
    "time.sleep(60)\n"
)


def _parent_of_a_stubborn_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True)


def _tree_of(parent: subprocess.Popen[bytes]) -> str:
    """``parent`` and its child, once it has one, as a ``_recorded`` line."""
    process = psutil.Process(parent.pid)
    deadline = time.monotonic() + 10
    while not process.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return json.dumps([[p.pid, p.create_time()] for p in [process, *process.children()]])


def test_the_watchdog_stops_a_tree_across_sessions() -> None:
    parent = _parent_of_a_stubborn_child()
    tree = _tree_of(parent)
    try:
        assert len(watchdog.recorded(tree)) == 2
        dog = watchdog.Watchdog(None)
        dog.watch(parent.pid)
        time.sleep(1.5)  # it has seen the child
        dog.stop()
        assert watchdog.recorded(tree) == [p for p in watchdog.recorded(tree)
                                            if p.status() == psutil.STATUS_ZOMBIE]
    finally:
        parent.kill()
        parent.wait()
        watchdog.stop_processes(watchdog.recorded(tree), grace=0.5)


def test_a_reused_pid_is_not_ours() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(process.pid).create_time()
        assert len(watchdog.recorded(json.dumps([[process.pid, started]]))) == 1
        # as if the pid now belonged to a process started at another time
        assert watchdog.recorded(json.dumps([[process.pid, started - 1.0]])) == []
    finally:
        process.kill()
        process.wait()


LAUNCHER_STANDIN = """
import json, os, sys, time
from pathlib import Path
import psutil
from reefl.launch.processes import ProcessGroup
group = ProcessGroup(dict(os.environ), Path.cwd(), remove_on_death=Path(sys.argv[1]))
child = group.spawn("stand-in", [sys.executable, "-c", sys.argv[2]], None)
parent = psutil.Process(child.pid)
while not parent.children():
    time.sleep(0.05)
time.sleep(1.5)  # the watchdog has seen the child
print(json.dumps([[p.pid, p.create_time()] for p in [parent, *parent.children()]]), flush=True)
time.sleep(60)
"""


def test_nothing_is_left_when_the_launcher_is_sigkilled(tmp_path: Path) -> None:
    """A stand-in launcher starts a tree (a child in its own session that ignores SIGTERM)
    and has it watched; SIGKILL it: the watchdog stops the tree and removes the FLWR_HOME."""
    home = tmp_path / "home"
    home.mkdir()
    stand_in = subprocess.Popen([sys.executable, "-c", LAUNCHER_STANDIN, str(home), STUBBORN],
                                stdout=subprocess.PIPE, text=True)
    assert stand_in.stdout is not None
    tree = stand_in.stdout.readline() or "[]"
    try:
        assert len(watchdog.recorded(tree)) == 2
        stand_in.kill()
        stand_in.wait()
        deadline = time.monotonic() + 20
        while (watchdog.recorded(tree) or home.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watchdog.recorded(tree) == [] and not home.exists()
    finally:
        stand_in.kill()
        stand_in.wait()
        stand_in.stdout.close()
        watchdog.stop_processes(watchdog.recorded(tree), grace=0.5)


# -- one real run (toy app) -------------------------------------------------------------------


@pytest.mark.slow
def test_toy_app_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app(tmp_path / "app")
    monkeypatch.chdir(tmp_path)
    trees: list[list[psutil.Process]] = []
    stop = processes.ProcessGroup.stop

    def recording_stop(self: processes.ProcessGroup) -> None:
        for child in self.processes:  # the SuperLink (flwr run has ended), all below it
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(child.pid)
                trees.append([process, *process.children(recursive=True)])
        stop(self)

    monkeypatch.setattr(processes.ProcessGroup, "stop", recording_stop)
    run_dir = simulation.run_app(["num-clients=2 num-server-rounds=2"], app_dir=app,
                               view=StreamView())  # --verbose
    out = capsys.readouterr().out

    assert run_dir.parent == tmp_path / "outputs"
    assert json.loads((run_dir / "final.json").read_text()) == {"rounds": 2}
    assert "round 2: 2 replies" in out  # the ServerApp's log was streamed
    assert "round 2: 2 replies" in (run_dir / FLOWER_LOG).read_text()  # and written
    assert out.count(f"reefl: run folder {run_dir}") == 2
    assert len(trees[0]) >= 2  # the SuperLink and what it started (SuperExec...)
    assert not any(watchdog.still_running(p) for tree in trees for p in tree)  # nothing left


def test_a_named_checkpoint_is_fetched_before_flower_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reefl.launch.errors import RunConfigError
    from reefl.launch.simulation import _check_pretrained as _fetch_checkpoint
    from reefl.models import checkpoints

    source = tmp_path / "deit_tiny_patch16_224-a1311bcf.pth"
    source.write_bytes(b"\x80\x02weights")  # a legacy torch pickle, as far as its header goes
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(checkpoints.OFFICIAL_URLS, "deit-tiny", source.as_uri())
    _fetch_checkpoint({"pretrained": "official", "model": "deit-tiny"}, quiet=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / source.name
    assert cached.read_bytes() == b"\x80\x02weights"
    _fetch_checkpoint({"pretrained": "", "model": "custom"}, quiet=True)  # nothing to fetch
    monkeypatch.setitem(checkpoints.OFFICIAL_URLS, "deit-base", (tmp_path / "gone.pth").as_uri())
    with pytest.raises(RunConfigError, match="^pretrained: "):
        _fetch_checkpoint({"pretrained": "official", "model": "deit-base"}, quiet=True)
