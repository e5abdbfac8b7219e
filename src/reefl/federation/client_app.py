"""The Flower ClientApp: tell the server who it is, train its tier's sub-model, and (when
``personalised-epochs`` > 0, after the last round) test it on its local test split before and
after fine-tuning. It keeps nothing across rounds: what a method keeps per client travels
with the server's messages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from reefl.config import RunConfig
from reefl.data import (
    FederatedData,
    InputPipeline,
    client_loader,
    client_test_loader,
    held_out_loader,
    held_out_split,
)
from reefl.evaluation import evaluate_exits
from reefl.federation import message_poll
from reefl.federation.inputs import run_data
from reefl.federation.tiers import client_tier
from reefl.methods import Method, build_method
from reefl.training import train_locally

app = ClientApp()

# Flower's simulation process imports this module before its runtime starts polling the
# SuperNodes' messages: the place to replace the poll's quadratic sweep (message_poll).
message_poll.install()


@lru_cache(maxsize=4)
def _setup(cfg: RunConfig) -> tuple[FederatedData, InputPipeline, Method]:
    """The run's data, input pipeline and method, built once per process (a simulated
    ClientApp serves many partitions)."""
    data, pipeline, task = run_data(cfg)
    return data, pipeline, build_method(cfg, task)


@lru_cache(maxsize=1)
def _initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The run's initial global model (seeded, pretrained backbone loaded), computed once
    per process: the source of every frozen parameter, which the server never sends."""
    return _setup(cfg)[2].initial_state()


