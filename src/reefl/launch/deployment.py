"""``reefl deploy``: the Flower app on a real Deployment Engine on this machine.

``LocalDeployment`` starts a ``SuperLink`` (no ``--simulation``) and one ``flower-supernode``
per data partition on localhost - node config ``partition-id=<i>`` (and ``tier=<t>`` when
given), each SuperNode with its own Runtime API port - and runs the app with
``flwr run <app> <connection> --stream --run-config <toml>``. Optionally:

* TLS: a CA and a server certificate for 127.0.0.1/localhost (``certificates``). The
  SuperLink serves them; the SuperNodes and the ``flwr`` CLI trust the CA.
* SuperNode authentication (needs TLS): the SuperLink accepts only SuperNodes whose public
  key was registered with ``flwr supernode register``. Every SuperNode gets an EC (P-384) key
  pair; its node id is the one the registration returned, so a restarted SuperNode comes
  back as the same node.

Everything lives in a work folder with a private ``FLWR_HOME``, so no other user's Flower
config or SuperLink is touched; every process belongs to one ``ProcessGroup`` and is stopped
by pid when the deployment ends.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reefl.launch.app_files import stage_app
from reefl.launch.certificates import make_node_keys, make_tls_certificates
from reefl.launch.errors import RunConfigError, RunFailed
from reefl.launch.processes import LineSink, ProcessGroup, TrackedProcess, flower_env, free_port
from reefl.launch.run_config import PreparedRun, prepare_resumable, prepare_run
from reefl.launch.simulation import run_failure
from reefl.launch.superlink import START_TIMEOUT, SuperLink, SuperLinkError, SuperNode

if TYPE_CHECKING:
    from reefl.outputs.progress import LogView

CONNECTION = "reefl-deploy"
# A SuperNode that died without saying goodbye stays "online" on the SuperLink until its
# heartbeat expires (Flower: 2 x 30 s); until then the same key cannot activate again.
OFFLINE_TIMEOUT = 90.0
NODE_ID_PATTERN = re.compile(r"SuperNode ID: (\d+)")


@dataclass
class ActiveRun:
    """A ``flwr run`` in progress; ``wait`` returns the run folder once it finished."""

    prepared: PreparedRun
    process: TrackedProcess
    started: float = field(default_factory=time.time)

    @property
    def run_dir(self) -> Path:
        return self.prepared.run_dir

    def wait(self, timeout: float | None = None) -> Path:
        """The run folder; RunFailed if ``flwr run`` failed or this run wrote no
        ``final.json`` of its config (``simulation.run_failure``)."""
        returncode = self.process.popen.wait(timeout)
        self.process.stop()  # the output copier has everything
        reason = run_failure(self.prepared, returncode, self.started)
        if reason is not None:
            raise RunFailed(f"run failed ({reason}); run folder {self.run_dir}", self.run_dir)
        return self.run_dir


def prepare_deploy_run(overrides: Sequence[str], num_nodes: int,
                       tiers: Sequence[int] | None = None, app_dir: Path | str | None = None,
                       resume: Path | str | None = None) -> PreparedRun:
    """The run config as ``reefl run`` checks it, with ``num-clients`` defaulting to the
    number of SuperNodes (the user's value wins), or, with ``resume``, the run folder's own
    config (``run_config.prepare_resumable``); the SuperNodes' tiers checked against
    ``num-exits``. Starts nothing; RunConfigError if something does not fit."""
    if resume is None:
        prepared = prepare_run([f"num-clients={num_nodes}", *overrides], app_dir)
    else:
        prepared = prepare_resumable(overrides, resume, app_dir)
    num_exits = prepared.config.get("num-exits")
    if tiers and isinstance(num_exits, int):
        wrong = [t for t in tiers if not 0 <= t < num_exits]
        if wrong:
            raise RunConfigError(f"--tiers {wrong} not in 0..{num_exits - 1} (num-exits)")
    return prepared


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes (partition ids 0..N-1) on localhost.

    Use as a context manager: entering starts everything and waits until every SuperNode
    joined; leaving stops every process by pid (also after an error or Ctrl-C) and removes
    the work folder if it was a temporary one. ``auth`` needs ``tls``.
    """

    def __init__(self, num_nodes: int, *, tls: bool = False, auth: bool = False,
                 tiers: Sequence[int] | None = None, app_dir: Path | str | None = None,
                 workdir: Path | None = None, fleet_host: str = "127.0.0.1",
                 fleet_port: int = 0) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        if tiers is not None and len(tiers) != num_nodes:
            raise ValueError(f"{len(tiers)} tiers given for {num_nodes} SuperNodes")
        self.num_nodes = num_nodes
        self.tls, self.auth = tls, auth
        self.tiers = list(tiers) if tiers is not None else None
        self.app_dir = app_dir
        self.fleet_host, self.fleet_port = fleet_host, fleet_port
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="reefl-deploy-")
        self.workdir = (workdir or Path(self._tmp.name)).resolve()
        flwr_home = self.workdir / "flwr-home"
        # should reefl die, the watchdog stops everything and removes a temporary work folder
        self.group = ProcessGroup(flower_env(flwr_home, Path(sys.executable).parent),
                                  self.workdir, self.workdir if self._tmp is not None else None)
        self.superlink = SuperLink(self.group, flwr_home, self.workdir, CONNECTION,
                                   simulation=False)
        self.supernodes: list[SuperNode] = []

    # -- lifecycle

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Certificates (TLS), the SuperLink, then every SuperNode (registered first when
        authentication is on); returns once all of them joined."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.superlink.tls = make_tls_certificates(self.workdir / "certificates",
                                                       hosts=(self.fleet_host,))
            self.superlink.auth = self.auth
        self.superlink.start()
        self.superlink.start_gateway(self.fleet_host, self.fleet_port)
        for partition in range(self.num_nodes):
            self.add_supernode(partition, self.tiers[partition] if self.tiers else None,
                               wait=False)
        for node in self.supernodes:
            self.wait_joined(node)

    def stop(self) -> None:
        """Stop every process this deployment started, then remove a temporary work
        folder."""
        self.group.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def address(self) -> str:
        """The SuperLink's loopback address (Fleet, Control and Runtime API share one port):
        the operator's ``flwr`` commands go there."""
        return self.superlink.address

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the Fleet gateway, which serves the Fleet API only."""
        return self.superlink.fleet_address

    # -- SuperNodes

    def add_supernode(self, partition_id: int, tier: int | None = None, *,
                      register: bool = True, wait: bool = True) -> SuperNode:
        """Start one more SuperNode. With authentication on it gets a new key pair, which
        is registered unless ``register`` is False (such a SuperNode cannot join)."""
        node = SuperNode(partition_id, tier, None)
        if self.auth:
            node.keys = make_node_keys(self.workdir / "keys", f"supernode-p{partition_id}"
                                       + ("" if register else "-unregistered"))
            if register:
                node.registered_id = self.superlink.register(node.keys)
        self.supernodes.append(node)
        self._start_supernode(node)
        if wait:
            self.wait_joined(node)
        return node

    def _start_supernode(self, node: SuperNode) -> None:
        node.starts += 1
        node.port = free_port()
        node.node_id = None
        suffix = "" if node.starts == 1 else f"-restart{node.starts - 1}"
        node.process = self.group.spawn(f"{node.name}{suffix}", node.command(self.superlink),
                                        self.workdir / f"{node.name}{suffix}.log")

    def wait_joined(self, node: SuperNode, timeout: float = START_TIMEOUT) -> int:
        """Wait until the SuperNode logged its node id (it is connected and active);
        SuperLinkError with its last log lines if it exits or takes too long."""
        assert node.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := NODE_ID_PATTERN.search(node.process.log_text()):
                node.node_id = int(match.group(1))
                return node.node_id
            if not node.process.running():
                break
            time.sleep(0.2)
        raise SuperLinkError(f"{node.name} did not join the SuperLink: {node.process.log_tail(8)}")

    def wait_for_log(self, node: SuperNode, pattern: str, timeout: float) -> bool:
        """Whether the SuperNode's current log matches ``pattern`` within ``timeout``
        seconds (e.g. ``Receiving: train message``: it is in a round)."""
        assert node.process is not None
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if regex.search(node.process.log_text()):
                return True
            time.sleep(0.2)
        return False

    def kill_supernode(self, node: SuperNode) -> None:
        """SIGKILL the SuperNode and everything it started, as a crash would: it does not
        tell the SuperLink, which keeps it "online" until its heartbeat expires."""
        if node.process is not None:
            node.process.stop(kill_first=True)

    def restart_supernode(self, node: SuperNode, timeout: float = START_TIMEOUT) -> int:
        """Start the SuperNode again with the same partition id, tier and key; its node id.

        A registered node id can only be activated again once the SuperLink considers the
        old process gone, so with authentication this first waits until the node is no
        longer "online" (at most OFFLINE_TIMEOUT seconds after a crash).
        """
        if node.process is not None and node.process.running():
            node.process.stop()
        if node.registered_id is not None:
            self.wait_offline(node.registered_id)
        self._start_supernode(node)
        return self.wait_joined(node, timeout)

    def wait_offline(self, node_id: int, timeout: float = OFFLINE_TIMEOUT) -> None:
        """Wait until ``flwr supernode ls`` no longer shows ``node_id`` online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = {int(n["node-id"]): n["status"] for n in self.superlink.list_nodes()}
            if status.get(node_id) != "online":
                return
            time.sleep(2.0)
        raise SuperLinkError(f"node {node_id} still online after {timeout:.0f} s")

    # -- runs

    def prepare(self, overrides: Sequence[str]) -> PreparedRun:
        """``prepare_deploy_run`` for this deployment's SuperNodes and app."""
        return prepare_deploy_run(overrides, self.num_nodes, self.tiers, self.app_dir)

    def submit(self, prepared: PreparedRun, echo: LineSink | None = None) -> ActiveRun:
        """Start ``flwr run <app> <connection> --stream --run-config <toml>``; its output
        goes to ``flwr-run.log`` in the work folder (and to ``echo``)."""
        import tomli_w

        config_file = self.workdir / f"run-config-{prepared.run_dir.name}.toml"
        config_file.write_text(tomli_w.dumps(prepared.overrides), encoding="utf-8")
        app = stage_app(prepared.app_dir,
                        Path(tempfile.mkdtemp(prefix="app-", dir=self.workdir)) / "app")
        command = [self.superlink.exe("flwr"), "run", str(app), CONNECTION, "--stream",
                   "--run-config", str(config_file)]
        started = time.time()
        process = self.group.spawn("flwr-run", command, self.workdir / "flwr-run.log", echo)
        return ActiveRun(prepared, process, started)

    def run(self, overrides: Sequence[str], echo: LineSink | None = None) -> Path:
        """Run the app once with ``overrides``; the run folder (RunFailed otherwise)."""
        return self.submit(self.prepare(overrides), echo).wait()


