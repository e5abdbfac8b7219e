"""The simulation's message poll (``federation.message_poll``): one sweep hands out the
same messages, in the same order, marked delivered the same way, as Flower's own sweep
(``get_message_ins(node, limit=1)`` for every node); expired ones are never handed out."""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from message_poll_helpers import flower_sweep
from message_poll_helpers import simulation_state as fresh_simulation_state
from reefl.federation import message_poll


def simulation_state(monkeypatch: pytest.MonkeyPatch, nodes: int
                     ) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """``message_poll_helpers.simulation_state``, with this process's task identity restored
    afterwards."""
    for field in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, getattr(TaskIdentity, field))
    return fresh_simulation_state(nodes)


def push(grid: InMemoryGrid, node_id: int, tag: int, ttl: float | None = None) -> None:
    content = RecordDict({"config": ConfigRecord({"tag": tag})})
    grid.push_messages([Message(content, dst_node_id=node_id, message_type="train", ttl=ttl)])


def tags(messages: list[Message]) -> list[int]:
    return [int(m.content["config"]["tag"]) for m in messages]


def sweeps(monkeypatch: pytest.MonkeyPatch, sweep) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Messages for four nodes (three for the second, stored out of node order, none for
    the last), then what four sweeps hand out, and a fifth after two more arrive."""
    state, grid, (a, b, c, d) = simulation_state(monkeypatch, 4)
    for node, tag in ((b, 1), (c, 2), (b, 3), (a, 4), (b, 5)):
        push(grid, node, tag)
    seen = [tags(sweep(state, [a, b, c, d])) for _ in range(4)]
    push(grid, d, 6)
    push(grid, a, 7)
    seen.append(tags(sweep(state, [a, b, c, d])))
    seen.append(sorted(tags([m for m in state.message_ins_store.values()
                             if m.metadata.delivered_at == ""])))
    return seen


def test_same_messages_and_order_as_flowers_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    flower = sweeps(monkeypatch, flower_sweep)
    assert flower == [[4, 1, 2], [3], [5], [], [7, 6], []]  # node order, then store order
    assert sweeps(monkeypatch, message_poll.next_messages) == flower


def test_expired_message_is_deleted_and_the_next_one_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state, grid, (a, b) = simulation_state(monkeypatch, 2)
    push(grid, a, 1, ttl=0.05)
    push(grid, a, 2)
    push(grid, b, 3)
    time.sleep(0.1)
    assert tags(message_poll.next_messages(state, [a, b])) == [2, 3]
    assert sorted(tags(list(state.message_ins_store.values()))) == [2, 3]  # 1 is gone


def test_poll_fills_the_queue_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    state, grid, nodes = simulation_state(monkeypatch, 3)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    poller = threading.Thread(target=message_poll.poll_messages,
                              args=(state, queue, dict.fromkeys(nodes, 0), stop))
    poller.start()
    for tag, node in enumerate(nodes):
        push(grid, node, tag)
    received = [queue.get(timeout=5) for _ in nodes]
    stop.set()
    poller.join(timeout=5)
    assert not poller.is_alive()
    assert sorted(tags(received)) == [0, 1, 2]


def test_installed_where_the_simulation_runtime_is_loaded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert message_poll.install()  # this module imported the runtime
    assert vce_api.add_messages_to_queue is message_poll.poll_messages
