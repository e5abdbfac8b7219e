"""reefl.launch.deployment: certificates, keys, commands and the CLI without processes; and one real
Deployment Engine run (SuperLink + 3 SuperNodes, TLS and SuperNode authentication, one
SuperNode killed mid-round and restarted, one unregistered SuperNode refused)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from reefl.cli import build_parser
from reefl.launch.certificates import NodeKeys, make_node_keys, make_tls_certificates
from reefl.launch.deployment import CONNECTION, LocalDeployment, parse_tiers, prepare_deploy_run
from reefl.launch.errors import RunConfigError
from reefl.launch.superlink import SuperLink, SuperNode, write_flower_config
from reefl.launch.watchdog import still_running

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)


# -- without processes ------------------------------------------------------------------------


def test_certificates_keys_commands_and_parser(tmp_path: Path) -> None:
    """The certificates and the node keys load with `cryptography` and are what
    Flower accepts; the commands carry Flower's TLS/auth flags and parse with Flower's own
    parsers; the CLI options and the run config come out as documented."""
    tls = make_tls_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    load_pem_private_key(tls.server_key.read_bytes(), password=None)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}

    keys = make_node_keys(tmp_path / "keys", "node0")
    private = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert public == private.public_key()
    assert keys.private_key.stat().st_mode & 0o077 == 0
    from flwr.cli.supernode.register import try_load_public_key  # what `register` reads

    assert try_load_public_key(keys.public_key)

    home = tmp_path / "home"
    write_flower_config(home, "127.0.0.1:9093", CONNECTION, tls.ca_cert)
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == CONNECTION
    assert config["superlink"][CONNECTION] == {"address": "127.0.0.1:9093",
                                               "root-certificates": str(tls.ca_cert)}

    deployment = LocalDeployment(3, tls=True, auth=True, tiers=[0, 1, 2], workdir=tmp_path)
    deployment.superlink.tls, deployment.superlink.auth = tls, True
    deployment.superlink.port = 9093
    link = deployment.superlink.command()
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
            "--enable-supernode-auth"} <= set(link) and "--insecure" not in link
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    assert _parse_args_run_superlink().parse_args(link[1:]).enable_supernode_auth
    node = SuperNode(2, 1, keys, port=9200)
    parsed = _parse_args_run_supernode().parse_args(node.command(deployment.superlink)[1:])
    assert (parsed.superlink, parsed.node_config, parsed.port) == ("127.0.0.1:9093",
                                                                   "partition-id=2 tier=1", 9200)
    assert parsed.root_certificates == str(tls.ca_cert) and not parsed.insecure
    assert parsed.auth_supernode_private_key == str(keys.private_key)
    with pytest.raises(ValueError, match="TLS"):
        LocalDeployment(3, auth=True)
    with pytest.raises(ValueError, match="TLS"):
        SuperLink(deployment.group, tmp_path, tmp_path, CONNECTION, simulation=False, auth=True)

    args = build_parser().parse_args(["deploy", "--nodes", "3", "--auth", "--tiers", "0,1,2",
                              "-c", "num-server-rounds=1"])
    assert (args.nodes, args.auth, args.tls, args.run_config) == (
        3, True, False, ["num-server-rounds=1"])
    assert parse_tiers(args.tiers, 3) == [0, 1, 2] and parse_tiers(None, 3) is None
    for bad in ("0,1", "0,x,2"):
        with pytest.raises(RunConfigError):
            parse_tiers(bad, 3)
    prepared = prepare_deploy_run([f"output-dir='{tmp_path}'"], 3)
    assert prepared.config["num-clients"] == 3 and prepared.run_dir.parent == tmp_path
    assert prepare_deploy_run(["num-clients=5"], 3).config["num-clients"] == 5
    with pytest.raises(RunConfigError, match="tiers"):
        prepare_deploy_run(["num-exits=3"], 3, tiers=[0, 1, 3])


# -- a real deployment ------------------------------------------------------------------------

KILLED = 1  # the partition whose SuperNode is killed during round 1 and restarted


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flower_processes(deployment: LocalDeployment) -> list[psutil.Process]:
    """Every process of the deployment seen so far (started ones and their children)."""
    return [proc for process in deployment.group.processes for proc in process.alive()]


@pytest.mark.slow
@pytest.mark.extended
def test_deployment_tls_auth_kill_restart(tmp_path: Path) -> None:
    """3 rounds of ReeFL with tiers 0/1/2 on a SuperLink + 3 SuperNodes (TLS, SuperNode
    authentication). The SuperNode of partition 1 is SIGKILLed once it received its round-1
    train message, and restarted with the same key and partition id; a fourth SuperNode
    with an unregistered key tries to join as partition 0.

    Needs the server side of issue 11 (roll-call-timeout, round-timeout, the per-round
    ``clients``/``nodes`` records in metrics.jsonl)."""
    overrides = [
        "num-exits=3 fraction-train=1.0 num-server-rounds=3 local-epochs=1",
        "train-examples=600 test-examples=300 eval-every=3",
        # Generous for a loaded 2-core machine: a ClientApp process starts per message.
        "round-timeout=120.0 roll-call-timeout=60.0",
        f"output-dir='{tmp_path / 'runs'}' run-name='deploy'",
    ]
    started = time.monotonic()
    deployment = LocalDeployment(3, tls=True, auth=True, tiers=[0, 1, 2],
                                 workdir=tmp_path / "work")
    with deployment:  # leaving it stops every process, also when an assertion fails
        registered = {n.partition_id: n.registered_id for n in deployment.supernodes}
        assert all(n.node_id == n.registered_id for n in deployment.supernodes)

        impostor = deployment.add_supernode(0, register=False, wait=False)
        assert impostor.process is not None
        assert impostor.process.popen.wait(60) != 0
        assert "Failed to activate SuperNode" in impostor.process.log_text()
        known = {int(n["node-id"]) for n in deployment.superlink.list_nodes()}
        assert known == set(registered.values())

        run = deployment.submit(deployment.prepare(overrides))
        victim = deployment.supernodes[KILLED]
        assert deployment.wait_for_log(victim, r"Receiving: train message", 300)
        deployment.kill_supernode(victim)
        assert victim.process is not None and not victim.process.running()
        assert deployment.restart_supernode(victim) == registered[KILLED]
        rounds_before_return = len(_records(run.run_dir))
        run_dir = run.wait(900)
        processes = _flower_processes(deployment)
    assert len(processes) > 4 and not [p for p in processes if still_running(p)]
    elapsed = time.monotonic() - started
    print(f"deployment: 3 SuperNodes, 3 rounds, kill + restart: {elapsed:.0f} s")

    assert (run_dir / "final.json").is_file()
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert KILLED not in records[0]["clients"]["used"]
    assert any(KILLED in r["clients"]["used"] for r in records[rounds_before_return:]), (
        [r["clients"] for r in records])
    joined = {int(pid): node for r in records for pid, node in r["nodes"]["joined"].items()}
    assert joined == registered  # the impostor never got a node id, let alone a partition
    assert all(not r["clients"]["rejected"] for r in records)


class _FakeDeployment:
    """LocalDeployment without processes: ``submit`` echoes two coloured log lines and
    writes the run's final.json, as a finished flwr run would."""

    address = "127.0.0.1:9093"
    fleet_address = "127.0.0.1:9092"
    supernodes: list = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _FakeDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, prepared, echo):  # noqa: ANN001, ANN201
        class Run:
            def wait(self) -> Path:
                echo.write("\x1b[92mINFO \x1b[0m:      Starting Flower ServerApp\n")
                prepared.run_dir.mkdir(parents=True, exist_ok=True)
                (prepared.run_dir / "final.json").write_text(json.dumps({
                    "method": "reefl", "seed": 0, "rounds": 1, "wall_seconds": 2.0,
                    "exit_blocks": [0], "exit_accuracy": [50.0], "exit_loss": [1.0],
                    "mean_accuracy": 50.0, "ensemble_accuracy": 50.0,
                    "config_digest": prepared.digest}))
                return prepared.run_dir
        return Run()