def tier_model(method: Method, initial: dict[str, torch.Tensor], tier: int,
               payload: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tier's model: trainable parameters from the server, frozen ones from the initial
    state. Built on the meta device and filled by assignment: nothing is initialised twice."""
    state = method.tier_state(initial, tier)
    state.update(payload)
    with torch.device("meta"):
        model = method.build_model(tier)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _identity(context: Context) -> tuple[RunConfig, int, int, int]:
    """This node's run config, partition id, tier and number of training examples (its
    shard less the method's held-out part): a node config may state a tier or a budget."""
    cfg = RunConfig.from_flat(dict(context.run_config))
    partition_id = int(context.node_config["partition-id"])
    data, _, method = _setup(cfg)
    train_idx, _ = held_out_split(data, partition_id, method.held_out_fraction, cfg.seed)
    tier = client_tier(partition_id, cfg, dict(context.node_config), len(train_idx))
    return cfg, partition_id, tier, len(train_idx)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Answer the server's roll call: partition id, tier and number of training examples."""
    _, partition_id, tier, num_examples = _identity(context)
    record = ConfigRecord({"partition-id": partition_id, "tier": tier,
                           "num-examples": num_examples})
    return Message(RecordDict({"client": record}), reply_to=msg)


def _received(msg: Message) -> tuple[ConfigRecord, dict[str, torch.Tensor],
                                      dict[str, torch.Tensor]]:
    """A server message's config, its payload (the tier's trainable tensors) and this
    client's state that the server keeps across rounds (FedDyn's g; empty for most
    methods)."""
    content = msg.content
    client_state = (content["client-state"].to_torch_state_dict()
                    if "client-state" in content else {})
    return content["config"], content["arrays"].to_torch_state_dict(), client_state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load what the server sent, train one round locally, send the same tensors back."""
    cfg, partition_id, tier, _ = _identity(context)
    data, pipeline, method = _setup(cfg)
    config, payload, client_state = _received(msg)
    state, metrics = client_round(
        ClientSetup(cfg, data, pipeline, method, _initial_state(cfg)), partition_id, tier,
        int(config["server-round"]), float(config["lr"]), payload, client_state)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    if client_state:
        content["client-state"] = ArrayRecord({k: v.cpu() for k, v in client_state.items()})
    return Message(content, reply_to=msg)


@app.evaluate()
def personalise(msg: Message, context: Context) -> Message:
    """Personalised evaluation (``personalised-epochs``): the tier's model from the final
    global model the server sent, tested on this client's local test split before and after
    ``epochs`` epochs of local fine-tuning; replies with the accuracies, no tensors."""
    cfg, partition_id, tier, _ = _identity(context)
    data, pipeline, method = _setup(cfg)
    config, payload, client_state = _received(msg)
    setup = ClientSetup(cfg, data, pipeline, method, _initial_state(cfg))
    metrics = personalised_accuracies(
        setup, tier_model(method, setup.initial, tier, payload), partition_id, tier,
        int(config["server-round"]), float(config["lr"]), int(config["epochs"]), client_state)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@dataclass(frozen=True)
class ClientSetup:
    """What a client process builds once per run: config, data, pipeline, method and the
    initial global state (the source of every frozen parameter)."""

    cfg: RunConfig
    data: FederatedData
    pipeline: InputPipeline
    method: Method
    initial: dict[str, torch.Tensor]


def client_round(setup: ClientSetup, partition_id: int, tier: int, server_round: int,
                 lr: float, payload: dict[str, torch.Tensor],
                 client_state: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One client's local round: its tier's model from ``payload`` (and the initial state for
    the frozen parts), trained on its shard; returns the payload's tensors after training
    and the metrics (with ``num-examples``). ``client_state`` (the method's per-client
    state, e.g. FedDyn's g) is updated in place. Seeded by (seed, round, partition id)."""
    model = tier_model(setup.method, setup.initial, tier, payload)
    metrics = train_on_shard(setup, model, partition_id, tier, server_round, lr, client_state,
                             setup.cfg.local_epochs)
    state = model.state_dict()
    return {k: state[k].cpu() for k in payload}, metrics


def train_on_shard(setup: ClientSetup, model: torch.nn.Module, partition_id: int, tier: int,
                   server_round: int, lr: float, client_state: dict[str, torch.Tensor],
                   epochs: int) -> dict[str, float]:
    """Train ``model`` (the tier's) in place on this client's shard for ``epochs`` epochs,
    exactly as a round does (``train_locally``: the method's loss and penalty, its held-out
    split); returns the training metrics with ``num-examples``. Seeded by (seed, round,
    partition id), which fixes the data order and augmentation."""
    cfg, data, method = setup.cfg, setup.data, setup.method
    if epochs != cfg.local_epochs:
        cfg = dataclasses.replace(cfg, local_epochs=epochs)
    seed = int(np.random.SeedSequence([cfg.seed, server_round, partition_id]).generate_state(1)[0])
    torch.manual_seed(seed)
    train_idx, held_idx = held_out_split(data, partition_id, method.held_out_fraction, cfg.seed)
    loader = client_loader(data, setup.pipeline, partition_id, cfg.batch_size, seed, train_idx)
    held_out = (held_out_loader(data, setup.pipeline, held_idx, cfg.batch_size) if len(held_idx)
                else None)
    metrics = train_locally(model, loader, method, cfg, lr, server_round, _device(),
                            client_state, held_out, method.exit_ids(tier))
    metrics["num-examples"] = len(train_idx)
    return metrics


def personalised_accuracies(setup: ClientSetup, model: torch.nn.Module, partition_id: int,
                            tier: int, server_round: int, lr: float, epochs: int,
                            client_state: dict[str, torch.Tensor]
                            ) -> dict[str, int | list[float]]:
    """Accuracy (%) of each exit of ``model`` (the tier's, from the final global model) on
    this client's local test split, then again after fine-tuning it in place for ``epochs``
    epochs with the rounds' own local training (``train_on_shard``) at ``lr`` (the server
    sends the last round's learning rate) as round ``server_round`` (the last) trains.
    Returns the reply's metrics: ``num-test-examples``, ``global-accuracy`` and
    ``personalised-accuracy``; with an empty test split nothing is trained and both lists
    are empty."""
    cfg, device = setup.cfg, _device()
    num_test = len(setup.data.client_test_indices[partition_id])
    if num_test == 0:
        return {"num-test-examples": 0, "global-accuracy": [], "personalised-accuracy": []}
    loader = client_test_loader(setup.data, setup.pipeline, partition_id, cfg.eval_batch_size)
    before = evaluate_exits(model, loader, cfg, device)["exit_accuracy"]
    train_on_shard(setup, model, partition_id, tier, server_round, lr, client_state, epochs)
    after = evaluate_exits(model, loader, cfg, device)["exit_accuracy"]
    return {"num-test-examples": num_test, "global-accuracy": before,
            "personalised-accuracy": after}


def _device() -> torch.device:
    """Where a client trains and tests: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
