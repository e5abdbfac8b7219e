"""The server's per-client states on disk (``federation.client_store``): one atomically
written file per client state, only an index in RAM and in the checkpoint, files of an
unfinished round ignored and deleted on resume, and superseded files deleted once a
checkpoint no longer needs them. The end-to-end tests run FedDyn (DepthFL) through the real
ServerApp loop and ClientApp handlers, in process."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reefl.config import RunConfig
from reefl.federation import server_app
from reefl.federation.checkpoint import (
    CHECKPOINT_NAME,
    LEGACY_FORMAT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from reefl.federation.client_store import (
    STORE_DIR,
    ClientStateStore,
    open_run_store,
    state_file_name,
)
from reefl.federation.local import run_local
from reefl.federation.strategy import TieredStrategy
from reefl.outputs.files import DIGEST_KEY
from reefl.outputs.run_folder import config_digest, config_digests

FEDDYN = {"method": "depthfl", "server-update": "feddyn", "num-clients": 4, "num-exits": 2,
          "depth": 2, "embed-dim": 16, "num-heads": 2, "num-server-rounds": 4,
          "eval-every": 2, "fraction-train": 0.5, "local-epochs": 1, "seed": 3,
          "train-examples": 400, "test-examples": 100, "batch-size": 16}


class Stop(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def _state(value: float) -> dict[str, torch.Tensor]:
    """A state with a transposed view and a row of one storage (safetensors refuses shared
    storage unless cloned)."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + value
    return {"g.weight": base, "g.t": base.t(), "g.row": base[1]}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tensors_held(root: object, skip: object) -> int:
    """How many tensors ``root`` reaches through its attributes and containers (``skip``,
    classes, modules and functions left out)."""
    seen: set[int] = set()
    stack, count = [root], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or item is skip or isinstance(item, type | ModuleType | FunctionType):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            count += 1
        else:
            stack.extend(gc.get_referents(item))
    return count


# -- the store on its own ------------------------------------------------------------------
@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_put_then_get_gives_the_state_back(on_disk: bool, tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path / STORE_DIR if on_disk else None)
    assert store.get(17) == {}
    store.put(17, 5, _state(1.0))
    store.put(3, 5, _state(2.0))
    assert _equal(store.get(17), _state(1.0)) and _equal(store.get(3), _state(2.0))
    assert store.index() == {17: 5, 3: 5}
    if on_disk:
        assert _names(tmp_path / STORE_DIR) == ["17.r5.safetensors", "3.r5.safetensors"]


def test_a_put_leaves_no_temporary_file_and_a_failed_one_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / STORE_DIR
    store = ClientStateStore(folder)
    store.put(1, 1, _state(1.0))
    store.put(1, 2, _state(2.0))
    assert _names(folder) == ["1.r1.safetensors", "1.r2.safetensors"]  # r1 until pruned

    def killed(*_: Any) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr("reefl.outputs.files.os.replace", killed)
    with pytest.raises(OSError):
        store.put(1, 3, _state(3.0))
    assert store.index() == {1: 2} and _equal(store.get(1), _state(2.0))
    monkeypatch.undo()
    assert _names(folder) == ["1.r1.safetensors", "1.r2.safetensors"]  # the failure cleaned
    (folder / ".1.r3.safetensors.x1y2.partial").write_bytes(b"half")  # as a kill leaves it
    reopened = ClientStateStore.open(folder, {1: 2})
    assert _names(folder) == ["1.r2.safetensors"]  # no temporary file, no superseded r1
    assert _equal(reopened.get(1), _state(2.0))


def test_open_ignores_and_deletes_files_newer_than_the_index(tmp_path: Path) -> None:
    """Stopped inside round 2 after two clients' states were written, resumed from round
    1's checkpoint: the store is round 1's."""
    folder = tmp_path / STORE_DIR
    store = ClientStateStore(folder)
    store.put(1, 1, _state(1.0))
    store.put(2, 1, _state(2.0))
    saved = store.index()
    store.prune()
    store.put(1, 2, _state(10.0))  # round 2, not checkpointed
    store.put(3, 2, _state(30.0))
    reopened = ClientStateStore.open(folder, saved)
    assert _names(folder) == ["1.r1.safetensors", "2.r1.safetensors"]
    assert reopened.index() == {1: 1, 2: 1}
    assert _equal(reopened.get(1), _state(1.0)) and reopened.get(3) == {}


