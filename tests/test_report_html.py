"""``reefl report``: the page of a run folder (with and without the optional files), of a
comparison folder, the command, and the page in a real headless Chromium (skipped without
/usr/bin/chromium; .ci/run installs Debian's ``chromium``)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest

from reefl.anytime.calibrate import calibrate_run, operating_points_table, plot_curves
from reefl.cli import main as cli_main
from reefl.launch.comparison import parse_entries
from reefl.outputs.accounting import tier_table
from reefl.outputs.compare import (
    Comparison,
    RunResult,
    format_markdown,
    write_reports,
)
from reefl.outputs.html import load_comparison, operating_rule, table_html, write_report
from reefl.outputs.run_folder import final_table

EXIT_FLOPS = [1_350_000, 2_630_000]


def _point(name: str, thresholds: list[float], flops: float, accuracy: float) -> dict[str, Any]:
    return {"point": name, "thresholds": thresholds, "validation_accuracy": accuracy + 1,
            "validation_flops": flops, "test_accuracy": accuracy, "test_flops": flops}


CALIBRATION = {  # as reefl.anytime.calibrate.calibrate_run writes it
    "criterion": "maxprob", "split": "validation", "validation_examples": 80,
    "test_examples": 100, "target": {"accuracy": None, "flops": None, "tolerance": 1.0},
    "exit_flops": EXIT_FLOPS,
    "exits": [{"exit": 0, "flops": EXIT_FLOPS[0], "test_accuracy": 70.0},
              {"exit": 1, "flops": EXIT_FLOPS[1], "test_accuracy": 80.0}],
    "curve": [_point("exit 0", [0.0, 0.0], EXIT_FLOPS[0], 70.0),
              _point("p=0.5", [0.8, 0.0], 1_800_000, 77.5),
              _point("p=1", [0.6, 0.0], 2_000_000, 79.0),
              _point("exit 1", [2.0, 0.0], EXIT_FLOPS[1], 80.0)],
    "tiers": [
        {"tier": 0, "exit_ids": [0], "exit_flops": EXIT_FLOPS[:1],
         **_point("exit 0", [0.0], EXIT_FLOPS[0], 70.0)},
        {"tier": 1, "exit_ids": [0, 1], "exit_flops": EXIT_FLOPS,
         **_point("p=0.5", [0.8, 0.0], 1_800_000, 77.5)},
    ],
    "method": "reefl", "seed": 0,
}  # fmt: skip
PERSONALISED = {"epochs": 2, "lr": 0.01, "clients_answered": 4, "clients_failed": 0, "exits": [
    {"exit": 0, "clients": 4, "global_mean": 70.0, "global_std": 5.0,
     "personalised_mean": 73.25, "personalised_std": 4.0},
    {"exit": 1, "clients": 4, "global_mean": 80.0, "global_std": 3.0,
     "personalised_mean": 81.0, "personalised_std": 2.5},
]}  # fmt: skip
DATA_URI = re.compile(r'src="data:image/png;base64,([^"]+)"')


def _tiers(params: list[int]) -> list[dict[str, Any]]:
    return [{"tier": t, "exit_block": t, "params_up": p, "params_down": p, "bytes_up": 4 * p,
             "bytes_down": 4 * p, "share_of_full_model": p / params[-1],
             "forward_flops": EXIT_FLOPS[t]} for t, p in enumerate(params)]


def make_run(path: Path, seed: int = 0, shift: float = 0.0, rounds: int = 4) -> Path:
    """A hand-made finished run folder: 2 exits, ``rounds`` rounds, every second one
    evaluated (the last always)."""
    path.mkdir(parents=True)
    records = []
    for r in range(1, rounds + 1):
        record: dict[str, Any] = {"round": r, "lr": 0.01, "train-loss": 2.0 / r,
                                  "round_seconds": 1.0, "elapsed_seconds": float(r)}
        if r % 2 == 0 or r == rounds:
            accs = [40.0 + 8 * r + shift, 50.0 + 8 * r + shift]
            record |= {"exit_accuracy": accs, "exit_loss": [1.0 / r] * 2,
                       "mean_accuracy": sum(accs) / 2, "ensemble_accuracy": accs[1] + 1}
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    last = records[-1]
    final = {key: last[key] for key in ("exit_accuracy", "exit_loss", "mean_accuracy",
                                        "ensemble_accuracy")}
    final |= {"method": "reefl", "seed": seed, "rounds": rounds, "exit_blocks": [0, 1],
              "wall_seconds": 12.0}
    (path / "final.json").write_text(json.dumps(final))
    (path / "config.json").write_text(json.dumps(
        {"method": "reefl", "seed": seed, "dataset": "embedded-mnist",
         "num-server-rounds": rounds, "embed-dim": 64}))
    (path / "accounting.json").write_text(json.dumps({"tiers": _tiers([1000, 2500])}))
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with calibration.json and personalised.json."""
    path = make_run(tmp_path / "run")
    (path / "calibration.json").write_text(json.dumps(CALIBRATION))
    (path / "personalised.json").write_text(json.dumps(PERSONALISED))
    return path


