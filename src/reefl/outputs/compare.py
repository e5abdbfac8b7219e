"""``reefl compare``'s reports: per entry the mean and spread over seeds of every exit's
accuracy, the per-tier costs, as a terminal table, comparison.md, comparison.json and
comparison.png (accuracy per exit, one line per entry, error bars = sample standard deviation
over seeds where more than one finished). The runs themselves are ``launch.comparison``'s.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reefl.outputs.tables import Table

RUNS_SUBDIR = "runs"  # the run folders of a comparison: <DIR>/runs/<entry>-s<seed>
STD_KIND = "sample standard deviation (n - 1) over seeds"


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: its label, method, and own overrides (a k=v string)."""

    label: str
    method: str
    overrides: str = ""
    slug: str = ""  # folder-safe form of the label, unique among the entries

    def run_name(self, seed: int) -> str:
        return f"{self.slug or self.label}-s{seed}"



@dataclass
class RunResult:
    """One entry × seed: its run folder, final.json (None if failed), error, seconds."""

    entry: Entry
    seed: int
    run_dir: Path | None = None
    final: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    reused: bool = False
    config: dict[str, Any] | None = None  # the resolved config (for tier costs of a failure)

    @property
    def ok(self) -> bool:
        return self.final is not None


@dataclass
class Comparison:
    """Everything ``compare`` did, as needed by the reports."""

    entries: list[Entry]
    seeds: list[int]
    output_dir: Path
    common: list[str] = field(default_factory=list)
    results: dict[str, dict[int, RunResult]] = field(default_factory=dict)
    _costs: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def tier_costs(self, label: str) -> list[dict[str, Any]] | None:
        """``entry_tier_costs`` of an entry, remembered once found."""
        if label not in self._costs:
            costs = entry_tier_costs(self.results.get(label, {}))
            if costs is None:
                return None
            self._costs[label] = costs
        return self._costs[label]

    @property
    def failed(self) -> list[RunResult]:
        return [r for by_seed in self.results.values() for r in by_seed.values() if r.error]


# -- summary --------------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean and sample standard deviation (None for fewer than two values) of values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        values = [float(v) for v in values if v is not None and not _is_nan(v)]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def cell(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def entry_summary(results: dict[int, RunResult]) -> dict[str, Any]:
    """Exit accuracies, their mean and the ensemble, as Stat over the successful seeds."""
    finals = [r.final for r in results.values() if r.final is not None]
    num_exits = max((len(f.get("exit_accuracy", [])) for f in finals), default=0)
    exits = [Stat.of([f["exit_accuracy"][k] for f in finals
                      if len(f.get("exit_accuracy", [])) > k]) for k in range(num_exits)]
    return {
        "exit_accuracy": exits,
        "mean_accuracy": Stat.of([f.get("mean_accuracy") for f in finals]),
        "ensemble_accuracy": Stat.of([f.get("ensemble_accuracy") for f in finals]),
        "ok": len(finals),
        "failed": sorted(s for s, r in results.items() if r.error),
    }


def entry_tier_costs(results: dict[int, RunResult]) -> list[dict[str, Any]] | None:
    """Per-tier costs of an entry: a run folder's accounting.json, else computed from its
    config.json (or, for a failed run, from the config it was given)."""
    from reefl.outputs.accounting import costs_from_config, read_accounting

    ordered = sorted(results.values(), key=lambda r: (not r.ok, r.seed))
    for result in ordered:
        if result.run_dir is not None:
            try:
                costs = read_accounting(result.run_dir)
            except (OSError, ValueError):
                costs = None
            if costs:
                return costs
    for result in ordered:
        configs = []
        if result.run_dir is not None and (result.run_dir / "config.json").is_file():
            try:
                configs.append(json.loads((result.run_dir / "config.json").read_text()))
            except (OSError, ValueError):
                pass
        if result.config is not None:
            configs.append(result.config)
        for config in configs:
            try:
                return costs_from_config(config)
            except Exception:  # costs are informative: never lose the table over them
                continue
    return None


def _runs_cell(summary: dict[str, Any], total: int) -> str:
    if summary["ok"] == 0:
        return "failed"
    if summary["failed"]:
        seeds = ", ".join(str(s) for s in summary["failed"])
        return f"{summary['ok']}/{total} (failed: seed {seeds})"
    return str(summary["ok"])


def format_params(n: int | None) -> str:
    from reefl.outputs.accounting import human

    return "" if n is None else human(n)


def comparison_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table (strings), one row per entry."""
    summaries = {e.label: entry_summary(comparison.results.get(e.label, {}))
                 for e in comparison.entries}
    costs = {e.label: comparison.tier_costs(e.label) for e in comparison.entries}
    num_exits = max((len(s["exit_accuracy"]) for s in summaries.values()), default=0)
    num_tiers = max((len(c or []) for c in costs.values()), default=0)
    header = (["entry", "runs"] + [f"exit {k}" for k in range(num_exits)]
              + ["mean", "ensemble"] + [f"params up t{t}" for t in range(num_tiers)])
    rows = []
    for entry in comparison.entries:
        summary = summaries[entry.label]
        started = len(comparison.results.get(entry.label, {}))
        if summary["ok"] == 0:
            cells = ["—"] * (num_exits + 2)
        else:
            stats = summary["exit_accuracy"] + [None] * (num_exits - len(summary["exit_accuracy"]))
            stats += [summary["mean_accuracy"], summary["ensemble_accuracy"]]
            cells = [s.cell() if s is not None else "" for s in stats]
        tiers = costs[entry.label] or []
        params = [format_params(c.get("params_up")) for c in tiers]
        params += [""] * (num_tiers - len(params))
        runs = _runs_cell(summary, started) if started else "not run"
        rows.append([entry.label, runs, *cells, *params])
    return header, rows


def comparison_table(comparison: Comparison) -> Table:
    """``comparison_rows`` as a table: the entry's label left, every other column right."""
    from reefl.outputs.tables import table

    header, rows = comparison_rows(comparison)
    return table(header, rows)


