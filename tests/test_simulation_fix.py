"""The simulation's message poll (``federation.simulation_fix``): the same messages, in the
same order, marked delivered the same way as Flower's own ``get_message_ins``, and expired
ones never handed out."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from reefl.federation import simulation_fix

GetMessageIns = Callable[..., list[Message]]


def flower_get_message_ins() -> GetMessageIns:
    """Flower's own method, whether or not ``install`` replaced it in this process."""
    simulation_fix.install()
    return simulation_fix.flower_original.get("get_message_ins",
                                              InMemoryLinkState.get_message_ins)


def simulation_state(monkeypatch: pytest.MonkeyPatch, nodes: int
                     ) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """``simulation_fix.simulation_state``, with this process's task identity restored
    afterwards."""
    for field in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, getattr(TaskIdentity, field))
    return simulation_fix.simulation_state(nodes)


def push(grid: InMemoryGrid, node_id: int, tag: int, ttl: float | None = None) -> None:
    content = RecordDict({"config": ConfigRecord({"tag": tag})})
    grid.push_messages([Message(content, dst_node_id=node_id, message_type="train", ttl=ttl)])


def tags(messages: list[Message]) -> list[int]:
    return [int(m.content["config"]["tag"]) for m in messages]


def poll_script(state: InMemoryLinkState, grid: InMemoryGrid, nodes: list[int],
                get: GetMessageIns) -> list[object]:
    """Messages for three nodes (two for the first, none for the third), then what a poll
    of each node returns, twice, and which messages are marked delivered."""
    a, b, c = nodes
    push(grid, a, 1)
    push(grid, b, 2)
    push(grid, a, 3)
    seen: list[object] = []
    for node in (c, a, b, a, a, b):
        seen.append(tags(get(state, node, limit=1)))
    seen.append(sorted(int(m.content["config"]["tag"]) for m in state.message_ins_store.values()
                       if m.metadata.delivered_at != ""))
    push(grid, b, 4)
    push(grid, b, 5)
    seen.append(tags(get(state, b, limit=None)))
    return seen


def test_same_messages_and_order_as_flowers(monkeypatch: pytest.MonkeyPatch) -> None:
    flower = poll_script(*simulation_state(monkeypatch, 3), get=flower_get_message_ins())
    ours = poll_script(*simulation_state(monkeypatch, 3),
                       get=simulation_fix.faster_get_message_ins)
    assert flower == [[], [1], [2], [3], [], [], [1, 2, 3], [4, 5]]
    assert ours == flower


def test_expired_message_is_deleted_not_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    state, grid, (a, b) = simulation_state(monkeypatch, 2)
    push(grid, a, 1, ttl=0.05)
    push(grid, b, 2)
    time.sleep(0.1)
    assert simulation_fix.faster_get_message_ins(state, a, limit=1) == []
    assert tags(list(state.message_ins_store.values())) == [2]  # a's expired one is gone
    assert tags(simulation_fix.faster_get_message_ins(state, b, limit=1)) == [2]


def test_limit_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    state, _, (a,) = simulation_state(monkeypatch, 1)
    with pytest.raises(AssertionError):
        simulation_fix.faster_get_message_ins(state, a, limit=0)


def test_installed_in_a_process_that_has_the_in_memory_state() -> None:
    assert simulation_fix.install()  # this test module imported the LinkState
    assert InMemoryLinkState.get_message_ins is simulation_fix.faster_get_message_ins
