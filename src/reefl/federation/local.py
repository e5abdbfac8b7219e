"""The rounds of a run in one process, without Flower's engines: for experiments with many
short runs (one Flower simulation costs tens of seconds to start and stop), for checking the
app, and for tests that need clients to misbehave.

``LocalGrid`` stands in for Flower's Grid: it delivers each message to the ClientApp's own
handlers (``client_app.describe``, ``client_app.train`` and ``client_app.personalise``),
called here with a Context per node, and returns their replies. The ServerApp's
``run_server`` drives it exactly as it drives a Flower grid, so a run gives the same global
model as ``reefl run`` with the same config, bit for bit (``tests/test_local_run.py``), and
writes the same run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from reefl.config import RunConfig
from reefl.federation import client_app
from reefl.federation.server_app import run_server

RoundCallback = Callable[[dict[str, Any]], None]
ReplyHook = Callable[[int, Message], Message | None]
"""Called with (partition id, the client's reply): returns the reply to deliver (changed or
not), None to deliver nothing (as if the client timed out), or raises (as if the ClientApp
had raised: the server gets an error reply)."""

RUN_ID = 1
SERVER_NODE = 0


@contextlib.contextmanager
def _task_identity(node_id: int) -> Iterator[None]:
    """Flower's process-wide identity (which messages read) set to ``node_id``, restored
    after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, node_id, RUN_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid:
    """A grid of ``num-clients`` in-process nodes (node id = partition id + 1) running the
    ClientApp's handlers. ``online`` is the set of node ids that answer; ``reply_hook`` may
    change or drop any reply; ``node_config`` adds keys to every node's config."""

    def __init__(self, cfg: RunConfig, reply_hook: ReplyHook | None = None,
                 node_config: dict[int, dict[str, Any]] | None = None) -> None:
        flat = cfg.to_flat()
        self.reply_hook = reply_hook
        self.contexts = {
            pid + 1: Context(run_id=RUN_ID, node_id=pid + 1, state=RecordDict(),
                             run_config=dict(flat),
                             node_config={"partition-id": pid, "num-partitions": cfg.num_clients,
                                          **(node_config or {}).get(pid, {})})
            for pid in range(cfg.num_clients)
        }
        self.online = set(self.contexts)

    def add_node(self, node_id: int, node_config: dict[str, Any], run_config: dict[str, Any]
                 ) -> None:
        """A further node (e.g. one that claims a partition id that is taken)."""
        self.contexts[node_id] = Context(run_id=RUN_ID, node_id=node_id, state=RecordDict(),
                                         run_config=dict(run_config), node_config=node_config)
        self.online.add(node_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.online)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Each message handled by its node's ClientApp handler, in order; a handler that
        raises gives an error reply, as Flower's ClientApp does."""
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            if node not in self.online:
                continue
            reply = self._handle(message, node)
            if reply is not None:
                replies.append(reply)
        return replies

    def _handle(self, message: Message, node: int) -> Message | None:
        handler = {"query": client_app.describe, "train": client_app.train,
                   "evaluate": client_app.personalise}[message.metadata.message_type]
        context = self.contexts[node]
        with _task_identity(node):
            try:
                reply = handler(message, context)
                if self.reply_hook is None:
                    return reply
                return self.reply_hook(int(context.node_config["partition-id"]), reply)
            except Exception as err:  # what Flower turns into an error reply
                return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"),
                               reply_to=message)


def run_local(cfg: RunConfig, grid: LocalGrid | None = None,
              on_round: RoundCallback | None = None) -> Path:
    """``run_server`` on ``grid`` (default: every client online and well-behaved), writing
    the run folder of ``cfg``; returns it."""
    with _task_identity(SERVER_NODE):
        return run_server(grid or LocalGrid(cfg), cfg, on_round)


def run_in_process(cfg: RunConfig, on_round: RoundCallback | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Run every round of ``cfg`` here, into a temporary run folder; returns the final
    global state and one record per round (the lines of metrics.jsonl). ``on_round`` is
    called with each record as it is made."""
    from safetensors.torch import load_file

    records: list[dict[str, Any]] = []

    def collect(record: dict[str, Any]) -> None:
        records.append(record)
        if on_round is not None:
            on_round(record)

    with tempfile.TemporaryDirectory(prefix="reefl-local-") as tmp:
        local = dataclasses.replace(cfg, output_dir=tmp, run_name="in-process", resume=False)
        run_dir = run_local(local, on_round=collect)
        return load_file(str(run_dir / "model.safetensors")), records