def test_prune_deletes_only_files_superseded_since_the_last_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / STORE_DIR
    store = ClientStateStore(folder)
    store.put(1, 1, _state(1.0))
    store.put(2, 1, _state(2.0))
    store.prune()
    assert _names(folder) == ["1.r1.safetensors", "2.r1.safetensors"]
    store.put(1, 2, _state(3.0))
    assert _names(folder) == ["1.r1.safetensors", "1.r2.safetensors", "2.r1.safetensors"]
    store.prune()  # as after the round-2 checkpoint
    assert _names(folder) == ["1.r2.safetensors", "2.r1.safetensors"]
    assert _equal(store.get(1), _state(3.0))


def test_open_refuses_an_index_whose_file_is_missing(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path / STORE_DIR)
    store.put(1, 1, _state(1.0))
    with pytest.raises(CheckpointError, match=r"lacks the client states .*\[2\]"):
        ClientStateStore.open(tmp_path / STORE_DIR, {1: 1, 2: 1})


def test_the_checkpoint_holds_the_index_not_the_client_tensors(tmp_path: Path) -> None:
    """Its size does not grow with the states of clients that did not take part: 100
    clients' states (4 KiB each) add a few bytes of index per client."""
    store = ClientStateStore(tmp_path / STORE_DIR)
    big = {"g": torch.zeros(1024)}
    sizes = []
    for count in (2, 100):
        for pid in range(count):
            store.put(pid, 1, big)
        run_dir = tmp_path / f"run{count}"
        run_dir.mkdir()
        path = save_checkpoint(run_dir, Checkpoint(1, "digest", {"w": torch.ones(8)},
                                                   client_rounds=store.index()))
        with safe_open(str(path), framework="pt") as stream:
            assert list(stream.keys()) == ["global/w"]
        assert load_checkpoint(run_dir, "digest").client_rounds == store.index()
        sizes.append(path.stat().st_size)
    assert sizes[1] - sizes[0] < 98 * 16  # index entries, not 98 × 4 KiB of tensors


def test_the_held_tensors_counter_sees_states_kept_in_memory(tmp_path: Path) -> None:
    """The counter the memory test below relies on: a store in memory holds its states, one
    on disk none."""
    in_memory, on_disk = ClientStateStore(), ClientStateStore(tmp_path / STORE_DIR)
    for store in (in_memory, on_disk):
        store.put(5, 1, _state(1.0))
    assert _tensors_held(in_memory, None) == 3 and _tensors_held(on_disk, None) == 0


