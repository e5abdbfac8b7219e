"""``reefl deploy``: the Flower app on a real Deployment Engine on this machine.

``LocalDeployment`` starts ``flower-superlink`` (no ``--simulation``) and one
``flower-supernode`` per data partition on localhost — node config
``partition-id=<i>`` (and ``tier=<t>`` when given), each SuperNode with its own Runtime
API port (``--port``) — and runs the app with
``flwr run <app> <connection> --stream --run-config <toml>``. Optionally:

* TLS: a CA and a server certificate for 127.0.0.1/localhost, made with ``openssl`` as in
  Flower's "Enable TLS connections" guide. The SuperLink serves them
  (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``); the SuperNodes
  (``--root-certificates``) and the ``flwr`` CLI (connection key ``root-certificates``)
  trust the CA.
* SuperNode authentication (needs TLS): the SuperLink runs with ``--enable-supernode-auth``
  and accepts only SuperNodes whose public key was registered with
  ``flwr supernode register <public-key> <connection>``. Every SuperNode gets an EC (P-384)
  key pair in OpenSSH format and starts with ``--auth-supernode-private-key``; its node id
  is the one the registration returned, so a restarted SuperNode comes back as the same
  node.

Everything lives in a work folder with a private ``FLWR_HOME``, so no other user's Flower
config or SuperLink is touched. Every process is started in its own session, its
descendants are recorded while they run (a child re-parented after its parent died is still
known), and all of them are stopped by pid — never by name — when the deployment ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from reefl.launch.app_files import stage_app
from reefl.launcher import (
    LaunchError,
    PreparedRun,
    RunConfigError,
    RunFailed,
    Watchdog,
    finished_final,
    flower_env,
    free_port,
    prepare_resumable,
    prepare_run,
    run_failure,
    still_running,
    stop_processes,
    write_flower_config,
)

CONNECTION = "reefl-deploy"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds a SuperLink or SuperNode gets to come up
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
REFRESH_INTERVAL = 0.5  # how often the process trees are recorded
# A SuperNode that died without saying goodbye stays "online" on the SuperLink until its
# heartbeat expires (Flower: 2 x 30 s); until then the same key cannot activate again.
OFFLINE_TIMEOUT = 90.0
NODE_ID_PATTERN = re.compile(r"SuperNode ID: (\d+)")


class DeployError(LaunchError):
    """A Flower process of the deployment could not be started or did not come up."""


# -- certificates and keys -------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate everyone trusts, and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str) -> None:
    """Run one ``openssl`` command; DeployError with its message if it fails."""
    exe = shutil.which("openssl")
    if exe is None:
        raise DeployError("'openssl' not found; it is needed to make TLS certificates")
    result = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DeployError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_tls_certificates(directory: Path, days: int = 30) -> TlsFiles:
    """A self-signed CA and a server certificate for localhost/127.0.0.1/::1 signed by it.

    The same ``openssl`` steps as Flower's TLS guide (CA key and certificate, server key,
    signing request, certificate signed by the CA with the loopback names as SANs), with
    the extensions strict verifiers (Python 3.13+) require. For a machine's own tests only.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "server.ext"
    ext.write_text(SERVER_EXTENSIONS, encoding="utf-8")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
             "-keyout", str(ca_key), "-out", str(files.ca_cert), "-subj", "/CN=reefl local CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout",
             str(files.server_key), "-out", str(csr), "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(ext),
             "-out", str(files.server_cert))
    for key in (ca_key, files.server_key):
        key.chmod(0o600)
    return files


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair (OpenSSH format, as Flower reads it)."""

    private_key: Path
    public_key: Path


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """A new EC P-384 key pair ``<name>`` / ``<name>.pub`` (what ``ssh-keygen -t ecdsa -b
    384`` makes): Flower's SuperNode authentication takes NIST-curve EC keys in OpenSSH
    format, the private key for ``--auth-supernode-private-key`` and the public one for
    ``flwr supernode register``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    keys.private_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    keys.private_key.chmod(0o600)
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


# -- processes ------------------------------------------------------------------------------