@pytest.fixture
def comparison_dir(tmp_path: Path) -> Path:
    """A comparison folder as ``reefl compare`` writes it: two entries × two seeds (one run
    failed), their run folders, and an accuracy_vs_flops.png."""
    folder = tmp_path / "cmp"
    entries = parse_entries("reefl,reefl[modulation=false]")
    comparison = Comparison(entries, [0, 1], folder, ["num-exits=2"])
    for seed in (0, 1):
        for index, entry in enumerate(entries):
            run = folder / "runs" / entry.run_name(seed)
            if index == 1 and seed == 1:
                result = RunResult(entry, seed, None, None, "run failed (exit 1)")
            else:
                make_run(run, seed, shift=seed - 5 * index)
                result = RunResult(entry, seed, run, json.loads((run / "final.json").read_text()))
            comparison.results.setdefault(entry.label, {})[seed] = result
    write_reports(comparison)
    plot_curves(folder / "accuracy_vs_flops.png", {"reefl": [CALIBRATION]})
    return folder


def embedded_images(page: Path) -> list[bytes]:
    return [base64.b64decode(data) for data in DATA_URI.findall(page.read_text())]


def assert_self_contained(page: Path, pngs: set[str]) -> None:
    """The page embeds exactly the PNGs written beside it, and loads nothing from elsewhere."""
    text = page.read_text()
    assert {p.name for p in page.parent.glob("*.png")} == pngs
    assert sorted(embedded_images(page)) == sorted((page.parent / p).read_bytes() for p in pngs)
    assert "http://" not in text and "https://" not in text
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []


# -- pages ----------------------------------------------------------------------------------


def test_run_page_with_calibration_and_personalised(run_dir: Path) -> None:
    page = write_report(run_dir)
    assert page == run_dir / "report" / "index.html"
    assert_self_contained(page, {"accuracy_per_round.png", "accuracy_vs_flops.png"})
    text = page.read_text()
    final = json.loads((run_dir / "final.json").read_text())
    assert table_html(final_table(final)) in text  # the rows reefl run prints, as HTML
    assert ('<tr class="section-end"><td>1</td><td>1</td><td>82.00</td><td>0.250</td></tr>'
            "<tr><td>mean</td><td></td><td>77.00</td><td></td></tr>") in text
    assert table_html(tier_table(_tiers([1000, 2500]))) in text
    assert ("<tr><td>1</td><td>1</td><td>2,500</td><td>2,500</td><td>0.010</td>"
            "<td>100.00%</td><td>2.630</td></tr>") in text
    assert table_html(operating_points_table(CALIBRATION)) in text
    assert ("<tr><td>1</td><td>77.50</td><td>1.800</td><td>68.4%</td>"
            '<td class="left">0.800</td></tr>') in text
    assert "<pre>" not in text  # no preformatted text tables
    assert "the cheapest point within 1.0 points of the best validation accuracy" in text
    assert ("<td>0</td><td>4</td><td>70.00 ± 5.00</td><td>73.25 ± 4.00</td><td>+3.25</td>"
            in text)
    assert "after 2 local epochs" in text and "clients that answered (4; failed: 0)" in text
    assert "<summary>config.json (5 keys)</summary>" in text


