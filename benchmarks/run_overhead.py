"""Where the wall time of the embedded default (`reefl run` with no options) goes: start-up,
rounds, teardown; the rounds against their pure compute; peak memory per process.

Runs the real Flower app through the launcher, then the same config in this process (the
in-process driver: the ClientApp's own ``client_round`` and the ServerApp's loop, no
Flower, one torch thread as each simulated ClientApp has). From the ServerApp's wall-clock
marks (final.json ``timings``):

* launch: ``reefl run`` called → ServerApp started (config checks, data prepared, Flower's
  SuperLink and simulation started);
* start-up: ServerApp started → first round (data, model, accounting, roll call, which
  waits for the ClientApps' processes to start);
* rounds: the sum of ``round_seconds``;
* finish + teardown: last round done → ``reefl run`` returned (model saved, processes
  stopped).

Pure compute of a round is the in-process run's training time of its clients divided by the
ClientApps Flower runs at once, plus its evaluation. The same sum over the Flower run's own
clients (their ``train-seconds``, divided likewise, plus the in-process evaluation) splits
the difference in two: rounds against it is what Flower's messaging and scheduling add;
it against the pure compute is how much slower the same clients train inside the
simulation than alone in one process. Memory is the resident set (RSS) of every
process of the run's tree, sampled every 0.2 s: pages shared between processes (torch's
libraries, the memory-mapped data) are counted in each.

Usage: ``python benchmarks/run_overhead.py [--repeats 2] [-c 'key=value ...']``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from reefl.config import RunConfig
from reefl.federation.local import run_in_process
from reefl.launch.resources import default_federation
from reefl.launch.run_config import prepare_run
from reefl.launch.simulation import run_app


class MemorySampler(threading.Thread):
    """Peak RSS per process (by a short name) of this process's tree, sampled in a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self.peak_total = every_s, {}, 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.wait(self.every_s):
            total = 0
            for proc in me.children(recursive=True):
                try:
                    rss, name = proc.memory_info().rss, _short_name(proc)
                except psutil.Error:
                    continue
                total += rss
                self.peak[name] = max(self.peak.get(name, 0), rss)
            self.peak_total = max(self.peak_total, total)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _short_name(proc: psutil.Process) -> str:
    """``flwr-simulation``, ``ray::ClientAppActor``, ``raylet``... with the pid."""
    cmdline = proc.cmdline()
    words = [Path(w).name for w in cmdline[:3] if not w.startswith("-")] or [proc.name()]
    label = next((w for w in words if not w.startswith("python")), words[0])
    return f"{label[:40]} ({proc.pid})"


def flower_run(overrides: list[str], out: Path) -> dict:
    """One `reefl run` through the launcher; its phases and peak memory."""
    sampler = MemorySampler()
    sampler.start()
    called = time.time()
    run_dir = run_app([*overrides, f'output-dir="{out}"'], quiet=True)
    returned = time.time()
    sampler.stop()
    final = json.loads((run_dir / "final.json").read_text())
    marks = final["timings"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = sum(line["round_seconds"] for line in lines)
    return {
        "total": returned - called, "launch": marks["server_started"] - called,
        "startup": marks["first_round_started"] - marks["server_started"], "rounds": rounds,
        "finish_teardown": returned - marks["last_round_finished"],
        "round_seconds": [line["round_seconds"] for line in lines],
        "client_train": [line.get("train-seconds", 0.0) * len(line["clients"]["used"])
                         for line in lines],
        "evaluated": ["exit_accuracy" in line for line in lines],
        "memory": sampler.peak, "memory_total": sampler.peak_total,
        "accuracy": final["exit_accuracy"],
    }


def pure_compute(overrides: list[str]) -> tuple[list[float], list[float], list[float]]:
    """Per round of the in-process run with one torch thread: the clients' training
    seconds (sum over the round's clients) and the evaluation seconds (0 where none); and
    its final exit accuracies (the Flower run's, if the two are bit-identical)."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(_config(overrides))
    train, evaluation = [], []
    marks = {"last": time.perf_counter()}

    def on_round(record: dict) -> None:
        now = time.perf_counter()
        train.append(record["train-seconds"] * len(record["clients"]["used"]))
        evaluation.append(max(0.0, now - marks["last"] - train[-1])
                          if "exit_accuracy" in record else 0.0)
        marks["last"] = now

    _, records = run_in_process(cfg, on_round)
    return train, evaluation, records[-1]["exit_accuracy"]


def _config(overrides: list[str]) -> dict:
    return prepare_run(overrides).config


def clientapps_at_once(overrides: list[str]) -> int:
    """How many ClientApps the simulation runs at once for this config: the machine's CPUs
    over the CPUs the launcher gives each ClientApp."""
    cpus = default_federation(_config(overrides))["client-resources-num-cpus"]
    return max(1, psutil.cpu_count() // cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-c", "--run-config", default="")
    args = parser.parse_args()
    overrides = [args.run_config] if args.run_config else []
    workers = clientapps_at_once(overrides)
    with tempfile.TemporaryDirectory(prefix="reefl-overhead-") as tmp:
        runs = []
        for repeat in range(args.repeats):
            runs.append(flower_run(overrides, Path(tmp) / f"r{repeat}"))
            print(f"flower run {repeat + 1}: {runs[-1]['total']:.1f} s", flush=True)
    train, evaluation, accuracy = pure_compute(overrides)
    pure = [t / workers + e for t, e in zip(train, evaluation, strict=True)]
    print(f"\nin-process pure compute: {sum(pure):.1f} s over {len(pure)} rounds "
          f"({workers} ClientApps at once)\n")
    print("| run | total s | launch s | start-up s | rounds s | finish + teardown s | "
          "fixed share | rounds / pure compute | rounds / own clients' compute | "
          "peak RSS, all processes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, r in enumerate(runs, 1):
        fixed = r["launch"] + r["startup"] + r["finish_teardown"]
        own = sum(r["client_train"]) / workers + sum(evaluation)
        print(f"| {index} | {r['total']:.1f} | {r['launch']:.1f} | {r['startup']:.1f} | "
              f"{r['rounds']:.1f} | {r['finish_teardown']:.1f} | {fixed / r['total']:.1%} | "
              f"{r['rounds'] / sum(pure):.2f}× | {r['rounds'] / own:.2f}× | "
              f"{r['memory_total'] / 2**20:.0f} MiB |")
    print("\nround time / pure compute, median over rounds: " + ", ".join(
        f"run {i}: {statistics.median(map(float.__truediv__, r['round_seconds'], pure)):.2f}×"
        for i, r in enumerate(runs, 1)))
    print("\npeak RSS per process (run 1):")
    for name, rss in sorted(runs[0]["memory"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {rss / 2**20:7.0f} MiB  {name}")
    print("\nexit accuracy: " + ", ".join(f"run {i}: {r['accuracy']}"
                                          for i, r in enumerate(runs, 1))
          + f"; in process: {accuracy}")


if __name__ == "__main__":
    main()