def seeds_text(seeds: Sequence[int]) -> str:
    """``seed 0`` or ``seeds 0, 1, 2``."""
    listed = ", ".join(str(s) for s in seeds)
    return f"seed {listed}" if len(seeds) == 1 else f"seeds {listed}"


def has_spread(comparison: Comparison) -> bool:
    """Whether some entry has more than one finished seed (so a std is shown)."""
    return any(entry_summary(comparison.results.get(e.label, {}))["ok"] > 1
               for e in comparison.entries)


def spread_words(comparison: Comparison) -> str:
    """What a cell of the table (a point of the plot) is over the seeds, in words: the
    one run's value, or the mean ± the sample std where more than one seed finished."""
    seeds = seeds_text(comparison.seeds)
    if len(comparison.seeds) == 1:
        return f"{seeds}: one run per entry, so no spread"
    if not has_spread(comparison):
        return f"{seeds}: at most one finished run per entry, so no spread"
    return f"{seeds}: mean ± {STD_KIND} where more than one seed finished"


def comparison_legend(comparison: Comparison) -> str:
    """The text under the table in comparison.md (plain, `code` marked with backticks)."""
    legend = [
        f"Test accuracy % at every exit, their mean, and the ensemble of the exits, from each "
        f"run's final.json ({spread_words(comparison)}). Blank: not reported (or no such "
        "exit); —: no finished run. `params up tK`: parameters a tier-K client sends back "
        "each round (from accounting.json, or computed from the run's config). `runs`: seeds "
        "that finished.",
    ]
    if comparison.common:
        legend.append(f"Common run config: `{' '.join(comparison.common)}`.")
    return "\n".join(legend)


def format_markdown(comparison: Comparison) -> str:
    """The comparison table in Markdown, with its legend (comparison.md)."""
    from reefl.outputs.tables import markdown

    return f"{markdown(comparison_table(comparison))}\n\n{comparison_legend(comparison)}\n"


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    """``{label: {method, overrides, per_seed, failed, run_dirs, summary, tier_costs}}``."""
    data: dict[str, Any] = {}
    for entry in comparison.entries:
        results = comparison.results.get(entry.label, {})
        summary = entry_summary(results)
        data[entry.label] = {
            "method": entry.method,
            "overrides": entry.overrides,
            "common_overrides": comparison.common,
            "per_seed": {str(s): r.final for s, r in results.items() if r.final is not None},
            "failed": {str(s): r.error for s, r in results.items() if r.error},
            "run_dirs": {str(s): str(r.run_dir) for s, r in results.items() if r.run_dir},
            "summary": {
                "exit_accuracy": [s.to_json() if s else None for s in summary["exit_accuracy"]],
                "mean_accuracy": _stat_json(summary["mean_accuracy"]),
                "ensemble_accuracy": _stat_json(summary["ensemble_accuracy"]),
                "std": STD_KIND,
            },
            "tier_costs": comparison.tier_costs(entry.label),
        }
    return data


def _stat_json(stat: Stat | None) -> dict[str, Any] | None:
    return stat.to_json() if stat is not None else None


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """Accuracy per exit, one line per entry (PNG, Agg): the mean over its finished seeds,
    error bars the sample std where more than one finished; the title says which."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    num_exits = 0
    count = len(comparison.entries)
    for index, entry in enumerate(comparison.entries):
        dodge = (index - (count - 1) / 2) * min(0.05, 0.3 / max(count, 1))  # bars apart
        stats = entry_summary(comparison.results.get(entry.label, {}))["exit_accuracy"]
        points = [(k, s) for k, s in enumerate(stats) if s is not None]
        if not points:
            continue
        num_exits = max(num_exits, len(stats))
        xs = [k + dodge for k, _ in points]
        ys = [s.mean for _, s in points]
        errors = [s.std or 0.0 for _, s in points]
        n = max(s.n for _, s in points)
        label = entry.label if n == len(comparison.seeds) else f"{entry.label} (n={n})"
        axes.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3,
                      label=label)
    axes.set_xlabel("exit")
    axes.set_ylabel("test accuracy %")
    axes.set_xticks(range(num_exits))
    axes.grid(alpha=0.3)
    axes.set_title(plot_title(comparison))
    if num_exits:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_title(comparison: Comparison) -> str:
    """``plot_comparison``'s title: the seeds, and what the error bars are when any are
    drawn (some entry with more than one finished seed)."""
    seeds = seeds_text(comparison.seeds)
    if not has_spread(comparison):
        return f"test accuracy per exit ({seeds})"
    return f"test accuracy per exit, mean over {seeds} (error bars: sample std)"


def write_reports(comparison: Comparison, plot: bool = True) -> str:
    """Write comparison.md, comparison.json and (with ``plot``) comparison.png; return the
    Markdown table."""
    directory = comparison.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    table = format_markdown(comparison)
    (directory / "comparison.md").write_text(table)
    (directory / "comparison.json").write_text(
        json.dumps(comparison_json(comparison), indent=2) + "\n"
    )
    if plot:
        plot_comparison(comparison, directory / "comparison.png")
    return table