@pytest.mark.parametrize("target, words", [
    ({"accuracy": None, "flops": 2e6, "tolerance": 1.0},
     "the most accurate point within 2M FLOPs per image on the validation split"),
    ({"accuracy": 85.0, "flops": None, "tolerance": 1.0},
     "the cheapest point reaching 85.0% on the validation split"),
    ({"accuracy": None, "flops": None, "tolerance": 0.5},
     "the cheapest point within 0.5 points of the best validation accuracy on the tier's curve"),
])  # fmt: skip
def test_operating_rule_in_words(target: dict[str, Any], words: str) -> None:
    assert operating_rule(target) == words


def test_one_seed_comparison_names_no_error_bars(tmp_path: Path) -> None:
    (entry,) = parse_entries("reefl")
    run = make_run(tmp_path / "runs" / entry.run_name(0))
    comparison = Comparison([entry], [0], tmp_path, [], {entry.label: {0: RunResult(
        entry, 0, run, json.loads((run / "final.json").read_text()))}})
    write_reports(comparison, plot=False)
    text = write_report(tmp_path).read_text()
    assert ("Final test accuracy % per exit of every entry: one finished run each, so no "
            "error bars.") in text
    assert "(seed 0: one run per entry, so no spread)" in text
    assert "standard deviation" not in text


def test_run_page_without_the_optional_files(tmp_path: Path) -> None:
    page = write_report(make_run(tmp_path / "run"))
    assert_self_contained(page, {"accuracy_per_round.png"})
    text = page.read_text()
    assert "Accuracy vs compute" not in text and "Personalised" not in text
    assert "Final accuracy" in text and "Cost per tier" in text


def test_unfinished_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", rounds=6)
    (run / "final.json").unlink()
    text = write_report(run).read_text()
    assert "reefl · seed 0 · 6 of 6 rounds so far" in text
    assert "the run has not finished (6 rounds recorded)" in text
    assert len(DATA_URI.findall(text)) == 1


def test_comparison_page(comparison_dir: Path) -> None:
    assert format_markdown(load_comparison(comparison_dir)) == (
        comparison_dir / "comparison.md").read_text()  # the table compare wrote, again
    page = write_report(comparison_dir)
    assert_self_contained(page, {"accuracy_per_exit.png", "accuracy_per_round.png",
                                 "accuracy_vs_flops.png"})
    text = page.read_text()
    assert "<td>reefl[modulation=false]</td><td>1/2 (failed: seed 1)</td>" in text
    assert "sample standard deviation (n - 1) over seeds" in text
    assert "seeds 0, 1 · common run config: num-exits=2" in text
    assert ("error bars: sample standard deviation over seeds, drawn only where more than one "
            "seed finished") in text
    assert "<h3>reefl, reefl[modulation=false]</h3>" in text  # one cost table for both
    assert (comparison_dir / "report" / "accuracy_vs_flops.png").read_bytes() == (
        comparison_dir / "accuracy_vs_flops.png").read_bytes()


def test_a_moved_comparison_folder_finds_its_runs(comparison_dir: Path, tmp_path: Path) -> None:
    moved = Path(shutil.move(comparison_dir, tmp_path / "moved"))
    (moved / "accuracy_vs_flops.png").unlink()
    page = write_report(moved)
    assert_self_contained(page, {"accuracy_per_exit.png", "accuracy_per_round.png"})


