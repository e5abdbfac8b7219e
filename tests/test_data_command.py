"""`reefl data` on a user's folder, and bad data stopping `reefl run` before Flower starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reefl.cli import main
from reefl.data import build_federated_data, load_source


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path / "cache"))
    load_source.cache_clear()
    build_federated_data.cache_clear()
    yield
    load_source.cache_clear()
    build_federated_data.cache_clear()


def _folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(root / f"c{k}/{i}.png")
    return root


def test_data_command_summarises_the_partition_and_saves_the_histogram(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "images")
    png = tmp_path / "hist.png"
    code = main(["data", "-c", f'dataset="{folder}" num-clients=3 test-fraction=0.2 '
                 'partitioner="equal-dirichlet" img-size=8 patch-size=4', "-o", str(png),
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(out[: out.rindex("}") + 1])
    # 30 images, 20% stratified test (2 per class) -> 24 in the pool -> 8 per client
    assert summary["test_examples"] == 6 and summary["train_examples"] == 24
    assert summary["examples_per_client"] == {"min": 8, "median": 8.0, "max": 8}
    assert summary["local_test_per_client"] == {"min": 2, "median": 2.0, "max": 2}
    assert summary["classes"] == 3 and summary["input_shape"] == [1, 8, 8]
    assert summary["partitioner"] == "equal-dirichlet" and summary["clients"] == 3


def test_other_options_get_another_histogram_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "images")
    paths = []
    for clients in (3, 2, 3):
        assert main(["data", "-c", f'dataset="{folder}" num-clients={clients} img-size=8 '
                     f'patch-size=4 output-dir="{tmp_path / "out"}"']) == 0
        paths.append(capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1])
    assert paths[0] != paths[1] and paths[0] == paths[2]  # the same options, the same file
    assert all(Path(p).name.startswith("data-images-s0-") for p in paths)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [(lambda root: root.mkdir(), "no image or audio files"),
     (lambda root: _folder(root, classes=1), "has only one class"),
     (lambda root: (_folder(root) / "c1" / "3.png").write_bytes(b"not a png"),
      "cannot read image"),
     (lambda root: None, "the path of an existing local data set")],
    ids=["empty", "one-class", "corrupt", "missing"])
def test_bad_data_stops_reefl_run_before_flower_starts(
        make, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    make(root)
    out_dir = tmp_path / "out"
    code = main(["run", "-c", f'dataset="{root}" output-dir="{out_dir}"'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert fragment in err and "dataset" in err
    assert not out_dir.exists() or not any(out_dir.rglob("*.json"))  # nothing ran


def test_an_offline_hub_source_is_one_line_saying_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    code = main(["data", "-c", 'dataset="cifar100" num-clients=100'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "offline" in err and "local copy" in err and "uoft-cs/cifar100" in err
