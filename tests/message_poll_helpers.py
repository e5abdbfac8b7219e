"""Scaffolding for tests and benchmarks of ``federation.message_poll``: a LinkState set up as
Flower's simulation sets it up, and one sweep of Flower's own poll to compare against.
Imported by tests/test_message_poll.py and benchmarks/message_poll.py (which puts tests/ on
its path)."""

from __future__ import annotations

from typing import Any

from flwr.app import Message


def flower_sweep(state: Any, nodes: list[int]) -> list[Message]:
    """One sweep of Flower's own loop (vce_api.add_messages_to_queue)."""
    return [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]


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
