"""The app folder handed to ``flwr run`` (``reefl.launch.app_files``): the FAB built from it holds
the same files, byte for byte, as the FAB Flower builds from the app itself, while the
virtual environment and ignored folders are never walked."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files, filter_paths_for_publish

from reefl.launch import app_files as app_files_module
from reefl.launch.app_files import app_files, stage_app

REPO = Path(__file__).resolve().parents[1]


def make_app(root: Path, gitignore: str) -> Path:
    """A small app folder: code, docs, an ignored output folder, a virtual environment, a
    cache folder, a symlink, and files Flower leaves out (``.png``)."""
    files = {
        "pyproject.toml": (REPO / "pyproject.toml").read_text(),
        ".gitignore": gitignore,
        "src/pkg/__init__.py": "x = 1\n",
        "src/pkg/__pycache__/mod.cpython-311.pyc": "binary",
        "src/pkg/data.json": "{}",
        "docs/notes.md": "# notes\n",
        "docs/plot.png": "not packed",
        "outputs/run/config.json": "{}",
        "outputs/keep.md": "kept only if re-included",
        ".venv/lib/site.py": "y = 2\n",
        ".venv/pyvenv.cfg": "home = /usr\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "src/pkg/link.py").symlink_to(root / "src/pkg/__init__.py")
    return root


def flowers_files(root: Path) -> set[str]:
    return set(filter_paths_for_publish(collect_files(root.resolve())))


@pytest.mark.parametrize("gitignore", ["outputs/\n.venv/\n", "outputs/*\n!outputs/keep.md\n", ""])
def test_same_files_as_flowers_own_selection(tmp_path: Path, gitignore: str) -> None:
    root = make_app(tmp_path / "app", gitignore)
    assert set(app_files(root)) == flowers_files(root)
    assert "src/pkg/__init__.py" in app_files(root)
    assert not any(name.startswith(".venv/") for name in app_files(root))


def test_ignored_folders_are_not_walked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    root = make_app(tmp_path / "app", "outputs/\n")
    walked: list[str] = []
    real_walk = app_files_module.os.walk

    def recording_walk(top: str | Path, **kwargs: object):  # type: ignore[no-untyped-def]
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            walked.append(Path(dirpath).relative_to(root.resolve()).as_posix())
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(app_files_module.os, "walk", recording_walk)
    app_files(root)
    assert "src/pkg" in walked
    assert not [d for d in walked if d.split("/")[0] in (".venv", "outputs")
                or "__pycache__" in d]


def test_staged_fab_equals_the_fab_of_the_project(tmp_path: Path) -> None:
    staged = stage_app(REPO, tmp_path / "app")
    assert build_fab_from_disk(staged) == build_fab_from_disk(REPO)
