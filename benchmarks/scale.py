"""Many simulated clients: `reefl run` on the full Fashion-MNIST (Debian's IDX files) with 100
and 1,000 clients, 10% of them a round, the embedded model; seconds per round, the roll
call's time and the peak memory of the run's processes (RSS, sampled every 0.2 s).

Usage: ``python benchmarks/scale.py [--clients 100,1000] [--rounds 3] [--method reefl]``.
``--method depthfl -c 'feddyn-alpha=0.01'`` keeps a client state (FedDyn's g_i) per client.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from run_overhead import clientapps_at_once, flower_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="reefl")
    parser.add_argument("-c", "--run-config", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reefl-scale-") as tmp:
        for clients in map(int, args.clients.split(",")):
            overrides = [f'dataset="fashion-mnist" num-clients={clients} fraction-train=0.1 '
                         f'num-server-rounds={args.rounds} eval-every={args.rounds} '
                         f'method="{args.method}" roll-call-timeout=600 {args.run_config}']
            run = flower_run(overrides, Path(tmp) / str(clients))
            run["workers"] = clientapps_at_once(overrides)
            rows.append((clients, run))
            print(f"{clients} clients: {run['total']:.0f} s", flush=True)
    print("\n| clients | a round | s per round (median) | clients' training s per round "
          "(median, sum / ClientApps at once) | start-up s (roll call) | total s | "
          "peak RSS all processes | largest process |")
    print("|---|---|---|---|---|---|---|---|")
    for clients, r in rows:
        largest = max(r["memory"].items(), key=lambda kv: kv[1])
        own = statistics.median(t / r["workers"] for t in r["client_train"])
        print(f"| {clients} | {clients // 10} | {statistics.median(r['round_seconds']):.1f} | "
              f"{own:.1f} | {r['startup']:.1f} | {r['total']:.0f} | "
              f"{r['memory_total'] / 2**20:.0f} MiB | "
              f"{largest[1] / 2**20:.0f} MiB ({largest[0]}) |")


if __name__ == "__main__":
    main()
