"""The one SuperLink process class, for a simulation (``reefl run``) and for a Deployment
Engine (``reefl deploy``), and the SuperNodes that join the latter.

A ``SuperLink`` is a ``flower-superlink`` on a free loopback port with a private FLWR_HOME
whose ``config.toml`` makes it the ``flwr`` CLI's default connection; for a deployment
optionally with TLS (``certificates``) and SuperNode authentication. Its processes belong to
the launch's ``ProcessGroup``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reefl.launch.certificates import NodeKeys, TlsFiles
from reefl.launch.errors import LaunchError, one_line
from reefl.launch.processes import ProcessGroup, TrackedProcess, free_port

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds a SuperLink gets to answer /health


class SuperLinkError(LaunchError):
    """A Flower process of the launch could not be started or did not come up."""


def write_flower_config(flwr_home: Path, address: str, connection_name: str,
                        root_certificates: Path | None = None) -> Path:
    """A private ``$FLWR_HOME/config.toml`` whose default connection is our SuperLink at
    ``address``: TLS trusting ``root_certificates`` if given, else insecure. Serialized with
    Flower's own helpers, so ``flwr`` reads it back as it wrote it."""
    import tomli_w
    from flwr.cli.flower_config import (
        FLOWER_CONFIG_FILE,
        SuperLinkConnection,
        SuperLinkConnectionTomlKey,
        serialize_superlink_connection,
    )

    if root_certificates is None:
        connection = SuperLinkConnection(connection_name, address=address, insecure=True)
    else:
        connection = SuperLinkConnection(connection_name, address=address,
                                         root_certificates=str(root_certificates))
    config = {SuperLinkConnectionTomlKey.SUPERLINK: {
        SuperLinkConnectionTomlKey.DEFAULT: connection_name,
        connection_name: serialize_superlink_connection(connection),
    }}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / FLOWER_CONFIG_FILE
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


