"""The simulation's message poll: one sweep over every simulated SuperNode (what Flower's
simulation runtime does every 0.1 s) with a round's messages waiting (10 % of the nodes
sent one), Flower 1.41's (``get_message_ins(node, limit=1)`` node after node) against
reefl's one pass (``federation.message_poll.next_messages``). CPU milliseconds per sweep,
median of interleaved repetitions, and the share of one core the poll takes at one sweep
per 0.1 s while the messages wait.

Usage: ``python benchmarks/message_poll.py [--clients 20,100,1000] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from reefl.federation import message_poll

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from message_poll_helpers import flower_sweep, simulation_state  # noqa: E402


def sweep_seconds(sweep: Callable[[Any, list[int]], list[Message]], clients: int) -> float:
    """CPU seconds of the sweep that finds a round's messages (a tenth of the nodes have
    one); nothing is marked delivered before it."""
    state, grid, nodes = simulation_state(clients)
    grid.push_messages([Message(RecordDict({"config": ConfigRecord({"i": i})}),
                                dst_node_id=node, message_type="train")
                        for i, node in enumerate(nodes[::10])])
    started = time.process_time()
    handed_out = sweep(state, nodes)
    seconds = time.process_time() - started
    assert len(handed_out) == len(nodes[::10])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20,100,1000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print("| clients | messages waiting | Flower ms/sweep | reefl ms/sweep | ratio | "
          "Flower core share | reefl core share |")
    print("|---|---|---|---|---|---|---|")
    for clients in map(int, args.clients.split(",")):
        times: dict[str, list[float]] = {"flower": [], "reefl": []}
        for _ in range(args.reps):  # interleaved
            times["flower"].append(sweep_seconds(flower_sweep, clients))
            times["reefl"].append(sweep_seconds(message_poll.next_messages, clients))
        f, r = (statistics.median(times[k]) for k in ("flower", "reefl"))
        share = [s / (s + message_poll.SWEEP_INTERVAL_S) for s in (f, r)]
        print(f"| {clients} | {len(range(0, clients, 10))} | {f * 1e3:.1f} | {r * 1e3:.2f} | "
              f"{f / r:.0f}× | {share[0]:.0%} | {share[1]:.1%} |")


if __name__ == "__main__":
    main()