def test_cli_prints_the_page(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"{run_dir / 'report' / 'index.html'}\n"


def test_cli_names_a_folder_it_cannot_report(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"reefl: error: report: {tmp_path} is neither a run folder (no metrics.jsonl or "
        "final.json) nor a comparison folder (no comparison.json)\n")
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"reefl: error: report: {tmp_path / 'nothing'} is not a " \
                                      "folder\n"
    (tmp_path / "final.json").write_text("{")
    assert cli_main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"reefl: error: report: {tmp_path / 'final.json'} is not valid JSON")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("name,content", [
    ("calibration.json", {"criterion": "maxprob"}),  # no curve, no tiers
    ("personalised.json", {"exits": [{"exit": 0}]}),
])
def test_a_file_without_what_reefl_writes_is_named(run_dir: Path, name: str, content: dict,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / name).write_text(json.dumps(content))
    assert cli_main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reefl: error: report: {run_dir / name} does not hold what reefl "
                          "writes there (KeyError: ") and err.count("\n") == 1


# -- in a browser ---------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
WINDOW = (1100, 1600)
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="no /usr/bin/chromium: install Debian's chromium package (.ci/run does)")


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone, or not ours to ask about
        return None


def end_process_group(process: subprocess.Popen[str]) -> None:
    """Kill, by id, ``process`` and every process still in its process group (Chromium's
    helpers, which may outlive it), and wait until they are gone."""
    group = [p for p in psutil.process_iter() if _process_group(p.pid) == process.pid]
    for member in group:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(group, timeout=10)
    process.wait(timeout=10)


def run_chromium(page: Path, *args: str, timeout: float = 120) -> str:
    """Headless Chromium on ``page`` with ``args``, in a new temporary profile; its stdout.
    Every process it started is ended and the profile removed, also on a timeout."""
    with tempfile.TemporaryDirectory(prefix="reefl-chromium-") as profile:
        process = subprocess.Popen(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
             page.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True)  # its own process group: every helper is found
        try:
            stdout, _ = process.communicate(timeout=timeout)
        finally:
            end_process_group(process)
    return stdout


def images_loaded(page: Path) -> tuple[int, int]:
    """(images that decoded, images) on ``page`` in Chromium, as the page's own script counts
    them after ``load``."""
    dom = run_chromium(page, "--virtual-time-budget=5000", "--dump-dom")
    counted = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert counted, "the page's image count is missing: its script did not run"
    return int(counted[1]), int(counted[2])


def check_screenshot(page: Path, path: Path) -> None:
    """A Chromium screenshot of ``page`` at ``WINDOW``: a PNG of that size, not blank."""
    from PIL import Image

    run_chromium(page, f"--screenshot={path}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot is (almost) blank"


@needs_chromium
def test_a_finished_calibrated_run_in_a_browser(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    from reefl.config import RunConfig
    from reefl.federation.local import run_local

    cfg = RunConfig.from_flat({
        "num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 3, "eval-every": 1, "fraction-train": 0.5, "local-epochs": 1,
        "train-examples": 400, "test-examples": 100, "validation-fraction": 0.2,
        "personalised-epochs": 1, "seed": 5, "output-dir": str(tmp_path),
        "run-name": "tiny"})  # fmt: skip
    run = run_local(cfg)
    calibration = calibrate_run(run, plot=False)
    capsys.readouterr()
    assert cli_main(["report", str(run)]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == run / "report" / "index.html"
    text = page.read_text()
    assert table_html(operating_points_table(calibration)) in text
    assert "Personalised accuracy" in text
    assert images_loaded(page) == (2, 2)
    check_screenshot(page, tmp_path / "screenshot.png")


@needs_chromium
@pytest.mark.parametrize("folder, images", [("run_dir", 2), ("comparison_dir", 3)])
def test_every_image_loads_in_a_browser(folder: str, images: int, tmp_path: Path,
                                        request: pytest.FixtureRequest) -> None:
    page = write_report(request.getfixturevalue(folder))
    assert images_loaded(page) == (images, images)
    check_screenshot(page, tmp_path / "screenshot.png")


@needs_chromium
def test_a_broken_image_is_counted(run_dir: Path) -> None:
    page = write_report(run_dir)
    text = page.read_text()
    data = DATA_URI.search(text)
    assert data
    page.write_text(text.replace(data[1], base64.b64encode(b"not a PNG").decode(), 1))
    assert images_loaded(page) == (1, 2)
