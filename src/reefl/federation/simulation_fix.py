"""A linear-time ``InMemoryLinkState.get_message_ins`` for Flower's simulation runtime.

In a simulation, one thread of the ``flwr-simulation`` process asks the in-memory LinkState
for the next message of every simulated SuperNode, every 0.1 s. Flower 1.41's
``get_message_ins(node_id)`` checks the expiry and federation of *every* stored message
before it looks at the node, so one sweep costs nodes × messages checks: with 1,000 clients
and 100 messages a round that is 100,000 checks per sweep, which keeps a CPU core busy and
holds the state's lock that the ServerApp and the replies need.

``faster_get_message_ins`` looks at the node's own undelivered messages first and checks
only those; it returns the same messages, in the same order, and marks them delivered the
same way. Expired messages of other nodes are then purged when their node or the ServerApp
asks for them (``get_message_res`` checks the ones it is asked about), not by every node's
poll, which changes nothing the ServerApp sees. ``install`` puts it in place of Flower's
for the Flower version it was written against and leaves any other version alone; it
does nothing in a process that has not imported the in-memory LinkState (a ClientApp's,
a SuperNode's), so it adds no import there.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import flwr
from flwr.supercore.date import now

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

WRITTEN_FOR = "1.41.0"
STATE_MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
flower_original: dict[str, Any] = {}  # what install() replaced (for tests and benchmarks)


def faster_get_message_ins(self: InMemoryLinkState, node_id: int, limit: int | None, *,
                           run_id: int | None = None) -> list[Message]:
    """The undelivered messages for ``node_id`` (at most ``limit``), marked delivered:
    Flower's ``get_message_ins`` with only this node's messages checked for expiry."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    with self.lock:
        for message_id, message in list(self.message_ins_store.items()):
            metadata = message.metadata
            if (metadata.dst_node_id != node_id or metadata.delivered_at != ""
                    or (run_id is not None and metadata.run_id != run_id)):
                continue
            self._check_stored_messages({message_id})  # deletes it if expired
            if message_id in self.message_ins_store:
                found.append(message)
                if limit and len(found) == limit:
                    break
    delivered_at = now().isoformat()
    for message in found:
        message.metadata.delivered_at = delivered_at
    return found


def install() -> bool:
    """Use ``faster_get_message_ins`` in this process's in-memory LinkStates, if this
    process has imported them and Flower is the version it was written for; True if it is
    in place."""
    module = sys.modules.get(STATE_MODULE)
    if module is None or flwr.__version__ != WRITTEN_FOR:
        return False
    state_class: Any = module.InMemoryLinkState
    if state_class.get_message_ins is not faster_get_message_ins:
        flower_original["get_message_ins"] = state_class.get_message_ins
        state_class.get_message_ins = faster_get_message_ins
    return True


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
