"""The Flower ServerApp: validate the config, roll-call the clients, run the rounds,
evaluate every exit centrally, and write the run folder."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from reefl.accounting import write_accounting
from reefl.config import RunConfig
from reefl.data import test_loader
from reefl.evaluation import evaluate_exits
from reefl.federation.inputs import run_data
from reefl.federation.strategy import ClientInfo, TieredStrategy
from reefl.methods import build_method
from reefl.report import RunFolder, default_run_name
from reefl.training import server_learning_rate

app = ServerApp()

ROLL_CALL_TIMEOUT_S = 600.0


def roll_call(grid: Grid, num_clients: int) -> dict[int, ClientInfo]:
    """Wait for ``num_clients`` SuperNodes, ask each for its partition id, tier and size."""
    deadline = time.monotonic() + ROLL_CALL_TIMEOUT_S
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of num-clients={num_clients} "
                               "SuperNodes connected")
        time.sleep(1.0)
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                        message_type="query") for node in node_ids]
    roster: dict[int, ClientInfo] = {}
    for reply in grid.send_and_receive(messages, timeout=ROLL_CALL_TIMEOUT_S):
        if reply.has_error():
            raise RuntimeError(f"a client failed the roll call: {reply.error.reason}")
        info = reply.content["client"]
        pid = int(info["partition-id"])
        if pid in roster:
            raise RuntimeError(f"two SuperNodes claim partition-id {pid}")
        roster[pid] = ClientInfo(reply.metadata.src_node_id, int(info["tier"]),
                                 int(info["num-examples"]))
    missing = sorted(set(range(num_clients)) - set(roster))
    if missing:
        raise RuntimeError(f"no SuperNode holds partition ids {missing}")
    return roster


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    cfg = RunConfig.from_flat(dict(context.run_config))
    run_name = cfg.run_name or default_run_name(cfg.method, cfg.seed)
    run_dir = Path(cfg.output_dir).expanduser() / run_name
    folder = RunFolder(run_dir.resolve())
    log(INFO, "reefl: run folder %s", folder.path)
    folder.write_json("config.json", cfg.to_flat())

    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    write_accounting(folder.path, method, cfg.img_size)
    initial = method.initial_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = test_loader(data, pipeline, cfg.eval_batch_size)

    roster = roll_call(grid, cfg.num_clients)
    strategy = TieredStrategy(cfg, method, roster)
    last_eval: dict[str, object] = {}
    round_started = time.monotonic()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy after every round: evaluate when due, log the round."""
        nonlocal round_started
        if server_round == 0:
            return None
        record: dict[str, object] = {
            "round": server_round, "lr": server_learning_rate(server_round - 1, cfg),
            **strategy.last_train_metrics,
        }
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_server_rounds:
            evaluator = method.exit_evaluator(arrays.to_torch_state_dict())
            last_eval.clear()
            last_eval.update(evaluate_exits(evaluator, loader, cfg, device))
            record.update(last_eval)
        record["round_seconds"] = time.monotonic() - round_started
        record["elapsed_seconds"] = time.monotonic() - started
        folder.append_metrics(record)
        log(INFO, "reefl: %s", _progress_line(record, cfg.num_server_rounds))
        round_started = time.monotonic()
        if "exit_accuracy" not in record:
            return None
        return MetricRecord({"mean-accuracy": record["mean_accuracy"],
                             "ensemble-accuracy": record["ensemble_accuracy"]})

    result = strategy.start(grid, ArrayRecord(initial), num_rounds=cfg.num_server_rounds,
                            evaluate_fn=evaluate)
    folder.save_model(result.arrays.to_torch_state_dict() if len(result.arrays) else initial)
    final = {
        **last_eval, "method": cfg.method, "seed": cfg.seed, "rounds": cfg.num_server_rounds,
        "exit_blocks": method.exit_blocks, "wall_seconds": time.monotonic() - started,
    }
    folder.write_json("final.json", final)
    log(INFO, "reefl: final mean accuracy over exits %.2f%%, ensemble %.2f%%",
        final.get("mean_accuracy", float("nan")), final.get("ensemble_accuracy", float("nan")))
    log(INFO, "reefl: run folder %s", folder.path)


def _progress_line(record: dict[str, object], num_rounds: int) -> str:
    """One readable line per round for the streamed log."""
    parts = [f"round {record['round']}/{num_rounds}", f"lr {record['lr']:.4g}"]
    if "train-loss" in record:
        parts.append(f"train-loss {record['train-loss']:.3f}")
    if "exit_accuracy" in record:
        exits = " ".join(f"{a:.1f}" for a in record["exit_accuracy"])
        parts.append(f"exit acc [{exits}] mean {record['mean_accuracy']:.2f} "
                     f"ens {record['ensemble_accuracy']:.2f}")
    parts.append(f"{record['round_seconds']:.1f}s")
    return " | ".join(parts)
