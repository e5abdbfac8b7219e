"""ReeFL against DepthFL on the full Fashion-MNIST (60k train / 10k test), same seeds.

Needs Debian's ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist/) or
a cached hub copy. Runs are interleaved (seed by seed, both methods) because the machine is
shared. For each run it prints per-exit and mean accuracy and wall time, the share of the
clients' local training spent waiting for batches (data loading), and the peak memory of
every process of the run (RSS, and PSS, which splits memory-mapped data pages shared by the
processes among them). The same data-loading share is measured for the embedded default.

    python benchmarks/fashion_mnist.py [--seeds 0,1] [--rounds 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from reefl.launch.simulation import run_app

FASHION = ('dataset="fashion-mnist" local-epochs=1 eval-every=5 '
           'num-clients=20 fraction-train=0.5')


class PeakMemory:
    """Samples every process below this one once a second; keeps each one's peak."""

    def __init__(self) -> None:
        self.peaks: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(1.0):
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    name = " ".join(proc.cmdline()[:3])[-70:]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                peak = self.peaks.setdefault(proc.pid, {"name": name, "rss": 0, "pss": 0})
                peak["rss"] = max(peak["rss"], info.rss)
                peak["pss"] = max(peak["pss"], getattr(info, "pss", 0))

    def largest(self, count: int = 6) -> list[dict[str, Any]]:
        return sorted(self.peaks.values(), key=lambda p: -p["rss"])[:count]


def one_run(overrides: str, out: Path, name: str) -> dict[str, Any]:
    """One ``reefl run``; its final table, timings, data share and peak memory."""
    started, cpu_started = time.monotonic(), time.process_time()
    with PeakMemory() as memory:
        run_dir = run_app([f'{overrides} output-dir="{out}" run-name="{name}"'], quiet=True)
    wall = time.monotonic() - started
    final = json.loads((run_dir / "final.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sum(r.get("train-seconds", 0.0) for r in rounds)
    fetch = sum(r.get("train-data-seconds", 0.0) for r in rounds)
    return {
        "name": name, "exit_accuracy": final.get("exit_accuracy"),
        "mean_accuracy": final.get("mean_accuracy"), "wall_s": wall,
        "launcher_cpu_s": time.process_time() - cpu_started,
        "round_s": sum(r["round_seconds"] for r in rounds) / len(rounds),
        "data_share": fetch / train if train else float("nan"),
        "data_s_per_client_round": fetch / len(rounds),
        "peak_memory": memory.largest(),
    }


def report(result: dict[str, Any]) -> None:
    exits = " / ".join(f"{a:.2f}" for a in result["exit_accuracy"] or [])
    print(f"{result['name']}: exits {exits} | mean {result['mean_accuracy']:.2f} | wall "
          f"{result['wall_s']:.0f} s | {result['round_s']:.1f} s/round | data loading "
          f"{100 * result['data_share']:.2f}% of local training "
          f"({result['data_s_per_client_round']:.3f} s per client-round)", flush=True)
    for peak in result["peak_memory"]:
        print(f"    peak RSS {peak['rss'] / 2**20:7.0f} MiB  PSS {peak['pss'] / 2**20:7.0f} MiB"
              f"  {peak['name']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--embedded-rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="reefl-fmnist-"))
    results = [one_run(f"num-server-rounds={args.embedded_rounds}", out, "embedded-default")]
    report(results[-1])
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in ("reefl", "depthfl"):
            overrides = f'{FASHION} num-server-rounds={args.rounds} method="{method}" seed={seed}'
            results.append(one_run(overrides, out, f"fmnist-{method}-s{seed}"))
            report(results[-1])
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()
