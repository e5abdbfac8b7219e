"""Which Ree should be the default when training from scratch: the paper's, or the stable one
(``ree-layer-scale``)? ReeFL with each, on the embedded default and on Fashion-MNIST, over
several seeds (mean and seed-to-seed spread, since the spread is where ReeFL was weak).

Every run is the project's own rounds in one process (``run_in_process``, as in
``benchmarks/pretrained_claim.py``), two workers of one thread each, seed-major so that a
partial result is balanced; finished runs are kept in OUT/runs/*.json and reused.

    python benchmarks/ree_default.py [--setups embedded,fashion] [--seeds 0,1,2,3,4]
        [--variants 'reefl[ree-layer-scale=0.0];reefl[ree-layer-scale=0.01]']
        [--out outputs/ree-default]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from pretrained_claim import entry_config, final, run_jobs

SETUPS: dict[str, dict[str, Any]] = {
    # the embedded default: pyproject's [tool.flwr.app.config] as it is
    "embedded": {},
    # Fashion-MNIST in 20 clients, 1 local epoch, as docs/benchmarks use it, on a seeded
    # sample of 10,000 training images (ten runs fit the time of one session)
    "fashion": {"dataset": "fashion-mnist", "local-epochs": 1, "num-server-rounds": 15,
                "eval-every": 5, "num-clients": 20, "fraction-train": 0.5,
                "train-examples": 10000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="embedded,fashion")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants",
                        default="reefl[ree-layer-scale=0.0];reefl[ree-layer-scale=0.01]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/ree-default"))
    args = parser.parse_args()
    setups, variants = args.setups.split(","), args.variants.split(";")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [{"name": f"{setup}-{variant}-s{seed}", "setup": setup, "method": variant,
             "seed": seed, "config": {**SETUPS[setup], **entry_config(variant), "seed": seed}}
            for seed in seeds for setup in setups for variant in variants]
    results = run_jobs(jobs, args.out / "runs", args.workers)
    lines = ["| setup | Ree | seeds | exit accuracies, mean ± std | mean over exits ± std "
             "| min – max of the mean |", "|---|---|---|---|---|---|"]
    for setup in setups:
        for variant in variants:
            runs = [final(r["records"]) for r in results
                    if r["setup"] == setup and r["method"] == variant]
            if len(runs) < 2:
                continue
            exits = " / ".join(
                f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"
                for v in zip(*[r["exit_accuracy"] for r in runs], strict=True))
            means = [r["mean_accuracy"] for r in runs]
            lines.append(f"| {setup} | {variant} | {len(runs)} | {exits} | "
                         f"{statistics.mean(means):.2f} ± {statistics.stdev(means):.2f} | "
                         f"{min(means):.1f} – {max(means):.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
