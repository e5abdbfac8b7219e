"""The simulation's message poll in one pass over the stored messages.

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


def simulation_state(nodes: int) -> tuple[Any, Any, list[int]]:
    """An in-memory LinkState, a grid on it and the ids of ``nodes`` SuperNodes, set up as
    Flower's simulation sets them up, for tests and benchmarks of the poll. Like the
    simulation, it makes this process's task identity the ServerApp's (messages made here
    carry its run id)."""
    import secrets

    from flwr.common.constant import (
        HEARTBEAT_INTERVAL_INF,
        NOOP_ACCOUNT_NAME,
        NOOP_FLWR_AID,
        SUPERLINK_NODE_ID,
    )
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    run = Run.create_empty(run_id=1234)
    run.primary_task_id = 99
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = (
        run.run_id, 1, SUPERLINK_NODE_ID)
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    node_ids = []
    for _ in range(nodes):
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id,
                                         heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        node_ids.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, node_ids
