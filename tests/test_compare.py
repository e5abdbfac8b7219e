"""``reefl compare``: entry parsing, the reports, and the orchestration with a fake run_app.

Nothing here starts Flower: ``simulation.run_app`` is replaced by a fake that writes a run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from reefl.cli import main as cli_main
from reefl.config import RunConfig
from reefl.launch import comparison as cmp
from reefl.launch import run_config, simulation
from reefl.launch.comparison import common_overrides, parse_entries, parse_seeds, run_overrides
from reefl.launch.errors import RunConfigError, RunFailed
from reefl.outputs import run_folder
from reefl.outputs.compare import (
    Comparison,
    Entry,
    RunResult,
    comparison_table,
    plot_title,
    write_reports,
)
from reefl.outputs.progress import ProgressView, StreamView

# -- entries --------------------------------------------------------------------------------


def test_plain_and_bracketed_entries() -> None:
    entries = parse_entries(
        'reefl, reefl[modulation=false],reefl[distillation="none" kd-rounds=10],'
        'no-mod[method="reefl", modulation=false],reefl[exit-blocks="0,1,2,3"]'
    )
    assert [e.label for e in entries] == [
        "reefl", "reefl[modulation=false]", 'reefl[distillation="none" kd-rounds=10]',
        'no-mod[method="reefl", modulation=false]', 'reefl[exit-blocks="0,1,2,3"]',
    ]  # fmt: skip
    assert [e.method for e in entries] == ["reefl"] * 5
    assert [e.overrides for e in entries] == [
        "", "modulation=false", 'distillation="none" kd-rounds=10',
        'method="reefl" modulation=false', 'exit-blocks="0,1,2,3"',
    ]  # fmt: skip
    assert [e.run_name(1) for e in entries] == [
        "reefl-s1", "reefl-modulation-false-s1", "reefl-distillation-none-kd-rounds-10-s1",
        "no-mod-method-reefl-modulation-false-s1", "reefl-exit-blocks-0-1-2-3-s1",
    ]  # fmt: skip


def test_several_method_arguments_are_joined_and_slugs_stay_unique() -> None:
    entries = parse_entries(["a[x=1]", "a[x=1 ]", "depthfl"])
    assert [e.method for e in entries] == ["a", "a", "depthfl"]
    assert [e.slug for e in entries] == ["a-x-1", "a-x-1-2", "depthfl"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty entry"),
        ("reefl,", "empty entry"),
        ("reefl[modulation=false", "unclosed '['"),
        ("reefl]", "unmatched ']'"),
        ('reefl[distillation="none]', 'unclosed "'),
        ("reefl[modulation=false]x", "nothing may follow"),
        ("reefl[a=1]b[c=2]", "nothing may follow"),
        ("[modulation=false]", "needs a name"),
        ("ree fl", "needs a name"),
        ("reefl[modulation]", "'modulation' is not key=value"),
        ("reefl[modulation=false kd]", "'kd' is not key=value"),
        ("reefl[seed=1]", "'seed' is set by compare; use --seeds"),
        ('reefl[output-dir="x"]', "'output-dir' is set by compare"),
        ("reefl,reefl", "given twice"),
    ],
)
def test_bad_entries_give_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(RunConfigError, match="--methods") as info:
        parse_entries(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_seeds() -> None:
    assert parse_seeds("0, 1,5") == [0, 1, 5]
    for bad, message in (("0,x", "integers"), ("", "empty"), ("1,1", "repeats")):
        with pytest.raises(RunConfigError, match=message):
            parse_seeds(bad)


def test_overrides_order_and_toml_file(tmp_path: Path) -> None:
    entry = parse_entries("reefl[modulation=false]")[0]
    common = common_overrides(["num-clients=4", "", "fraction-train=1.0"])
    assert common == ["num-clients=4", "fraction-train=1.0"]
    assert run_overrides(common, entry, 3, tmp_path) == [
        "num-clients=4", "fraction-train=1.0", "modulation=false",
        f'method="reefl" seed=3 output-dir="{tmp_path}" run-name="reefl-modulation-false-s3"',
    ]  # fmt: skip
    toml = tmp_path / "mine.toml"
    toml.write_text('num-clients = 4\ndistillation = "all"\naugment = true\nlr-max = 0.01\n')
    common = common_overrides([str(toml)])
    assert common == [str(toml)]  # files pass through: run_app's parser reads them in order
    mixed = common_overrides(["num-clients=8", str(toml), "augment=false"])
    assert mixed == ["num-clients=8", str(toml), "augment=false"]
    assert run_config.parse_overrides(mixed)["num-clients"] == 4
    assert run_config.parse_overrides(mixed)["augment"] is False
    parsed = run_config.parse_overrides(run_overrides(common, entry, 0, tmp_path))
    assert parsed["num-clients"] == 4 and parsed["distillation"] == "all"
    assert parsed["modulation"] is False and parsed["seed"] == 0 and parsed["lr-max"] == 0.01
    for bad in ("seed=1", 'method="reefl"', 'run-name="x"'):
        with pytest.raises(RunConfigError, match="compare sets"):
            common_overrides([bad])
    with pytest.raises(RunConfigError, match="not found"):
        common_overrides([str(tmp_path / "missing.toml")])
    with pytest.raises(RunConfigError, match="neither key=value"):
        common_overrides(["modulation"])


# -- reports from fake run folders ------------------------------------------------------------


def _final(accs: list[float], seed: int, ensemble: float | None = 0.0, **extra: Any) -> dict:
    final = {
        "exit_accuracy": accs, "exit_loss": [1.0] * len(accs),
        "mean_accuracy": sum(accs) / len(accs), "method": "reefl", "seed": seed, "rounds": 1,
        "exit_blocks": list(range(len(accs))), "wall_seconds": 2.0,
    }  # fmt: skip
    if ensemble is not None:
        final["ensemble_accuracy"] = ensemble
    return {**final, **extra}


def _folder(path: Path, final: dict | None = None, config: dict | None = None,
            params: list[int] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if final is not None:
        (path / "final.json").write_text(json.dumps(final))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if params is not None:
        tiers = [{"tier": t, "params_up": p, "params_down": p, "forward_flops": 1}
                 for t, p in enumerate(params)]
        (path / "accounting.json").write_text(json.dumps({"tiers": tiers}))
    return path


def _result(entry: Entry, seed: int, folder: Path, final: dict | None,
            error: str | None = None) -> RunResult:
    return RunResult(entry, seed, folder, final, error)


def cmp_text_table(comparison: Comparison) -> list[str]:
    """The lines of the table ``reefl compare`` prints (rich, as text)."""
    from reefl.outputs.tables import text

    return text(comparison_table(comparison)).splitlines()


@pytest.mark.parametrize(
    ("seeds", "finished", "words", "title"),
    [
        ([0], {0}, "(seed 0: one run per entry, so no spread)", "test accuracy per exit (seed 0)"),
        ([0, 1], {1}, "(seeds 0, 1: at most one finished run per entry, so no spread)",
         "test accuracy per exit (seeds 0, 1)"),
        ([0, 1, 2], {0, 2}, "(seeds 0, 1, 2: mean ± sample standard deviation (n - 1) over "
         "seeds where more than one seed finished)",
         "test accuracy per exit, mean over seeds 0, 1, 2 (error bars: sample std)"),
    ],
)
def test_legend_and_plot_title_name_error_bars_only_when_drawn(
        seeds: list[int], finished: set[int], words: str, title: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    titles: list[str] = []
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, path, **_: titles.append(self.axes[0].get_title()))
    (entry,) = parse_entries("reefl")
    comparison = Comparison([entry], seeds, tmp_path)
    for seed in seeds:
        final = _final([80.0 + seed, 90.0], seed, ensemble=91.0) if seed in finished else None
        folder = _folder(tmp_path / "runs" / entry.run_name(seed), final, params=[10, 20])
        comparison.results.setdefault(entry.label, {})[seed] = _result(
            entry, seed, folder, final, None if final else "run failed")
    table = write_reports(comparison)
    legend = table.split("\n\n")[1]
    assert legend.startswith("Test accuracy % at every exit, their mean, and the ensemble of "
                             f"the exits, from each run's final.json {words}. Blank: ")
    assert titles == [title]
    assert "0:" not in title and "seeds 0:" not in table  # no "seeds 0:" with nothing after
    spread = len(finished) > 1
    assert ("standard deviation" in table) == ("error bars" in title) == spread


def test_table_json_and_plot_from_fake_runs(tmp_path: Path) -> None:
    a, b, c, d = parse_entries("reefl,reefl[modulation=false],other[method=\"reefl\"],broken")
    runs = tmp_path / "runs"
    f = {
        (a, 0): _final([80.0, 90.0], 0, ensemble=91.0),
        (a, 1): _final([82.0, 94.0], 1, ensemble=93.0),
        (b, 0): _final([70.0, 75.0], 0, ensemble=None),
        (b, 1): None,
        (c, 0): _final([60.0, 61.0, 62.0], 0, ensemble_accuracy=None),
        (c, 1): _final([64.0, 65.0, 66.0], 1, ensemble_accuracy=None),
        (d, 0): None,
        (d, 1): None,
    }
    comparison = Comparison([a, b, c, d], [0, 1], tmp_path)
    for (entry, seed), final in f.items():
        folder = _folder(runs / entry.run_name(seed), final,
                         params=[1000, 2500] if entry is a else [1500, 3000, 4_200_000])
        error = None if final else "run failed (flwr run exited with 1)"
        comparison.results.setdefault(entry.label, {})[seed] = _result(entry, seed, folder,
                                                                       final, error)
    table = write_reports(comparison)
    lines = table.splitlines()
    sd = math.sqrt
    # exit 0: 80, 82 -> 81 ± sqrt(2); exit 1: 90, 94 -> 92 ± sqrt(8); mean: 85, 88 -> 86.5 ±
    # sqrt(4.5); ensemble 91, 93 -> 92 ± sqrt(2) (sample std)
    assert [f"{sd(x):.2f}" for x in (2, 8, 4.5)] == ["1.41", "2.83", "2.12"]
    assert [[c.strip() for c in line.split(" | ")] for line in lines[:6]] == [
        ["| entry", "runs", "exit 0", "exit 1", "exit 2", "mean", "ensemble", "params up t0",
         "params up t1", "params up t2 |"],
        ["|-------------------------|---------------------:|-------------:|-------------:|"
         "-------------:|-------------:|-------------:|-------------:|-------------:|"
         "-------------:|"],
        ["| reefl", "2", "81.00 ± 1.41", "92.00 ± 2.83", "", "86.50 ± 2.12", "92.00 ± 1.41",
         "1k", "2.5k", "|"],
        ["| reefl[modulation=false]", "1/2 (failed: seed 1)", "70.00", "75.00", "", "72.50",
         "", "1.5k", "3k", "4.2M |"],
        ['| other[method="reefl"]', "2", "62.00 ± 2.83", "63.00 ± 2.83", "64.00 ± 2.83",
         "63.00 ± 2.83", "", "1.5k", "3k", "4.2M |"],
        ["| broken", "failed", "—", "—", "—", "—", "—", "1.5k", "3k", "4.2M |"],
    ]
    # padded: every line of the table as wide as the header
    assert {len(line) for line in lines[:6]} == {len(lines[0])}
    assert lines[2] == ("| reefl                   |                    2 | 81.00 ± 1.41 | "
                        "92.00 ± 2.83 |              | 86.50 ± 2.12 | 92.00 ± 1.41 |           1k "
                        "|         2.5k |              |")
    assert lines[7].startswith(
        "Test accuracy % at every exit, their mean, and the ensemble of the exits, from each "
        "run's final.json (seeds 0, 1: mean ± sample standard deviation (n - 1) over seeds "
        "where more than one seed finished). ")
    assert plot_title(comparison) == ("test accuracy per exit, mean over seeds 0, 1 "
                                          "(error bars: sample std)")
    assert (tmp_path / "comparison.md").read_text() == table
    printed = cmp_text_table(comparison)
    assert printed[2] == (
        "reefl" + " " * 40 + "2   81.00 ± 1.41   92.00 ± 2.83                  "
        "86.50 ± 2.12   92.00 ± 1.41             1k           2.5k")
    assert printed[3].startswith(  # the label whole: its brackets are no rich markup
        "reefl[modulation=false]   1/2 (failed: seed 1)          70.00")

    data = json.loads((tmp_path / "comparison.json").read_text())
    assert list(data) == [a.label, b.label, c.label, d.label]
    assert data["reefl"]["per_seed"] == {"0": f[(a, 0)], "1": f[(a, 1)]}
    assert data["reefl"]["overrides"] == ""
    assert data["reefl[modulation=false]"]["overrides"] == "modulation=false"
    assert data["reefl[modulation=false]"]["failed"] == {"1": "run failed (flwr run exited with 1)"}
    assert [t["params_up"] for t in data["reefl"]["tier_costs"]] == [1000, 2500]
    summary = data["reefl"]["summary"]
    assert summary["exit_accuracy"][1] == {"mean": 92.0, "std": pytest.approx(sd(8)), "n": 2}
    assert summary["mean_accuracy"]["mean"] == 86.5
    assert data["reefl[modulation=false]"]["summary"]["ensemble_accuracy"] is None
    assert data["broken"]["per_seed"] == {}

    png = (tmp_path / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_tier_costs_fall_back_to_the_run_config(tmp_path: Path) -> None:
    """No accounting.json: the costs come from config.json via RunConfig and build_method."""
    from reefl.outputs.accounting import costs_from_config

    entry = parse_entries("reefl")[0]
    config = RunConfig.from_flat({"embed-dim": 8, "depth": 2, "num-exits": 2, "num-heads": 2,
                                  "patch-size": 14}).to_flat()
    folder = _folder(tmp_path / "runs" / "reefl-s0", _final([50.0, 60.0], 0), config)
    comparison = Comparison([entry], [0], tmp_path)
    comparison.results["reefl"] = {0: _result(entry, 0, folder, _final([50.0, 60.0], 0))}
    write_reports(comparison, plot=False)
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["reefl"]["tier_costs"] == costs_from_config(config)
    assert not (tmp_path / "comparison.png").exists()


# -- orchestration with a fake run_app --------------------------------------------------------


class FakeRunApp:
    """Records calls; writes a finished run folder (final.json with its config_digest, as the
    ServerApp does), or fails for the (method-run-name) given."""

    def __init__(self, fail: set[str] = frozenset(), interrupt_at: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.resumed: list[Path] = []
        self.views: list[Any] = []
        self.fail = fail
        self.interrupt_at = interrupt_at

    def __call__(self, overrides: list[str], app_dir: Any = None,
                 federation_overrides: Any = (), quiet: bool = False,
                 resume: Path | None = None, view: Any = None, table: bool = True) -> Path:
        assert quiet and not table
        self.views.append(view)
        self.calls.append(list(overrides))
        if self.interrupt_at == len(self.calls):
            raise KeyboardInterrupt
        if resume is not None:
            self.resumed.append(resume)
            prepared = run_config.prepare_resume(resume, app_dir, federation_overrides)
        else:
            prepared = run_config.prepare_run(overrides, app_dir, federation_overrides)
        name, seed = prepared.config["run-name"], prepared.config["seed"]
        if name in self.fail:
            raise RunFailed(f"run failed (flwr run exited with 1); run folder {prepared.run_dir}",
                            prepared.run_dir)
        bonus = 10.0 if prepared.config["modulation"] else 0.0
        accs = [50.0 + bonus + seed, 60.0 + bonus + seed]
        config = RunConfig.from_flat(prepared.config).to_flat()
        final = _final(accs, seed, ensemble=70.0 + seed, config_digest=prepared.digest)
        return _folder(prepared.run_dir, final, config, params=[100, 200])


COMMON = ["num-exits=2 depth=2", "num-server-rounds=1"]


def test_runs_seed_by_seed_with_the_right_overrides(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    fake = FakeRunApp(fail={"reefl-modulation-false-s1"})
    monkeypatch.setattr(simulation, "run_app", fake)
    lines: list[str] = []
    entries = parse_entries("reefl,reefl[modulation=false]")
    comparison = cmp.compare(entries, [0, 1], tmp_path / "cmp", COMMON, out=lines.append)
    runs = (tmp_path / "cmp" / "runs").resolve()
    assert fake.calls == [
        [*COMMON, f'method="reefl" seed=0 output-dir="{runs}" run-name="reefl-s0"'],
        [*COMMON, "modulation=false", f'method="reefl" seed=0 output-dir="{runs}" '
                                      'run-name="reefl-modulation-false-s0"'],
        [*COMMON, f'method="reefl" seed=1 output-dir="{runs}" run-name="reefl-s1"'],
        [*COMMON, "modulation=false", f'method="reefl" seed=1 output-dir="{runs}" '
                                      'run-name="reefl-modulation-false-s1"'],
    ]  # fmt: skip
    assert [(r.entry.label, r.seed) for r in comparison.failed] == [
        ("reefl[modulation=false]", 1)]
    assert sum("started" in line for line in lines) == 4
    assert "[1/4] reefl · seed 0 · done in" in lines[2] and "mean 65.00%" in lines[2]
    assert "ensemble 70.00%" in lines[2]
    assert "[4/4] reefl[modulation=false] · seed 1 · FAILED after" in lines[-1]
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["reefl"]["per_seed"]["1"]["exit_accuracy"] == [61.0, 71.0]
    assert list(data["reefl[modulation=false]"]["per_seed"]) == ["0"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert ("| reefl                   |                    2 | 60.50 ± 0.71 | 70.50 ± 0.71 | "
            "65.50 ± 0.71 | 70.50 ± 0.71 |") in table
    assert ("| reefl[modulation=false] | 1/2 (failed: seed 1) |        50.00 |        60.00 | "
            "       55.00 |") in table
    assert (tmp_path / "cmp" / "comparison.png").is_file()


@pytest.mark.parametrize("verbose", [False, True])
def test_every_run_shows_a_progress_line_or_with_verbose_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verbose: bool) -> None:
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    cmp.compare(parse_entries("reefl,depthfl"), [0], tmp_path, COMMON, out=lambda _: None,
                verbose=verbose)
    if verbose:
        assert [type(view) for view in fake.views] == [StreamView, StreamView]
    else:
        assert [type(view) for view in fake.views] == [ProgressView, ProgressView]
        assert [view.prefix for view in fake.views] == [
            "reefl compare: [1/2] reefl · seed 0 · ", "reefl compare: [2/2] depthfl · seed 0 · "]
        assert all(view.transient for view in fake.views)


def test_resume_reuses_finished_runs_of_the_same_config(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    entries = parse_entries("reefl")
    cmp.compare(entries, [0], tmp_path, COMMON, out=lambda _: None)
    lines: list[str] = []
    again = cmp.compare(entries, [0, 1], tmp_path, COMMON, resume=True, out=lines.append)
    assert len(fake.calls) == 2  # seed 0 reused, seed 1 run
    assert any("reused" in line for line in lines)
    assert again.results["reefl"][0].reused and not again.results["reefl"][1].reused
    folder = tmp_path / "runs" / "reefl-s0"
    with pytest.raises(RunConfigError, match=f"{folder} holds neither a finished run of this "
                                             "config nor a checkpoint"):
        cmp.compare(entries, [0], tmp_path, [*COMMON, "local-epochs=2"], resume=True,
                    out=lambda _: None)
    assert len(fake.calls) == 2  # a different config is neither reused nor run over it


def test_a_final_json_is_reused_only_with_the_digest_of_the_config(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """config.json is written when a run starts, so it says nothing about final.json: an old
    final.json of another config (or of none) beside it is not reused."""
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    entries = parse_entries("reefl")
    cmp.compare(entries, [0], tmp_path, COMMON, out=lambda _: None)
    final_path = tmp_path / "runs" / "reefl-s0" / "final.json"
    final = json.loads(final_path.read_text())
    for stale in ({**final, "config_digest": "0123456789abcdef"},
                  {k: v for k, v in final.items() if k != "config_digest"}):
        final_path.write_text(json.dumps(stale))
        with pytest.raises(RunConfigError, match="holds neither a finished run"):
            cmp.compare(entries, [0], tmp_path, COMMON, resume=True, out=lambda _: None)
    assert len(fake.calls) == 1


def test_a_run_with_a_checkpoint_and_no_final_json_is_resumed(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    entries = parse_entries("reefl")
    cmp.compare(entries, [0], tmp_path, COMMON, out=lambda _: None)
    folder = (tmp_path / "runs" / "reefl-s0").resolve()
    (folder / "final.json").unlink()  # interrupted after a round was saved
    (folder / run_folder.CHECKPOINT_FILE).write_bytes(b"saved")
    lines: list[str] = []
    again = cmp.compare(entries, [0], tmp_path, COMMON, resume=True, out=lines.append)
    assert fake.resumed == [folder] and fake.calls[-1] == []
    assert again.results["reefl"][0].ok and any("resumed" in line for line in lines)


def test_existing_run_folders_without_resume_are_an_error(
        tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    args = ["compare", "-m", "reefl", "-o", str(tmp_path), *sum((["-c", c] for c in COMMON), [])]
    assert cli_main(args) == 0
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    folder = (tmp_path / "runs" / "reefl-s0").resolve()
    assert err.count("\n") == 1 and f"run folder {folder} already holds a run" in err
    assert "pass --resume" in err
    assert cli_main([*args, "--resume"]) == 0 and len(fake.calls) == 1


def test_a_bad_config_stops_before_any_run(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    fake = FakeRunApp()
    monkeypatch.setattr(simulation, "run_app", fake)
    entries = parse_entries("reefl,reefl[dirichlet-alpha=0.0]")
    with pytest.raises(RunConfigError, match=r"reefl\[dirichlet-alpha=0.0\] \(seed 0\): "
                                             "dirichlet-alpha must be"):
        cmp.compare(entries, [0], tmp_path, COMMON, out=lambda _: None)
    with pytest.raises(RunConfigError, match="method must be one of"):
        cmp.compare(parse_entries("nosuchmethod"), [0], tmp_path, COMMON, out=lambda _: None)
    assert fake.calls == []


def test_interrupt_keeps_the_finished_runs(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(simulation, "run_app", FakeRunApp(interrupt_at=2))
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(parse_entries("reefl,reefl[modulation=false]"), [0], tmp_path, COMMON,
                    out=lambda _: None)
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert list(data["reefl"]["per_seed"]) == ["0"]
    assert data["reefl[modulation=false]"]["per_seed"] == {}
    assert data["reefl[modulation=false]"]["failed"] == {"0": "interrupted"}


def test_cli_exit_codes(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr(simulation, "run_app", FakeRunApp(fail={"reefl-s1"}))
    args = ["compare", "--methods", "reefl", "--seeds", "0,1", "--output-dir", str(tmp_path)]
    for item in COMMON:
        args += ["--run-config", item]
    assert cli_main(args) == 1
    captured = capsys.readouterr()
    assert ("\nentry                   runs   exit 0   exit 1    mean   ensemble   params up t0   "
            "params up t1\n" + "─" * 95 + "\nreefl   1/2 (failed: seed 1)    60.00    70.00   65.00"
            "      70.00            100            200\n") in captured.out
    assert "(seeds 0, 1: at most one finished run per entry, so no spread)" in captured.out
    assert "1 run(s) failed: reefl seed 1" in captured.err
    monkeypatch.setattr(simulation, "run_app", FakeRunApp())
    assert cli_main([*args[:4], "0", "--output-dir", str(tmp_path / "again"), *args[7:]]) == 0
    assert cli_main(["compare", "-m", "reefl[seed=2]", "-o", str(tmp_path)]) == 2
    assert "'seed' is set by compare" in capsys.readouterr().err
