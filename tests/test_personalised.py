"""Personalised evaluation (``personalised-epochs``): the per-exit summary over clients, the
check of a client's reply, the client's own step (test, fine-tune with the rounds' training,
test again), and whole in-process runs through the real ServerApp loop and ClientApp
handlers (``federation.local``): personalised.json, final.json, failures, resume, and the
default run left as it was."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from reefl.config import RunConfig
from reefl.federation.client_app import (
    ClientSetup,
    client_round,
    personalised_accuracies,
    tier_model,
)
from reefl.federation.inputs import run_data
from reefl.federation.local import LocalGrid, _task_identity, run_local
from reefl.federation.personalised import exit_summary
from reefl.federation.replies import (
    ClientAccuracies,
    RejectedReply,
    SentTo,
    checked_accuracies,
)
from reefl.methods import build_method
from reefl.training import server_learning_rate

TINY = {"num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 2, "eval-every": 1, "fraction-train": 0.5, "local-epochs": 1,
        "seed": 3, "train-examples": 400, "test-examples": 200, "batch-size": 16}


def _config(tmp_path: Path, name: str, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY, **extra, "output-dir": str(tmp_path),
                                "run-name": name})


def _json(run_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((run_dir / name).read_text())


# --- the summary over clients ---------------------------------------------------------------

def test_exit_summary_is_mean_and_population_spread_per_exit() -> None:
    clients = [
        ClientAccuracies(0, 0, [0], 10, [50.0], [60.0]),
        ClientAccuracies(1, 1, [0, 1], 10, [70.0, 80.0], [90.0, 100.0]),
        ClientAccuracies(2, 2, [0, 1, 2], 10, [30.0, 40.0, 20.0], [30.0, 60.0, 40.0]),
        ClientAccuracies(3, 2, [0, 1, 2], 0, [], []),  # empty local test split: left out
    ]
    exit0, exit1, exit2 = exit_summary(clients)
    assert exit0 == {"exit": 0, "clients": 3, "global_mean": pytest.approx(50.0),
                     "global_std": pytest.approx(math.sqrt(800 / 3)),  # ddof=0
                     "personalised_mean": pytest.approx(60.0),
                     "personalised_std": pytest.approx(math.sqrt(600))}
    assert exit1 == {"exit": 1, "clients": 2, "global_mean": pytest.approx(60.0),
                     "global_std": pytest.approx(20.0), "personalised_mean": pytest.approx(80.0),
                     "personalised_std": pytest.approx(20.0)}
    assert exit2 == {"exit": 2, "clients": 1, "global_mean": 20.0, "global_std": 0.0,
                     "personalised_mean": 40.0, "personalised_std": 0.0}


def test_exit_summary_goes_by_exit_id_not_position() -> None:
    """A one-exit tier model (InclusiveFL: exit ``tier`` alone) counts for that exit."""
    clients = [ClientAccuracies(0, 0, [0], 5, [10.0], [20.0]),
               ClientAccuracies(1, 1, [1], 5, [30.0], [50.0])]
    assert [(row["exit"], row["clients"], row["global_mean"], row["personalised_mean"])
            for row in exit_summary(clients)] == [(0, 1, 10.0, 20.0), (1, 1, 30.0, 50.0)]
    assert exit_summary([ClientAccuracies(0, 1, [0, 1], 0, [], [])]) == []


# --- the check of a reply -----------------------------------------------------------------

SENT = SentTo(partition_id=2, node_id=3, tier=1, max_examples=50, payload={})


def _reply(metrics: dict[str, Any]) -> Message:
    with _task_identity(3):  # Flower's messages read the sender's identity
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=0,
                       message_type="evaluate")


def test_a_good_reply_becomes_the_clients_accuracies() -> None:
    reply = _reply({"num-test-examples": 40, "global-accuracy": [12.5, 100.0],
                    "personalised-accuracy": [0.0, 50.0]})
    assert checked_accuracies(reply, SENT, [0, 1]) == ClientAccuracies(
        2, 1, [0, 1], 40, [12.5, 100.0], [0.0, 50.0])
    empty = _reply({"num-test-examples": 0, "global-accuracy": [],
                    "personalised-accuracy": []})
    assert checked_accuracies(empty, SENT, [0, 1]).global_accuracy == []


@pytest.mark.parametrize("metrics, reason", [
    ({"global-accuracy": [1.0, 2.0], "personalised-accuracy": [1.0, 2.0]}, "num-test-examples"),
    ({"num-test-examples": -1, "global-accuracy": [], "personalised-accuracy": []},
     "num-test-examples"),
    ({"num-test-examples": 9, "global-accuracy": [1.0], "personalised-accuracy": [1.0, 2.0]},
     "global-accuracy must be a list of 2"),
    ({"num-test-examples": 9, "global-accuracy": [1.0, 2.0]}, "personalised-accuracy"),
    ({"num-test-examples": 9, "global-accuracy": [1.0, float("nan")],
      "personalised-accuracy": [1.0, 2.0]}, "outside [0, 100]"),
    ({"num-test-examples": 9, "global-accuracy": [1.0, 2.0],
      "personalised-accuracy": [1.0, 100.5]}, "outside [0, 100]"),
    ({"num-test-examples": 0, "global-accuracy": [1.0, 2.0],
      "personalised-accuracy": [1.0, 2.0]}, "list of 0"),
])
def test_a_bad_reply_is_rejected_with_its_reason(metrics: dict[str, Any], reason: str) -> None:
    with pytest.raises(RejectedReply, match=reason.replace("[", r"\[")):
        checked_accuracies(_reply(metrics), SENT, [0, 1])


# --- the client's step ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup() -> ClientSetup:
    cfg = RunConfig.from_flat(TINY)
    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    return ClientSetup(cfg, data, pipeline, method, method.initial_state())


def _model(setup: ClientSetup, tier: int) -> torch.nn.Module:
    payload = setup.method.client_payload(setup.initial, tier)
    return tier_model(setup.method, setup.initial, tier, {k: v.clone() for k, v in
                                                          payload.items()})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_zero_epochs_leave_the_model_and_its_accuracy_as_they_are(setup: ClientSetup) -> None:
    model = _model(setup, tier=1)
    before = _state(model)
    metrics = personalised_accuracies(setup, model, 1, 1, 2, 0.01, 0, {})
    assert metrics["num-test-examples"] == len(setup.data.client_test_indices[1]) > 0
    assert len(metrics["global-accuracy"]) == 2  # exits 0 and 1 of a tier-1 client
    assert metrics["personalised-accuracy"] == metrics["global-accuracy"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fine_tuning_is_the_rounds_local_training(setup: ClientSetup) -> None:
    """One epoch of fine-tuning moves the model exactly as round 2's local training of this
    client (local-epochs=1) does, at the same learning rate."""
    model = _model(setup, tier=1)
    before = _state(model)
    metrics = personalised_accuracies(setup, model, 1, 1, 2, 0.05, 1, {})
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    payload = setup.method.client_payload(setup.initial, 1)
    trained, _ = client_round(setup, 1, 1, 2, 0.05, payload, {})
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    counts = len(setup.data.client_test_indices[1])
    assert all(0 <= a <= 100 and (a * counts / 100) == pytest.approx(round(a * counts / 100))
               for a in metrics["global-accuracy"] + metrics["personalised-accuracy"])


def test_an_empty_local_test_split_tests_and_trains_nothing(setup: ClientSetup) -> None:
    indices = list(setup.data.client_test_indices)
    indices[0] = np.zeros(0, dtype=np.int64)
    empty = dataclasses.replace(setup, data=dataclasses.replace(
        setup.data, client_test_indices=indices))
    model = _model(empty, tier=0)
    before = _state(model)
    assert personalised_accuracies(empty, model, 0, 0, 2, 0.05, 3, {}) == {
        "num-test-examples": 0, "global-accuracy": [], "personalised-accuracy": []}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- whole runs, in process -----------------------------------------------------------------

class Seen:
    """A reply hook that records the message types the clients answered."""

    def __init__(self) -> None:
        self.types: list[str] = []

    def __call__(self, pid: int, reply: Message) -> Message:
        self.types.append(reply.metadata.message_type)
        return reply


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Seen]:
    cfg = _config(tmp_path_factory.mktemp("plain"), "plain")
    seen = Seen()
    return run_local(cfg, LocalGrid(cfg, seen)), seen


@pytest.fixture(scope="module")
def personalised_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Seen]:
    cfg = _config(tmp_path_factory.mktemp("personalised"), "run", **{"personalised-epochs": 1})
    seen = Seen()
    return run_local(cfg, LocalGrid(cfg, seen)), seen


def test_the_default_run_sends_no_evaluate_message(plain_run: tuple[Path, Seen]) -> None:
    run_dir, seen = plain_run
    assert "evaluate" not in seen.types and "train" in seen.types
    assert not (run_dir / "personalised.json").exists()
    assert "personalised" not in _json(run_dir, "final.json")


def test_a_run_with_personalised_epochs_writes_personalised_json(
        personalised_run: tuple[Path, Seen], plain_run: tuple[Path, Seen]) -> None:
    run_dir, seen = personalised_run
    assert seen.types.count("evaluate") == 4  # one message per client on the roster
    result = _json(run_dir, "personalised.json")
    cfg = RunConfig.from_flat(_json(run_dir, "config.json"))
    assert result["epochs"] == 1 and result["lr"] == server_learning_rate(1, cfg)
    assert (result["clients_answered"], result["clients_failed"]) == (4, 0)
    clients = result["clients"]
    assert [c["partition_id"] for c in clients] == [0, 1, 2, 3]
    assert [c["tier"] for c in clients] == [0, 1, 0, 1]  # num-exits=2: tiers alternate
    for client in clients:
        assert client["num_test_examples"] > 0
        assert client["exits"] == list(range(client["tier"] + 1))
        assert len(client["global_accuracy"]) == len(client["personalised_accuracy"]) == \
            client["tier"] + 1
    assert [(row["exit"], row["clients"]) for row in result["exits"]] == [(0, 4), (1, 2)]
    assert result["exits"] == exit_summary(
        [ClientAccuracies(**c) for c in clients])
    # one epoch on their own data helps these clients of a two-round model on average
    assert result["exits"][0]["personalised_mean"] > result["exits"][0]["global_mean"]
    assert _json(run_dir, "final.json")["personalised"] == result["exits"]
    # the global model and the rounds are those of the run without personalised evaluation
    plain_dir = plain_run[0]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2
    plain, mine = load_file(str(plain_dir / "model.safetensors")), load_file(
        str(run_dir / "model.safetensors"))
    assert all(torch.equal(plain[k], mine[k]) for k in plain)
    assert _json(run_dir, "final.json")["exit_accuracy"] == \
        _json(plain_dir, "final.json")["exit_accuracy"]


def test_a_client_that_fails_or_times_out_is_left_out_and_counted(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "run", **{"personalised-epochs": 1})

    def spoil(pid: int, reply: Message) -> Message | None:
        if reply.metadata.message_type != "evaluate" or pid == 0:
            return reply
        if pid == 1:
            raise RuntimeError("out of memory (injected)")
        if pid == 2:
            return None  # no reply: timed out
        reply.content["metrics"] = MetricRecord({"num-test-examples": 5})  # no accuracies
        return reply

    result = _json(run_local(cfg, LocalGrid(cfg, spoil)), "personalised.json")
    assert (result["clients_answered"], result["clients_failed"]) == (1, 3)
    assert [c["partition_id"] for c in result["clients"]] == [0]
    assert [(row["exit"], row["clients"]) for row in result["exits"]] == [(0, 1)]


class Stop(BaseException):
    """Stands for SIGINT/SIGKILL: not an Exception, so nothing on the way catches it."""


def test_a_run_stopped_after_its_last_round_does_the_personalised_step_on_resume(
        tmp_path: Path, personalised_run: tuple[Path, Seen]) -> None:
    cfg = _config(tmp_path, "run", **{"personalised-epochs": 1})

    def stop_after_last(record: dict[str, Any]) -> None:
        if record["round"] == cfg.num_server_rounds:
            raise Stop

    with pytest.raises(Stop):
        run_local(cfg, on_round=stop_after_last)
    assert not (tmp_path / "run" / "personalised.json").exists()
    seen = Seen()
    resumed = dataclasses.replace(cfg, resume=True)
    run_dir = run_local(resumed, LocalGrid(resumed, seen))
    assert "train" not in seen.types and seen.types.count("evaluate") == 4
    assert _json(run_dir, "personalised.json") == _json(personalised_run[0],
                                                        "personalised.json")
