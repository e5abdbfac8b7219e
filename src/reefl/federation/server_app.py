"""The Flower ServerApp: validate the config, roll-call the clients, run the rounds (looking
for new SuperNodes before each and checking every reply), evaluate every exit centrally,
checkpoint after every round, and write the run folder; with ``personalised-epochs`` > 0,
end with the clients' personalised evaluation (``federation.personalised``). With
``resume = true`` it continues the run in ``run-name`` from its checkpoint, ending exactly
where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from reefl.config import RunConfig
from reefl.data import test_loader
from reefl.evaluation import evaluate_exits
from reefl.federation import message_poll
from reefl.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from reefl.federation.client_store import open_run_store
from reefl.federation.divergence import find_divergence
from reefl.federation.inputs import run_data
from reefl.federation.personalised import evaluate_personalised, log_summary
from reefl.federation.replies import RoundRecord
from reefl.federation.strategy import (
    NO_NODE,
    ClientInfo,
    Roster,
    TieredStrategy,
    sampling_rate,
)
from reefl.methods import build_method
from reefl.methods.privacy import MISSING_ACCOUNTANT, accountant_available, epsilon_over_rounds
from reefl.outputs.accounting import write_accounting
from reefl.outputs.files import remove_orphans, sha256_file
from reefl.outputs.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RunFolder,
    RunFolderError,
    check_resumable,
    config_digest,
    config_digests,
    default_run_name,
)
from reefl.outputs.tracking import open_trackers
from reefl.training import precision_line, server_learning_rate

app = ServerApp()

ROLL_CALL_LOG_EVERY_S = 10.0


def roll_call(grid: Grid, cfg: RunConfig, roster: Roster) -> RoundRecord:
    """Wait until ``num-clients`` SuperNodes are online, at most ``roll-call-timeout``
    seconds (saying how many there are every few seconds), then ask each who it is. The run
    goes on with the partitions that answered; RuntimeError if none did."""
    deadline = time.monotonic() + cfg.roll_call_timeout
    next_log = time.monotonic() + ROLL_CALL_LOG_EVERY_S
    while len(online := set(grid.get_node_ids())) < cfg.num_clients:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_log:
            log(INFO, "reefl: roll call: %s of num-clients=%s SuperNodes online (waiting up "
                "to %.0f s more)", len(online), cfg.num_clients, deadline - now)
            next_log = now + ROLL_CALL_LOG_EVERY_S
        time.sleep(0.5)
    record = RoundRecord()
    record.joined, record.refused = roster.discover(grid, online, cfg.roll_call_timeout)
    if not roster.clients:
        raise RuntimeError(f"no SuperNode answered the roll call within roll-call-timeout="
                           f"{cfg.roll_call_timeout:g} s ({len(online)} online)")
    missing = sorted(set(range(cfg.num_clients)) - set(roster.clients))
    if missing:
        log(WARNING, "reefl: roll call: %s of %s partitions have a SuperNode; missing "
            "partition ids %s (they join when their SuperNode connects)",
            len(roster.clients), cfg.num_clients, _short(missing))
    return record


def _short(ids: list[int], most: int = 12) -> str:
    return str(ids) if len(ids) <= most else f"{ids[:most]}... ({len(ids)} in all)"


@dataclass
class RunState:
    """What the loop carries from round to round (and a checkpoint saves)."""

    round: int
    global_state: dict[str, torch.Tensor]
    last_eval: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    elapsed_before: float = 0.0  # seconds spent by earlier runs of this run (resumed)
    config_sha256: str = ""  # of the run folder's config.json, which checkpoints record


TOTALS = ("sampled", "used", "failed", "rejected", "clipped", "rounds_unchanged")


def _open_run(cfg: RunConfig, initial: dict[str, torch.Tensor]
              ) -> tuple[RunFolder, RunState, Checkpoint | None]:
    """The run folder (new, or reopened to resume) and the state to start from. A resume
    first checks every file it reads against the digests the checkpoint recorded (the
    launcher did so before Flower started; this is for any other way in), then clears the
    temporary files a killed write left."""
    run_dir = (Path(cfg.output_dir).expanduser() / cfg.run_name).resolve()
    if not cfg.resume:
        folder = RunFolder.create(run_dir)
        folder.write_json(CONFIG_FILE, cfg.to_flat())
        return folder, RunState(0, initial, config_sha256=sha256_file(run_dir / CONFIG_FILE)
                                ), None
    digests = config_digests(cfg)
    if (run_dir / CHECKPOINT_FILE).is_file():  # else load_checkpoint says there is none
        for warning in check_resumable(run_dir, digests):
            log(WARNING, "reefl: %s", warning)
    remove_orphans(run_dir)
    checkpoint = load_checkpoint(run_dir, digests)
    folder = RunFolder.reopen(run_dir, checkpoint.round)
    log(INFO, "reefl: resuming after round %s of %s", checkpoint.round, cfg.num_server_rounds)
    totals = {**dict.fromkeys(TOTALS, 0), **checkpoint.totals}
    return folder, RunState(checkpoint.round, checkpoint.global_state, checkpoint.last_eval,
                            totals, checkpoint.elapsed_seconds,
                            sha256_file(run_dir / CONFIG_FILE)), checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: the run that ``context.run_config`` describes."""
    run_server(grid, RunConfig.from_flat(dict(context.run_config)))


