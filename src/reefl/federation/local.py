"""The rounds of a run in one process, without Flower: for experiments with many short runs
(one Flower simulation costs tens of seconds to start and stop) and for checking the app.

It calls what the Flower apps call, in the same order: the strategy's seeded sampling
(``round_participants``), the method's payload and server update, the ClientApp's
``client_round`` (seeded per client and round) with each client's state kept here instead
of in Flower's ``context.state``, and the ServerApp's evaluation of every exit. So a run gives
the same global model as ``reefl run`` with the same config, bit for bit
(``tests/test_local_run.py``). It writes no run folder: the caller gets the records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from reefl.config import RunConfig
from reefl.data import test_loader
from reefl.evaluation import evaluate_exits
from reefl.federation.client_app import ClientSetup, client_round
from reefl.federation.inputs import run_data
from reefl.federation.strategy import round_participants, train_metrics, weighted_metrics
from reefl.federation.tiers import client_tier
from reefl.methods import ClientUpdate, build_method
from reefl.training import server_learning_rate

RoundCallback = Callable[[dict[str, Any]], None]


def run_in_process(cfg: RunConfig, on_round: RoundCallback | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run every round of ``cfg`` here; returns the final global state and one record per
    round (the training metrics, and the evaluation where it is due, as in metrics.jsonl).
    ``on_round`` is called with each record as it is made."""
    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    initial = method.initial_state()
    setup = ClientSetup(cfg, data, pipeline, method, initial)
    tiers = {pid: client_tier(pid, cfg, {}) for pid in range(cfg.num_clients)}
    client_states: dict[int, dict[str, torch.Tensor]] = {pid: {} for pid in tiers}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = test_loader(data, pipeline, cfg.eval_batch_size)
    state, records = initial, []
    for server_round in range(1, cfg.num_server_rounds + 1):
        lr = server_learning_rate(server_round - 1, cfg)
        updates = []
        for pid in round_participants(cfg, server_round, tiers, method.takes_part):
            # a copy, as a message would carry: training updates its tensors in place
            payload = {k: v.clone() for k, v in method.client_payload(state, tiers[pid]).items()}
            trained, metrics = client_round(setup, pid, tiers[pid], server_round, lr, payload,
                                            client_states[pid])
            updates.append(ClientUpdate(pid, tiers[pid], trained, int(metrics["num-examples"]),
                                        train_metrics(metrics)))
        record: dict[str, Any] = {"round": server_round, "lr": lr}
        if updates:
            state = method.aggregate(state, updates)
            record.update(weighted_metrics(updates))
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_server_rounds:
            record.update(evaluate_exits(method.exit_evaluator(state), loader, cfg, device))
        records.append(record)
        if on_round is not None:
            on_round(record)
    return state, records