# -- through the ServerApp -------------------------------------------------------------------
def _config(tmp_path: Path, name: str) -> RunConfig:
    return RunConfig.from_flat({**FEDDYN, "output-dir": str(tmp_path), "run-name": name})


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An unstopped FedDyn run, with what each round left: the index, the state files, and
    the tensors the strategy holds (its method aside)."""
    tmp_path = tmp_path_factory.mktemp("whole")
    cfg = _config(tmp_path, "whole")
    strategies: list[TieredStrategy] = []
    rounds: list[dict[str, Any]] = []

    class Watched(TieredStrategy):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            strategies.append(self)

    def on_round(line: dict[str, Any]) -> None:
        strategy = strategies[0]
        rounds.append({"round": line["round"], "used": line["clients"]["used"],
                       "index": strategy.client_store.index(),
                       "files": _names(tmp_path / "whole" / STORE_DIR),
                       "held": _tensors_held(strategy, strategy.method)})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_app, "TieredStrategy", Watched)
        run_dir = run_local(cfg, on_round=on_round)
    return {"cfg": cfg, "run_dir": run_dir, "rounds": rounds,
            "model": load_file(str(run_dir / "model.safetensors"))}


def test_each_round_writes_the_states_of_its_clients_and_keeps_one_file_each(
        whole: dict[str, Any]) -> None:
    seen: dict[int, int] = {}
    for entry in whole["rounds"]:
        seen.update(dict.fromkeys(entry["used"], entry["round"]))
        assert entry["index"] == seen
        assert entry["files"] == sorted(state_file_name(p, r) for p, r in seen.items())
    saved = load_checkpoint(whole["run_dir"], config_digest(whole["cfg"]))
    assert saved.client_rounds == seen and saved.legacy_client_states == {}
    with safe_open(str(whole["run_dir"] / CHECKPOINT_NAME), framework="pt") as stream:
        assert not [k for k in stream.keys() if k.startswith("client/")]  # noqa: SIM118


def test_the_strategy_holds_no_tensors_for_idle_clients(whole: dict[str, Any]) -> None:
    idle = [set(e["index"]) - set(e["used"]) for e in whole["rounds"]]
    assert any(idle)  # some client had a state and did not take part in some round
    assert [e["held"] for e in whole["rounds"]] == [0] * len(whole["rounds"])


def test_a_run_stopped_after_writing_states_of_round_3_resumes_exactly(
        whole: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between round 3's client states and its checkpoint: resumed from round 2's,
    the round-3 files are deleted, round 3 is redone, and the model is the unstopped one."""
    cut = _config(tmp_path, "cut")

    def save_until_round_3(run_dir: Path, checkpoint: Checkpoint) -> Path:
        if checkpoint.round == 3:
            raise Stop
        return save_checkpoint(run_dir, checkpoint)

    monkeypatch.setattr(server_app, "save_checkpoint", save_until_round_3)
    with pytest.raises(Stop):
        run_local(cut)
    monkeypatch.undo()
    folder = tmp_path / "cut" / STORE_DIR
    assert [n for n in _names(folder) if ".r3." in n]  # written before the stop
    saved = load_checkpoint(tmp_path / "cut", config_digest(cut))
    assert saved.round == 2
    open_run_store(tmp_path / "cut", saved)
    assert _names(folder) == sorted(state_file_name(p, r) for p, r in saved.client_rounds.items())
    resumed = load_file(str(run_local(dataclasses.replace(cut, resume=True))
                            / "model.safetensors"))
    assert _equal(resumed, whole["model"])


def test_a_checkpoint_with_client_tensors_still_resumes_exactly(
        whole: dict[str, Any], tmp_path: Path) -> None:
    """A ``reefl-checkpoint-1`` file (states as ``client/<pid>/<name>`` tensors, no
    client-states folder) resumes, its states moved into the store."""
    cut = _config(tmp_path, "old")

    def stop_after_2(line: dict[str, Any]) -> None:
        if line["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_local(cut, on_round=stop_after_2)
    run_dir = tmp_path / "old"
    path = run_dir / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as stream:
        metadata = dict(stream.metadata())
        tensors = {k: stream.get_tensor(k) for k in stream.keys()}  # noqa: SIM118
    for pid, server_round in json.loads(metadata.pop("client_rounds")).items():
        state_path = run_dir / STORE_DIR / state_file_name(int(pid), server_round)
        tensors.update({f"client/{pid}/{k}": v for k, v in load_file(str(state_path)).items()})
        state_path.unlink()
    for key in (DIGEST_KEY, "config_sha256", "client_digests"):  # older reefl wrote none
        del metadata[key]
    metadata["config_digest"] = config_digest(cut, legacy=True)  # with the run's location
    save_file(tensors, str(path), metadata={**metadata, "format": LEGACY_FORMAT})
    assert load_checkpoint(run_dir, config_digests(cut)).legacy_client_states
    resumed = load_file(str(run_local(dataclasses.replace(cut, resume=True))
                            / "model.safetensors"))
    assert _equal(resumed, whole["model"])
