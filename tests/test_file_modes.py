"""What reefl writes through temporary files (safetensors, mkstemp, mkdtemp) gets the mode
that open()/mkdir() give under the process umask. (The slow run in test_progress walks a
real run folder and cache.)"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.outputs import files as file_modes
from reefl.outputs.files import write_atomically
from reefl.outputs.run_folder import RunFolder

UMASK = 0o027  # not the usual 022, so that a hard-coded 0644 shows


@pytest.fixture
def umask() -> Iterator[int]:
    previous = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert file_modes.current_umask() == umask
    assert file_modes.default_mode() == 0o640 and file_modes.default_mode(True) == 0o750

    def no_proc(*args: object, **kwargs: object) -> None:
        raise OSError("no /proc here")

    monkeypatch.setattr(file_modes, "open", no_proc, raising=False)
    assert file_modes.current_umask() == umask  # set and put back
    assert file_modes.current_umask() == umask


def test_a_temporary_file_and_folder_get_the_modes_of_open_and_mkdir(
        tmp_path: Path, umask: int) -> None:
    import tempfile

    _, name = tempfile.mkstemp(dir=tmp_path)
    folder = tempfile.mkdtemp(dir=tmp_path)
    assert (mode(Path(name)), mode(Path(folder))) == (0o600, 0o700)
    file_modes.as_if_opened(name)
    file_modes.as_if_opened(folder)
    assert (mode(Path(name)), mode(Path(folder))) == (0o640, 0o750)


def test_safetensors_files_of_a_run_folder(tmp_path: Path, umask: int) -> None:
    write_atomically(tmp_path / "checkpoint.safetensors", {"w": torch.ones(2)})
    RunFolder(tmp_path).save_model({"w": torch.ones(2)})
    (tmp_path / "plain.json").write_text("{}")
    modes = {path.name: mode(path) for path in tmp_path.iterdir()}
    assert modes == {"checkpoint.safetensors": 0o640, "model.safetensors": 0o640,
                     "plain.json": 0o640}


def test_the_accounting_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   umask: int) -> None:
    from reefl.outputs.accounting import accounting_cache_path, cached_accounting_record

    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path))
    cfg = RunConfig.from_flat({"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 2,
                               "num-heads": 2, "num-exits": 2, "mlp-ratio": 2.0})
    method = build_method(cfg, TaskSpec(num_classes=10, in_chans=1))
    cached_accounting_record(method)
    assert mode(accounting_cache_path(method, 8)) == 0o640


def test_a_data_cache_entry(tmp_path: Path, umask: int) -> None:
    import numpy as np

    from reefl.data import cache
    from reefl.data.spec import DataSpec, Split

    spec = DataSpec(name="tiny", kind="image", num_classes=2, class_names=["a", "b"],
                    train=Split(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1])))
    cache.write(tmp_path / "data" / "entry", spec)
    entry = tmp_path / "data" / "entry"
    assert mode(entry) == 0o750
    assert {mode(path) for path in entry.iterdir()} == {0o640}


def test_atomic_write_renames_on_success_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "record.json"
    with file_modes.atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(file_modes.PARTIAL)
        tmp.write_text("new")
        assert not target.exists()  # nothing at the path until the block ends
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == file_modes.default_mode()
    with pytest.raises(RuntimeError), file_modes.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "new" and sorted(target.parent.iterdir()) == [target]
    folder = tmp_path / "entry"
    with file_modes.atomic_write(folder, directory=True) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert (folder / "meta.json").is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == file_modes.default_mode(directory=True)
