"""The simulation's message poll: one sweep of Flower's in-memory LinkState (every simulated
SuperNode asked for its next message, as the simulation runtime does every 0.1 s) with a
round's messages waiting, Flower 1.41's ``get_message_ins`` against reefl's
(``federation.simulation_fix``). CPU milliseconds per sweep, median of interleaved
repetitions, and the share of one core the poll takes at one sweep per 0.1 s.

Usage: ``python benchmarks/message_poll.py [--clients 20,100,1000] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import import_module

from reefl.federation import simulation_fix

SWEEP_INTERVAL_S = 0.1  # flwr's vce_api.add_messages_to_queue waits this long between sweeps


def sweep_seconds(get_message_ins: object, clients: int) -> float:
    """CPU seconds of one sweep over ``clients`` nodes with 10 % of them sent a message,
    every message still waiting (the sweep marks nothing delivered: it asks for node ids
    that have none, then the ones that have, as the real one does in node order)."""
    state, grid, nodes = simulation_fix.simulation_state(clients)
    from flwr.app import ConfigRecord, Message, RecordDict

    grid.push_messages([Message(RecordDict({"config": ConfigRecord({"i": i})}),
                                dst_node_id=node, message_type="train")
                        for i, node in enumerate(nodes[::10])])
    started = time.process_time()
    for node in nodes:
        get_message_ins(state, node, limit=1)  # type: ignore[operator]
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,100,1000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import_module(simulation_fix.STATE_MODULE)  # as the simulation's process has
    simulation_fix.install()
    flower = simulation_fix.flower_original["get_message_ins"]
    print("| clients | messages waiting | Flower ms/sweep | reefl ms/sweep | ratio | "
          "Flower core share | reefl core share |")
    print("|---|---|---|---|---|---|---|")
    for clients in map(int, args.clients.split(",")):
        times: dict[str, list[float]] = {"flower": [], "reefl": []}
        for _ in range(args.reps):  # interleaved
            times["flower"].append(sweep_seconds(flower, clients))
            times["reefl"].append(sweep_seconds(simulation_fix.faster_get_message_ins, clients))
        f, r = (statistics.median(times[k]) for k in ("flower", "reefl"))
        share = [min(1.0, s / (s + SWEEP_INTERVAL_S)) for s in (f, r)]
        print(f"| {clients} | {len(range(0, clients, 10))} | {f * 1e3:.1f} | {r * 1e3:.2f} | "
              f"{f / r:.0f}× | {share[0]:.0%} | {share[1]:.1%} |")


if __name__ == "__main__":
    main()