def test_reefl_deploy_writes_flower_log_and_prints_the_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from reefl.cli import main
    from reefl.launch import deployment

    monkeypatch.setattr(deployment, "LocalDeployment", _FakeDeployment)
    assert main(["deploy", "-v", "-c", f"output-dir='{tmp_path}' run-name='d'"]) == 0
    out = capsys.readouterr().out
    assert "INFO :      Starting Flower ServerApp" in out and "\x1b[" not in out  # not a tty
    assert "reefl · seed 0 · 1 round · 2 s of training" in out
    log = (tmp_path / "d" / "flower.log").read_text()
    assert log == "INFO :      Starting Flower ServerApp\n"


# -- a stranger on another host ---------------------------------------------------------------


@pytest.fixture
def stranger_namespace():  # noqa: ANN201 - yields (namespace, host-side address)
    """A network namespace joined to this host by a veth pair: 10.231.<n>.1 here, .2 there.
    Processes run in it with ``ip netns exec`` are another host as far as the network goes:
    they reach only this host's veth address (not its loopback interface)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    n = os.getpid() % 250
    name, here, there = f"reefl-stranger-{n}", f"rflh{n}", f"rfls{n}"

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True)

    ip("netns", "del", name, check=False)
    ip("link", "del", here, check=False)
    try:
        ip("netns", "add", name)
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", name)
        ip("addr", "add", f"10.231.{n}.1/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"10.231.{n}.2/30", "dev", there)
        ip("netns", "exec", name, "ip", "link", "set", there, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, f"10.231.{n}.1"
    finally:
        ip("link", "del", here, check=False)
        ip("netns", "del", name, check=False)


@pytest.mark.slow
@pytest.mark.extended
def test_a_stranger_can_neither_register_a_key_nor_join(
        tmp_path: Path, stranger_namespace: tuple[str, str]) -> None:
    """From another host (a network namespace) that knows the Fleet address and holds the
    public ca.crt: `flwr supernode register` fails, through the Fleet gateway and at the
    SuperLink's port; a SuperNode with its own key cannot join; a SuperNode whose key the
    operator registered joins from there (the Fleet API is reachable)."""
    import subprocess

    namespace, host = stranger_namespace
    with LocalDeployment(0, tls=True, auth=True, workdir=tmp_path / "work",
                         fleet_host=host) as deployment:
        tls = deployment.superlink.tls
        assert tls is not None and deployment.fleet_address.startswith(f"{host}:")
        link_port = deployment.superlink.port
        env = {**os.environ, "FLWR_HOME": str(tmp_path / "stranger-home")}

        def stranger(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", namespace, *command], env=env,
                                  capture_output=True, text=True, timeout=timeout,
                                  check=False)

        own = make_node_keys(tmp_path / "stranger-keys", "own")
        for address in (deployment.fleet_address, f"{host}:{link_port}"):
            write_flower_config(tmp_path / "stranger-home", address, "there", tls.ca_cert)
            result = stranger(deployment.superlink.exe("flwr"), "supernode", "register",
                              str(own.public_key), "there", "--format", "json")
            start = result.stdout.find("{")  # flwr --format json exits 0 on failure too
            answer = json.loads(result.stdout[start:]) if start >= 0 else {}
            assert result.returncode != 0 or answer.get("success") is False, (
                address, result.stdout)
        assert deployment.superlink.list_nodes() == []  # nothing was registered

        def supernode(keys: NodeKeys, port: int, log: Path) -> subprocess.Popen[bytes]:
            """A SuperNode in the namespace, in a session of its own (with the SuperExec it
            starts), its output in ``log``."""
            with log.open("wb") as out:
                return subprocess.Popen(
                    ["ip", "netns", "exec", namespace,
                     deployment.superlink.exe("flower-supernode"),
                     "--superlink", deployment.fleet_address, "--root-certificates",
                     str(tls.ca_cert), "--auth-supernode-private-key", str(keys.private_key),
                     "--node-config", "partition-id=0", "--host", "127.0.0.1", "--port",
                     str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)

        def stop(process: subprocess.Popen[bytes]) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)

        refused = supernode(own, 9201, tmp_path / "refused.log")
        try:
            code = refused.wait(90)
        finally:
            stop(refused)
        out = (tmp_path / "refused.log").read_text(errors="replace")
        assert code != 0 and "Failed to activate SuperNode" in out, out

        invited = make_node_keys(tmp_path / "stranger-keys", "invited")
        node_id = deployment.superlink.register(invited)
        joined = supernode(invited, 9202, tmp_path / "joined.log")
        try:
            deadline, out = time.monotonic() + 90, ""
            while time.monotonic() < deadline and "SuperNode ID" not in out:
                time.sleep(0.5)
                out = (tmp_path / "joined.log").read_text(errors="replace")
            assert f"SuperNode ID: {node_id}" in out, out
        finally:
            stop(joined)