class SuperLink:
    """``flower-superlink`` for one launch: ``--simulation`` (insecure, loopback) or a
    Deployment Engine (``tls`` files, ``auth`` for SuperNode authentication). ``start`` it,
    then drive it with ``flwr`` (the CLI, against this SuperLink only)."""

    def __init__(self, group: ProcessGroup, flwr_home: Path, log_dir: Path, connection: str,
                 *, simulation: bool, tls: TlsFiles | None = None, auth: bool = False
                 ) -> None:
        if auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        self.group = group
        self.flwr_home = flwr_home
        self.log_dir = log_dir
        self.connection = connection
        self.simulation = simulation
        self.tls, self.auth = tls, auth
        self.port = 0
        self.process: TrackedProcess | None = None
        self.fleet_address = ""  # where SuperNodes connect: the gateway (start_gateway)

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime API share one port)."""
        return f"{HOST}:{self.port}"

    def exe(self, name: str) -> str:
        """The path of Flower's command ``name`` on the launch's PATH."""
        found = shutil.which(name, path=self.group.env.get("PATH"))
        if found is None:
            raise SuperLinkError(f"'{name}' not found; install flwr[simulation] in this "
                                 "environment")
        return found

    def command(self) -> list[str]:
        """``flower-superlink`` on our loopback port with apps run in the user's environment; a
        simulation's with ``--simulation``, a deployment's with its TLS files (or
        ``--insecure``) and ``--enable-supernode-auth``."""
        command = [self.exe("flower-superlink"), "--host", HOST, "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        if self.simulation:
            return [*command, "--insecure", "--simulation", "--isolation", "subprocess"]
        if self.tls is None:
            return [*command, "--insecure"]
        command += ["--ssl-ca-certfile", str(self.tls.ca_cert),
                    "--ssl-certfile", str(self.tls.server_cert),
                    "--ssl-keyfile", str(self.tls.server_key)]
        return [*command, "--enable-supernode-auth"] if self.auth else command

    def start(self, attempts: int = 3) -> None:
        """Start it on a free port (another one if that was taken meanwhile) and point
        ``$FLWR_HOME/config.toml`` at it; SuperLinkError if it never answers /health."""
        for _ in range(attempts):
            self.port = free_port()
            write_flower_config(self.flwr_home, self.address, self.connection,
                                self.tls.ca_cert if self.tls else None)
            self.process = self.group.spawn("superlink", self.command(),
                                            self.log_dir / "superlink.log")
            if self._wait_healthy(self.process):
                return
            self.process.stop()
        assert self.process is not None
        raise SuperLinkError(f"flower-superlink did not start: "
                             f"{self.process.log_tail(1) or 'no output'}")

    def start_gateway(self, host: str, port: int = 0) -> str:
        """Start the Fleet gateway (``launch.gateway``) on ``host:port`` (a free port if 0),
        in front of this SuperLink; SuperNodes connect there. Its address."""
        for _ in range(3 if port == 0 else 1):
            listen = f"{host}:{port or free_port(host)}"
            shown = f"[{host}]:{listen.rsplit(':', 1)[1]}" if ":" in host else listen
            command = [sys.executable, "-m", "reefl.launch.gateway", shown,
                       f"{'https' if self.tls else 'http'}://{self.address}"]
            if self.tls:
                command += ["--certfile", str(self.tls.server_cert), "--keyfile",
                            str(self.tls.server_key), "--cafile", str(self.tls.ca_cert)]
            process = self.group.spawn("fleet-gateway", command,
                                       self.log_dir / "fleet-gateway.log")
            if self._wait_healthy(process, shown):
                self.fleet_address = shown
                return shown
            process.stop()
        raise SuperLinkError(f"the Fleet gateway did not start on {host}: "
                             f"{process.log_tail(1) or 'no output'}")

    def _wait_healthy(self, process: TrackedProcess, address: str | None = None) -> bool:
        """Whether ``address`` (default: the SuperLink's) answers ``/health`` within
        START_TIMEOUT while ``process`` runs."""
        import httpx

        scheme = "https" if self.tls else "http"
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.tls.ca_cert)) if self.tls else True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.running():
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{scheme}://{address or self.address}/health",
                                     verify=verify, timeout=1.0)
                if response.is_success:
                    return True
            time.sleep(0.1)
        return False

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` CLI command against this SuperLink (private FLWR_HOME)."""
        return subprocess.run(  # noqa: S603
            [self.exe("flwr"), *args], env=self.group.env, cwd=self.group.cwd,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def flwr_json(self, *args: str) -> dict:
        """A ``flwr ... --format json`` command's answer; SuperLinkError if it failed."""
        result = self.flwr(*args, "--format", "json")
        start = result.stdout.find("{")
        try:
            answer = json.JSONDecoder().raw_decode(result.stdout[start:])[0] if start >= 0 else {}
        except json.JSONDecodeError:
            answer = {}
        if result.returncode != 0 or not answer.get("success"):
            message = answer.get("error-message") or result.stderr.strip() or result.stdout
            raise SuperLinkError(f"flwr {' '.join(args[:2])} failed: {one_line(message)}")
        return answer

    def register(self, keys: NodeKeys) -> int:
        """Register a SuperNode's public key with the SuperLink; its node id."""
        answer = self.flwr_json("supernode", "register", str(keys.public_key), self.connection)
        return int(answer["node-id"])

    def list_nodes(self) -> list[dict]:
        """``flwr supernode ls``: every node the SuperLink knows (id, status, times)."""
        return list(self.flwr_json("supernode", "ls", self.connection)["nodes"])


@dataclass
class SuperNode:
    """One SuperNode of a deployment: its partition (and tier), key pair and process."""

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

    def command(self, superlink: SuperLink) -> list[str]:
        """``flower-supernode`` for this partition: the SuperLink's address, TLS trust (or
        ``--insecure``), the private key with authentication, its node config and its own
        Runtime API port."""
        command = [superlink.exe("flower-supernode"), "--superlink",
                   superlink.fleet_address or superlink.address,
                   "--node-config", self.node_config, "--host", HOST, "--port", str(self.port)]
        if superlink.tls is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(superlink.tls.ca_cert)]
        if self.keys is not None:
            command += ["--auth-supernode-private-key", str(self.keys.private_key)]
        return command