def parse_fleet_address(text: str) -> tuple[str, int]:
    """``--fleet-address HOST[:PORT]`` (IPv6 in brackets): the host SuperNodes connect to and
    its port (0: a free one). RunConfigError if it is not an address."""
    import ipaddress

    host, port = text, "0"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "0"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError(port)
    except ValueError:
        raise RunConfigError(f"--fleet-address must be IP[:PORT] of this host (e.g. "
                             f"192.168.1.10:9092); got '{text}'") from None
    return host, number


def parse_tiers(text: str | None, num_nodes: int) -> list[int] | None:
    """``--tiers 0,1,2``: one tier per SuperNode (partition order); None if not given."""
    if not text:
        return None
    try:
        tiers = [int(item) for item in text.split(",")]
    except ValueError:
        raise RunConfigError(f"--tiers must be comma-separated integers; got '{text}'") from None
    if len(tiers) != num_nodes:
        raise RunConfigError(f"--tiers gives {len(tiers)} tiers for --nodes {num_nodes}")
    return tiers


def deploy(overrides: Sequence[str], num_nodes: int, tiers: Sequence[int] | None = None, *,
           tls: bool = False, auth: bool = False, app_dir: Path | str | None = None,
           workdir: Path | None = None, resume: Path | str | None = None,
           fleet_address: str = "127.0.0.1",
           quiet: bool = False, view: LogView | None = None) -> Path:
    """``reefl deploy``: the run on a LocalDeployment of ``num_nodes`` SuperNodes; the run
    folder. As ``reefl run``: Flower's log goes to flower.log in the run folder, the terminal
    shows ``view`` (default: the progress line; nothing with ``quiet``), then the final
    table. RunConfigError before anything starts, RunFailed, RunInterrupted on Ctrl-C."""
    from reefl.launch.errors import RunInterrupted
    from reefl.launch.run_config import finished_final
    from reefl.launch.simulation import num_rounds, print_final, say
    from reefl.outputs.progress import FlowerLog, ProgressView
    from reefl.outputs.run_folder import FLOWER_LOG

    prepared = prepare_deploy_run(overrides, num_nodes, tiers, app_dir, resume=resume)
    for warning in prepared.warnings:
        say(f"warning: {warning}", quiet)
    if finished_final(prepared.run_dir, prepared.digests) is not None:
        say(f"run {prepared.run_dir} has already finished", quiet)
        print_final(prepared)
        return prepared.run_dir
    host, port = parse_fleet_address(fleet_address)
    with LocalDeployment(num_nodes, tls=tls or auth, auth=auth, tiers=tiers, app_dir=app_dir,
                         workdir=workdir, fleet_host=host, fleet_port=port) as deployment:
        say(f"SuperLink {deployment.address} (Control API, this host only); SuperNodes "
            f"connect to the Fleet gateway {deployment.fleet_address} "
            f"({'TLS' if tls or auth else 'insecure'}"
            f"{', SuperNode authentication' if auth else ''}); SuperNodes "
            + ", ".join(f"{n.node_config} (node {n.node_id})" for n in deployment.supernodes),
            quiet)
        say(f"run folder {prepared.run_dir}", quiet)
        log = FlowerLog(prepared.run_dir / FLOWER_LOG, view or ProgressView(),
                        num_rounds(prepared.config), append=resume is not None)
        with log:
            try:
                run_dir = deployment.submit(prepared, echo=log).wait()
            except KeyboardInterrupt:
                raise RunInterrupted(prepared.run_dir) from None
    print_final(prepared)
    say(f"run folder {run_dir}", quiet)
    return run_dir
