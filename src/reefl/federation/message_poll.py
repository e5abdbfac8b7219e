"""Replaces Flower 1.41's simulation message poll (nodes × messages, quadratic) with one pass.

In a simulation, one thread of the ``flwr-simulation`` process (Flower 1.41's
``vce_api.add_messages_to_queue``) asks the in-memory LinkState for the next message of
every simulated SuperNode, one ``get_message_ins(node, limit=1)`` per node, every 0.1 s.
Each of those checks the expiry and federation of *every* stored message before it looks at
the node, so one sweep costs nodes × messages checks: with 1,000 clients and 100 messages a
round, 100,000 checks and about half a CPU second per sweep, which keeps a core of a 2-core
machine busy while the clients train, and holds the state's lock that the ServerApp and the
replies need.

``next_messages`` does one sweep in one pass: for each node, in node order, the first of its
undelivered messages in the order they were stored, checked for expiry (an expired one is
deleted, and the node's next one taken), marked delivered. Those are the messages, in the
order, that Flower's sweep hands to the ClientApps. Expired messages of nodes that have
nothing else waiting are purged when the ServerApp asks for their replies
(``get_message_res`` checks the ones it is asked about) rather than by every node's poll,
which changes nothing the ServerApp sees. ``install`` puts ``poll_messages`` in place of
Flower's loop, for the Flower version it was written against; it does nothing in a process
that has not imported the simulation runtime (a ClientApp's, a SuperNode's), so it adds
no import there.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from queue import Queue
from typing import TYPE_CHECKING, Any

import flwr
from flwr.supercore.date import now

if TYPE_CHECKING:
    from flwr.app import Message

WRITTEN_FOR = "1.41.0"
RUNTIME_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
SWEEP_INTERVAL_S = 0.1  # as Flower's loop


def next_messages(state: Any, node_ids: Sequence[int]) -> list[Message]:
    """The next undelivered message of each of ``node_ids`` (at most one each), in the order
    of ``node_ids``, marked delivered: Flower's ``get_message_ins(node, limit=1)`` for every
    node in turn, in one pass over the in-memory LinkState's stored messages."""
    wanted = set(node_ids)
    found: dict[int, Message] = {}
    with state.lock:
        for message_id, message in list(state.message_ins_store.items()):
            metadata = message.metadata
            node = metadata.dst_node_id
            if node in found or node not in wanted or metadata.delivered_at != "":
                continue
            state._check_stored_messages({message_id})  # deletes it if it expired
            if message_id in state.message_ins_store:
                found[node] = message
    delivered_at = now().isoformat()
    for message in found.values():
        message.metadata.delivered_at = delivered_at
    return [found[node] for node in node_ids if node in found]


def poll_messages(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],
                  f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same arguments, same messages into ``queue``),
    one ``next_messages`` pass a sweep."""
    node_ids = list(nodes_mapping)
    while not f_stop.is_set():
        for message in next_messages(state, node_ids):
            queue.put(message)
        f_stop.wait(SWEEP_INTERVAL_S)


def install() -> bool:
    """Use ``poll_messages`` for the simulation runtime's poll, if this process has imported
    the runtime and Flower is the version it was written for; True if it is in place. The
    runtime looks the loop up when it starts its thread, after it has loaded the ClientApp
    (whose module calls this)."""
    runtime = sys.modules.get(RUNTIME_MODULE)
    if runtime is None or flwr.__version__ != WRITTEN_FOR:
        return False
    runtime.add_messages_to_queue = poll_messages
    return True


def running_poll() -> str | None:
    """Which loop polls the simulation's messages in this process now: ``"reefl"``
    (``poll_messages``), ``"flower"`` (Flower's own, e.g. after a Flower upgrade), or None
    where no simulation runtime runs (a deployment's ServerApp, the in-process driver). It
    reads the running threads' targets, so it tells what actually runs, not what is
    installed."""
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        if target is poll_messages:
            return "reefl"
        if getattr(target, "__name__", None) == "add_messages_to_queue":
            return "flower"
    return None