def run_server(grid: Grid, cfg: RunConfig,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Every round of ``cfg`` (or those after the checkpoint, when resuming) on the clients
    that ``grid`` reaches; returns the run folder. ``on_round`` gets each round's
    metrics.jsonl record once the round is checkpointed. The in-process driver
    (``federation.local``) calls it with a grid of its own."""
    started = time.monotonic()
    timings = {"server_started": time.time()}  # wall-clock marks for benchmarks/run_overhead
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=default_run_name(cfg.method, cfg.seed))
    digest = config_digest(cfg)
    if cfg.dp_clip_norm > 0 and not accountant_available():
        raise RuntimeError(MISSING_ACCOUNTANT)
    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    try:
        folder, run, checkpoint = _open_run(cfg, method.initial_state())
        client_store = open_run_store(folder.path, checkpoint)
    except (RunFolderError, CheckpointError) as err:
        raise RuntimeError(str(err)) from None
    log(INFO, "reefl: run folder %s", folder.path)
    if not (folder.path / "accounting.json").is_file():
        write_accounting(folder.path, method, cfg.img_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(INFO, "reefl: %s", precision_line(cfg, device))
    loader = test_loader(data, pipeline, cfg.eval_batch_size)

    roster = Roster(cfg)
    strategy = TieredStrategy(cfg, method, roster, client_store)
    if checkpoint is not None:
        method.load_server_state(checkpoint.server_state)
        for pid, seen in checkpoint.partitions.items():  # sampled as before, node or not
            roster.clients[pid] = ClientInfo(NO_NODE, seen["tier"], seen["num-examples"])
    joined = roll_call(grid, cfg, roster)
    poll = message_poll.running_poll()  # the runtime's threads answered the roll call
    strategy.summary()

    def save() -> None:
        save_checkpoint(folder.path, Checkpoint(
            run.round, digest, run.global_state, method.server_state(),
            client_store.index(),
            {pid: {"tier": c.tier, "num-examples": c.num_examples}
             for pid, c in roster.clients.items()},
            run.last_eval, run.totals, run.elapsed_before + time.monotonic() - started,
            config_sha256=run.config_sha256, client_digests=client_store.digests()))
        client_store.prune()  # after the checkpoint's rename: until then the old one needs them

    if checkpoint is None:
        save()  # round 0: a run stopped in its first round can be resumed too
    first_round = run.round + 1
    timings["first_round_started"] = time.time()
    records = folder.read_metrics()  # a resumed run's earlier rounds count for divergence
    diverged = find_divergence(records, task.num_classes)
    trackers = open_trackers(folder.path, cfg.tracker_list, cfg.to_flat(), cfg.run_name,
                             records)
    try:
        for server_round in range(first_round, cfg.num_server_rounds + 1):
            round_started = time.monotonic()
            record = RoundRecord()
            new_state = strategy.run_round(grid, server_round, run.global_state, record)
            if server_round == first_round:  # the roll call's joins and refusals
                record.joined.update(joined.joined)
                record.refused.update(joined.refused)
            if new_state is not None:
                run.global_state = new_state
            line: dict[str, Any] = {
                "round": server_round, "lr": server_learning_rate(server_round - 1, cfg),
                **strategy.last_train_metrics, "model_updated": new_state is not None,
                **record.as_json(),
            }
            if method.privacy.on:
                line.update(_privacy_spent(cfg, records, sampling_rate(
                    cfg, roster.tiers, method.takes_part)))
            if diverged is None:
                diverged = find_divergence([*records, line], task.num_classes)
                if diverged is not None:
                    line["diverged"] = diverged.reason
                    log(WARNING, "reefl: round %s: the run diverged: %s%s", server_round,
                        diverged.reason, " (stop-on-divergence: stopping)" if
                        cfg.stop_on_divergence else "")
            stopping = diverged is not None and cfg.stop_on_divergence
            if (server_round % cfg.eval_every == 0 or server_round == cfg.num_server_rounds
                    or stopping):
                evaluator = method.exit_evaluator(run.global_state)
                run.last_eval = evaluate_exits(evaluator, loader, cfg, device)
                line.update(run.last_eval)
            _add_totals(run.totals, record, new_state is not None)
            run.round = server_round
            line["round_seconds"] = time.monotonic() - round_started
            line["elapsed_seconds"] = run.elapsed_before + time.monotonic() - started
            folder.append_metrics(line)
            records.append(line)
            save()
            trackers.log(line)  # after the checkpoint: a redone round is sent once
            log(INFO, "reefl: %s", _progress_line(line, cfg.num_server_rounds))
            if on_round is not None:
                on_round(line)
            if stopping:
                break
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()

    timings["last_round_finished"] = time.time()
    folder.save_model(run.global_state)
    personalised = {}
    if cfg.personalised_epochs > 0:  # not checkpointed: a resumed run simply does it again
        result = evaluate_personalised(grid, strategy, run.global_state)
        folder.write_json("personalised.json", result)
        log_summary(result)
        personalised = {"personalised": result["exits"]}
    final = {
        **run.last_eval, "method": cfg.method, "seed": cfg.seed, "rounds": cfg.num_server_rounds,
        "exit_blocks": method.exit_blocks, "clients": run.totals, "config_digest": digest,
        "diverged": None if diverged is None else diverged.as_json(),
        "rounds_run": run.round,
        "wall_seconds": run.elapsed_before + time.monotonic() - started,
        "simulation_poll": poll, **personalised,
        **({"dp_epsilon": records[-1]["dp_epsilon"] if records else 0.0,
            "dp_delta": cfg.dp_delta} if method.privacy.on else {}),
        "timings": {**timings, "server_finished": time.time()},
    }
    folder.write_json("final.json", final)
    log(INFO, "reefl: final mean accuracy over exits %.2f%%, ensemble %.2f%%",
        final.get("mean_accuracy", float("nan")), final.get("ensemble_accuracy", float("nan")))
    log(INFO, "reefl: run folder %s", folder.path)
    return folder.path


def _privacy_spent(cfg: RunConfig, records: list[dict[str, Any]], rate: float
                   ) -> dict[str, Any]:
    """This round's sampling rate q and the ε spent at ``dp-delta`` by every round so far
    (``records``, a resumed run's included, and this one), docs/privacy.md; ε is null
    (infinite: no guarantee) when ``dp-noise-multiplier`` is 0."""
    rates = [r["dp_sampling_rate"] for r in records if "dp_sampling_rate" in r] + [rate]
    spent = epsilon_over_rounds(cfg.dp_noise_multiplier, rates, cfg.dp_delta)
    return {"dp_sampling_rate": rate, "dp_epsilon": spent if math.isfinite(spent) else None}


def _add_totals(totals: dict[str, int], record: RoundRecord, updated: bool) -> None:
    """Add a round's participation to the run's totals (final.json's ``clients``)."""
    for key in ("sampled", "used", "failed", "rejected", "clipped"):
        totals[key] += len(getattr(record, key))
    totals["rounds_unchanged"] += 0 if updated else 1


def _progress_line(record: dict[str, object], num_rounds: int) -> str:
    """One readable line per round for the streamed log."""
    parts = [f"round {record['round']}/{num_rounds}", f"lr {record['lr']:.4g}"]
    if "train-loss" in record:
        parts.append(f"train-loss {record['train-loss']:.3f}")
    if "exit_accuracy" in record:
        exits = " ".join(f"{a:.1f}" for a in record["exit_accuracy"])
        parts.append(f"exit acc [{exits}] mean {record['mean_accuracy']:.2f} "
                     f"ens {record['ensemble_accuracy']:.2f}")
    if "diverged" in record:
        parts.append("diverged")
    parts.append(f"{record['round_seconds']:.1f}s")
    return " | ".join(parts)