class TrackedProcess:
    """One started command with its log file, and every descendant seen while it ran.

    Started in its own session so a Ctrl-C in the terminal reaches only reefl, which stops
    things in order. ``refresh`` records the descendants (psutil keeps each one's start
    time, so a reused pid is never signalled); ``stop`` signals all of them by pid.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path,
                 log_path: Path, echo: IO[str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._copier: threading.Thread | None = None
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(  # noqa: S603
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if echo else log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if echo is not None:
            self._copier = threading.Thread(target=self._copy_output, args=(echo,),
                                            name=f"reefl-{name}-output", daemon=True)
            self._copier.start()
        self.refresh()

    def _copy_output(self, echo: IO[str]) -> None:
        """Write the process's output to its log file and to ``echo``, line by line."""
        assert self.popen.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            for raw in self.popen.stdout:
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                echo.write(line)
                echo.flush()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def refresh(self) -> None:
        """Remember the process and its current descendants."""
        try:
            root = psutil.Process(self.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        with self._lock:
            for proc in family:
                self._seen.setdefault(proc.pid, proc)

    def alive(self) -> list[psutil.Process]:
        """The remembered processes that still run (zombies excluded)."""
        with self._lock:
            procs = list(self._seen.values())
        return [proc for proc in procs if still_running(proc)]

    def stop(self, kill_first: bool = False) -> None:
        """``stop_tracked`` for this process alone."""
        stop_tracked([self], kill_first)

    def reap(self, timeout: float) -> None:
        """Collect the exit status of the process itself and the rest of its output."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(max(timeout, 0.0))
        if self._copier is not None and self.popen.poll() is not None:
            self._copier.join(STOP_GRACE)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().rstrip().splitlines()[-lines:])


def stop_tracked(processes: Sequence[TrackedProcess], kill_first: bool = False) -> None:
    """Stop every process of every tree at once (``launcher.stop_processes``: by pid, each
    checked against its start time), then reap the started processes themselves."""
    for process in processes:
        process.refresh()
    stop_processes([proc for process in processes for proc in process.alive()],
                   kill_first=kill_first)
    for process in processes:
        process.reap(STOP_GRACE)


# -- the deployment -------------------------------------------------------------------------


@dataclass
class SuperNode:
    """One SuperNode of the deployment: its partition (and tier), key pair and process."""

    partition_id: int
    tier: int | None
    keys: NodeKeys | None
    registered_id: int | None = None  # from `flwr supernode register` (authentication on)
    node_id: int | None = None  # what the SuperNode logged when it joined
    port: int = 0  # its Runtime API port (SuperExec and ClientApps talk to it)
    process: TrackedProcess | None = None
    starts: int = 0

    @property
    def node_config(self) -> str:
        """The ``--node-config`` value, e.g. ``partition-id=0 tier=2``."""
        tier = "" if self.tier is None else f" tier={self.tier}"
        return f"partition-id={self.partition_id}{tier}"

    @property
    def name(self) -> str:
        """``supernode-p<partition id>``, with ``-unregistered`` for a key nobody
        registered (the name of its key files and logs)."""
        unregistered = self.keys is not None and self.registered_id is None
        return f"supernode-p{self.partition_id}{'-unregistered' if unregistered else ''}"


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
        ``final.json`` of its config (``launcher.run_failure``)."""
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
    config (``launcher.prepare_resumable``); the SuperNodes' tiers checked against
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
                 workdir: Path | None = None) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        if tiers is not None and len(tiers) != num_nodes:
            raise ValueError(f"{len(tiers)} tiers given for {num_nodes} SuperNodes")
        self.num_nodes = num_nodes
        self.tls, self.auth = tls, auth
        self.tiers = list(tiers) if tiers is not None else None
        self.app_dir = app_dir
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="reefl-deploy-")
        self.workdir = (workdir or Path(self._tmp.name)).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home, Path(sys.executable).parent)
        self.tls_files: TlsFiles | None = None
        self.port = 0
        self.superlink: TrackedProcess | None = None
        self.supernodes: list[SuperNode] = []
        self._processes: list[TrackedProcess] = []
        self._watchdog: Watchdog | None = None  # stops everything should this process die
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None

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
            self.tls_files = make_tls_certificates(self.workdir / "certificates")
        self._start_refresher()
        self._start_superlink()
        for partition in range(self.num_nodes):
            self.add_supernode(partition, self.tiers[partition] if self.tiers else None,
                               wait=False)
        for node in self.supernodes:
            self.wait_joined(node)

    def stop(self) -> None:
        """Stop every process this deployment started, then remove a temporary work
        folder."""
        stop_tracked(self._processes)
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def _start_refresher(self) -> None:
        """Record every process tree twice a second, so that a grandchild whose parent
        died (and which was re-parented) is still known and stopped."""
        def refresh() -> None:
            while not self._stop_refresh.wait(REFRESH_INTERVAL):
                for process in list(self._processes):
                    if process.running():
                        process.refresh()

        self._refresher = threading.Thread(target=refresh, name="reefl-deploy-refresh",
                                           daemon=True)
        self._refresher.start()

    def _spawn(self, name: str, command: list[str], echo: IO[str] | None = None
               ) -> TrackedProcess:
        """Start ``command`` with its log in the work folder, tracked here (to stop one
        SuperNode alone) and by the launcher's watchdog (should ``reefl deploy`` itself be
        killed, the watchdog stops every process and removes a temporary work folder)."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.workdir if self._tmp is not None else None)
        log_path = self.workdir / f"{name}.log"
        process = TrackedProcess(name, command, self.env, self.workdir, log_path, echo)
        self._processes.append(process)
        self._watchdog.watch(process.pid)
        return process

    def _exe(self, name: str) -> str:
        found = shutil.which(name, path=self.env.get("PATH"))
        if found is None:
            raise DeployError(f"'{name}' not found; install flwr in this environment")
        return found

    # -- SuperLink

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime API share one port)."""
        return f"{HOST}:{self.port}"

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` for the Deployment Engine: TLS files or ``--insecure``,
        ``--enable-supernode-auth`` with authentication, apps in the user's environment."""
        command = [self._exe("flower-superlink"), "--host", HOST, "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        if self.tls_files is None:
            return [*command, "--insecure"]
        command += ["--ssl-ca-certfile", str(self.tls_files.ca_cert),
                    "--ssl-certfile", str(self.tls_files.server_cert),
                    "--ssl-keyfile", str(self.tls_files.server_key)]
        return [*command, "--enable-supernode-auth"] if self.auth else command

    def _start_superlink(self, attempts: int = 3) -> None:
        """Start the SuperLink on a free port (another one if that was taken meanwhile)
        and point ``$FLWR_HOME/config.toml`` at it."""
        for _ in range(attempts):
            self.port = free_port()
            write_flower_config(self.flwr_home, self.address, CONNECTION,
                                self.tls_files.ca_cert if self.tls_files else None)
            self.superlink = self._spawn("superlink", self.superlink_command())
            if self._wait_healthy(self.superlink):
                return
            self.superlink.stop()
        assert self.superlink is not None
        raise DeployError(f"flower-superlink did not start: {self.superlink.log_tail(5)}")

    def _wait_healthy(self, process: TrackedProcess) -> bool:
        """Whether the SuperLink answers ``/health`` within START_TIMEOUT."""
        import httpx

        scheme = "https" if self.tls_files else "http"
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
            if self.tls_files else True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.running():
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{scheme}://{self.address}/health", verify=verify,
                                     timeout=1.0)
                if response.is_success:
                    return True
            time.sleep(0.2)
        return False

    # -- the flwr CLI

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` CLI command against our SuperLink (private FLWR_HOME)."""
        return subprocess.run(  # noqa: S603
            [self._exe("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def _flwr_json(self, *args: str) -> dict:
        """A ``flwr ... --format json`` command's answer; DeployError if it failed."""
        result = self.flwr(*args, "--format", "json")
        start = result.stdout.find("{")
        try:
            answer = json.JSONDecoder().raw_decode(result.stdout[start:])[0] if start >= 0 else {}
        except json.JSONDecodeError:
            answer = {}
        if result.returncode != 0 or not answer.get("success"):
            message = answer.get("error-message") or result.stderr.strip() or result.stdout
            raise DeployError(f"flwr {' '.join(args[:2])} failed: {' '.join(message.split())}")
        return answer

    def register(self, keys: NodeKeys) -> int:
        """Register a SuperNode's public key with the SuperLink; its node id."""
        answer = self._flwr_json("supernode", "register", str(keys.public_key), CONNECTION)
        return int(answer["node-id"])

    def list_nodes(self) -> list[dict]:
        """``flwr supernode ls``: every node the SuperLink knows (id, status, times)."""
        return list(self._flwr_json("supernode", "ls", CONNECTION)["nodes"])

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
                node.registered_id = self.register(node.keys)
        self.supernodes.append(node)
        self._start_supernode(node)
        if wait:
            self.wait_joined(node)
        return node

    def supernode_command(self, node: SuperNode) -> list[str]:
        """``flower-supernode`` for one partition: the SuperLink's address, TLS trust (or
        ``--insecure``), the private key with authentication, its node config and its own
        Runtime API port."""
        command = [self._exe("flower-supernode"), "--superlink", self.address,
                   "--node-config", node.node_config, "--host", HOST, "--port", str(node.port)]
        if self.tls_files is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.tls_files.ca_cert)]
        if node.keys is not None:
            command += ["--auth-supernode-private-key", str(node.keys.private_key)]
        return command

    def _start_supernode(self, node: SuperNode) -> None:
        node.starts += 1
        node.port = free_port()
        node.node_id = None
        suffix = "" if node.starts == 1 else f"-restart{node.starts - 1}"
        node.process = self._spawn(f"{node.name}{suffix}", self.supernode_command(node))

    def wait_joined(self, node: SuperNode, timeout: float = START_TIMEOUT) -> int:
        """Wait until the SuperNode logged its node id (it is connected and active);
        DeployError with its last log lines if it exits or takes too long."""
        assert node.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := NODE_ID_PATTERN.search(node.process.log_text()):
                node.node_id = int(match.group(1))
                return node.node_id
            if not node.process.running():
                break
            time.sleep(0.2)
        raise DeployError(f"{node.name} did not join the SuperLink: {node.process.log_tail(8)}")

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
            status = {int(n["node-id"]): n["status"] for n in self.list_nodes()}
            if status.get(node_id) != "online":
                return
            time.sleep(2.0)
        raise DeployError(f"node {node_id} still online after {timeout:.0f} s")

    # -- runs

    def prepare(self, overrides: Sequence[str]) -> PreparedRun:
        """``prepare_deploy_run`` for this deployment's SuperNodes and app."""
        return prepare_deploy_run(overrides, self.num_nodes, self.tiers, self.app_dir)

    def submit(self, prepared: PreparedRun, echo: IO[str] | None = None) -> ActiveRun:
        """Start ``flwr run <app> <connection> --stream --run-config <toml>``; its output
        goes to ``flwr-run.log`` in the work folder (and to ``echo``)."""
        import tomli_w

        config_file = self.workdir / f"run-config-{prepared.run_dir.name}.toml"
        config_file.write_text(tomli_w.dumps(prepared.overrides), encoding="utf-8")
        app = stage_app(prepared.app_dir,
                        Path(tempfile.mkdtemp(prefix="app-", dir=self.workdir)) / "app")
        command = [self._exe("flwr"), "run", str(app), CONNECTION, "--stream",
                   "--run-config", str(config_file)]
        started = time.time()
        return ActiveRun(prepared, self._spawn("flwr-run", command, echo), started)

    def run(self, overrides: Sequence[str], echo: IO[str] | None = None) -> Path:
        """Run the app once with ``overrides``; the run folder (RunFailed otherwise)."""
        return self.submit(self.prepare(overrides), echo).wait()


