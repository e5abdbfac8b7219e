"""Personalised evaluation (``personalised-epochs`` > 0), after the last round: every client
on the roster gets the final global model (its tier's payload, as in a round) in one
``evaluate`` message, tests its tier's exits on its own local test split, fine-tunes for
``personalised-epochs`` local epochs with the rounds' own training, and tests again
(``client_app.personalised_accuracies``). The server checks the replies as it checks a
round's (``strategy.accepted_replies``) and summarises them per exit over the clients."""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from flwr.supercore import log

from reefl.federation.replies import ClientAccuracies, RoundRecord, checked_accuracies
from reefl.federation.strategy import TieredStrategy, accepted_replies
from reefl.training import server_learning_rate


def evaluate_personalised(grid: Grid, strategy: TieredStrategy,
                          global_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Ask every partition on the roster for its personalised evaluation of
    ``global_state``; returns personalised.json's content. The clients fine-tune at the
    learning rate of the last round and as that round trains (its seed, its loss weights);
    a client that fails, times out (``round-timeout``) or sends a reply that fails its check
    is left out, counted in ``clients_failed`` and logged."""
    cfg, method = strategy.cfg, strategy.method
    lr = server_learning_rate(cfg.num_server_rounds - 1, cfg)
    record = RoundRecord()
    config = {"lr": lr, "server-round": cfg.num_server_rounds,
              "epochs": cfg.personalised_epochs}
    messages, sent = strategy.client_messages(sorted(strategy.roster.clients), global_state,
                                              config, "evaluate", set(grid.get_node_ids()),
                                              record)
    replies, sent = strategy.exchange(grid, messages, sent)
    results = accepted_replies(
        replies, sent, record, "personalised evaluation", cfg.round_timeout,
        lambda reply, target: checked_accuracies(reply, target, method.exit_ids(target.tier)))
    for pid, reason in sorted({**record.failed, **record.rejected}.items()):
        log(WARNING, "personalised evaluation: client %s left out: %s", pid, reason)
    clients = [results[pid] for pid in sorted(results)]
    return {"epochs": cfg.personalised_epochs, "lr": lr, "clients_answered": len(clients),
            "clients_failed": len(record.failed) + len(record.rejected),
            "exits": exit_summary(clients), "clients": [c.as_json() for c in clients]}


def exit_summary(clients: list[ClientAccuracies]) -> list[dict[str, Any]]:
    """Per exit (in order), over the clients whose model has it and whose local test split
    is not empty: their number, and the mean and population standard deviation (ddof=0:
    the spread of these clients, not an estimate for others) of the global and the
    personalised accuracy, in percent. An exit no such client has is left out."""
    by_exit: dict[int, list[tuple[float, float]]] = {}
    for client in clients:
        if not client.num_test_examples:
            continue
        for exit_id, before, after in zip(client.exits, client.global_accuracy,
                                          client.personalised_accuracy, strict=True):
            by_exit.setdefault(exit_id, []).append((before, after))
    summary = []
    for exit_id, pairs in sorted(by_exit.items()):
        before, after = np.array(pairs).T
        summary.append({"exit": exit_id, "clients": len(pairs),
                        "global_mean": float(before.mean()), "global_std": float(before.std()),
                        "personalised_mean": float(after.mean()),
                        "personalised_std": float(after.std())})
    return summary


def log_summary(result: dict[str, Any]) -> None:
    """One INFO line per exit: the means and spreads over clients, global and personalised."""
    for row in result["exits"]:
        log(INFO, "reefl: personalised exit %s over %s clients: global model %.2f%% (sd %.2f), "
            "after %s local epochs %.2f%% (sd %.2f)", row["exit"], row["clients"],
            row["global_mean"],
            row["global_std"], result["epochs"], row["personalised_mean"],
            row["personalised_std"])