# -- command line ---------------------------------------------------------------------------


DEPLOY_DESCRIPTION = (
    "Start flower-superlink and --nodes flower-supernode processes on this machine "
    "(optionally with TLS and SuperNode authentication), run the app once with `flwr run`, "
    "print the run folder and stop every process."
)


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_deploy_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``reefl deploy`` subcommand with its own options (``reefl.cli`` adds --app,
    --run-config and --preset, as for ``reefl run``, and dispatches to ``cmd_deploy``)."""
    deploy = commands.add_parser(
        "deploy",
        help="run the app once on a local Deployment Engine (SuperLink + SuperNodes)",
        description=DEPLOY_DESCRIPTION,
    )
    deploy.add_argument("--nodes", "-n", type=_positive_int, default=3, metavar="N",
                        help="number of SuperNodes, one per partition id 0..N-1 (default 3; "
                             "num-clients defaults to N)")
    deploy.add_argument("--tiers", default=None, metavar="T0,T1,...",
                        help="each SuperNode's tier (node config tier), in partition order; "
                             "default: the run config's tier-rule")
    deploy.add_argument("--tls", action="store_true",
                        help="TLS with a CA and server certificate made here with openssl")
    deploy.add_argument("--auth", action="store_true",
                        help="SuperNode authentication: a key pair per SuperNode, registered "
                             "with `flwr supernode register` (implies --tls)")
    deploy.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="keep FLWR_HOME, certificates, keys and every process's log in "
                             "DIR (default: a temporary folder, removed afterwards)")
    deploy.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the interrupted run in RUN_DIR from its checkpoint, "
                             "with exactly its config.json (as `reefl run --resume`)")
    return deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    """``reefl deploy``: 0 if the run wrote its final.json, else the error's exit code."""
    try:
        tiers = parse_tiers(args.tiers, args.nodes)
        prepared = prepare_deploy_run(args.run_config, args.nodes, tiers, args.app,
                                      resume=args.resume)
        if finished_final(prepared.run_dir, prepared.digest) is not None:
            _say(f"run {prepared.run_dir} has already finished; nothing to do")
            return 0
        tls = args.tls or args.auth
        with LocalDeployment(args.nodes, tls=tls, auth=args.auth, tiers=tiers,
                             app_dir=args.app, workdir=args.workdir) as deployment:
            _say(f"SuperLink {deployment.address} ({'TLS' if tls else 'insecure'}"
                 f"{', SuperNode authentication' if args.auth else ''}); SuperNodes "
                 + ", ".join(f"{n.node_config} (node {n.node_id})"
                             for n in deployment.supernodes))
            _say(f"run folder {prepared.run_dir}")
            run_dir = deployment.submit(prepared, echo=sys.stdout).wait()
    except LaunchError as err:
        started = not isinstance(err, RunConfigError)  # a config error stops before any process
        hint = (" (--workdir DIR keeps every process's log)"
                if started and args.workdir is None else "")
        print(f"reefl: error: {err}{hint}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("reefl: interrupted; all Flower processes stopped", file=sys.stderr, flush=True)
        return 130
    _say(f"run folder {run_dir}")
    return 0


def _say(message: str) -> None:
    print(f"reefl: {message}", flush=True)
