"""``reefl compare``: run several methods (and ablations) × seeds, then one table and plot.

Every row of the table is an *entry*: a method name, optionally with its own run-config
overrides in brackets, e.g. ``reefl``, ``reefl[modulation=false]``,
``reefl[distillation="none" kd-rounds=100]``. The whole text is the entry's label; its method
is the name before the bracket, unless the brackets set ``method=...`` (so
``noMod[method="reefl" modulation=false]`` is the row "noMod"). Inside the brackets the syntax is
``--run-config``'s (``k=v`` separated by spaces; commas between pairs are accepted too).

Each entry × seed is one ``reefl.launcher.run_app`` call with the overrides, in order (later
wins): the common ``--run-config``, the entry's bracket overrides, then
``method=... seed=... output-dir="<DIR>/runs" run-name="<entry>-s<seed>"``. Every row therefore
shares data, partition, tiers and client sampling for a given seed. Runs go seed by seed (all
entries for the first seed, then the next seed), so an interrupted comparison still has a
complete one-seed table. All runs' configs are checked before the first one starts.

Outputs in ``DIR``: ``comparison.md`` (the table), ``comparison.json`` (per entry: overrides,
every seed's final.json, the per-tier costs) and ``comparison.png`` (accuracy per exit, one line
per entry, error bars = sample standard deviation over seeds where more than one finished).
They are rewritten after every run.
A failed run is recorded and the others go on; ``compare`` reports it and the CLI exits 1.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reefl import launcher
from reefl.launcher import LaunchError, RunConfigError, RunFailed

if TYPE_CHECKING:
    from reefl.outputs.progress import LogView
    from reefl.outputs.tables import Table

RUNS_SUBDIR = "runs"
STD_KIND = "sample standard deviation (n - 1) over seeds"
# Keys that compare itself sets for every run.
SET_BY_COMPARE = {"method": "--methods", "seed": "--seeds", "output-dir": "--output-dir",
                  "run-name": "--output-dir (run folders are <DIR>/runs/<entry>-s<seed>)"}
_NAME = re.compile(r"[^\s\[\]\"',=]+")

ENTRY_SYNTAX_HELP = (
    "comma-separated entries, one table row each: a method name, optionally followed by "
    "run-config overrides in brackets for an ablation, e.g. "
    "'reefl,reefl[modulation=false],reefl[distillation=\"none\" kd-rounds=100]'. The whole "
    "text of an entry is its label; the method is the name before '[' unless the brackets "
    "set method=\"...\" (e.g. 'no-mod[method=\"reefl\" modulation=false]'). Inside brackets: "
    "k=v pairs as in --run-config, separated by spaces or commas; strings in double quotes"
)


# -- entries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: its label, method, and own overrides (a k=v string)."""

    label: str
    method: str
    overrides: str = ""
    slug: str = ""  # folder-safe form of the label, unique among the entries

    def run_name(self, seed: int) -> str:
        return f"{self.slug or self.label}-s{seed}"


def _split_top_level(text: str, what: str, early_close: str = "") -> list[str]:
    """``text`` split at commas outside brackets and quotes; a ']' with no '[' raises
    ``early_close`` (default: an "unmatched ']'" message)."""
    parts, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise RunConfigError(early_close or f"{what}: unmatched ']' in '{text}'")
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote:
        raise RunConfigError(f"{what}: unclosed {quote} in '{text}'")
    if depth:
        raise RunConfigError(f"{what}: unclosed '[' in '{text}'")
    parts.append("".join(current))
    return parts


def parse_entries(spec: str | Sequence[str]) -> list[Entry]:
    """Parse ``--methods`` (one string, or several that are joined with commas).

    Raises RunConfigError (one line) for an empty entry, unbalanced brackets or quotes, text
    after ``]``, a bracket item that is not ``key=value``, a key compare sets itself (seed,
    output-dir, run-name), or a label given twice.
    """
    text = spec if isinstance(spec, str) else ",".join(spec)
    entries: list[Entry] = []
    for raw in _split_top_level(text, "--methods"):
        piece = raw.strip()
        what = f"--methods entry '{piece}'"
        if not piece:
            raise RunConfigError(f"--methods has an empty entry in '{text}'")
        name, bracket, rest = piece.partition("[")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise RunConfigError(
                f"{what}: needs a name (letters, digits, - _ .) before any '['"
            )
        inner = ""
        if bracket:
            if not rest.endswith("]"):
                raise RunConfigError(f"{what}: nothing may follow the closing ']'")
            pairs = _split_top_level(rest[:-1], what,
                                     early_close=f"{what}: nothing may follow the closing ']'")
            inner = " ".join(p.strip() for p in pairs if p.strip())
        values = launcher.parse_pairs(inner, what)
        for key in values:
            if key in SET_BY_COMPARE and key != "method":
                raise RunConfigError(f"{what}: '{key}' is set by compare; use "
                                     f"{SET_BY_COMPARE[key]}")
        method = values.get("method", name)
        if not isinstance(method, str) or not method:
            raise RunConfigError(f"{what}: method must be a non-empty string")
        if any(e.label == piece for e in entries):
            raise RunConfigError(f"--methods: entry '{piece}' is given twice")
        entries.append(Entry(piece, method, inner))
    return _with_slugs(entries)


def _with_slugs(entries: list[Entry]) -> list[Entry]:
    out: list[Entry] = []
    taken: set[str] = set()
    for entry in entries:
        base = re.sub(r"[^A-Za-z0-9._+-]+", "-", entry.label).strip("-.") or "entry"
        slug, k = base, 1
        while slug in taken:
            k += 1
            slug = f"{base}-{k}"
        taken.add(slug)
        out.append(Entry(entry.label, entry.method, entry.overrides, slug))
    return out


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; raises RunConfigError for a non-integer or a repeat."""
    if isinstance(spec, str):
        try:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise RunConfigError(f"--seeds must be comma-separated integers; got '{spec}'"
                                 ) from None
    else:
        seeds = [int(s) for s in spec]
    if not seeds:
        raise RunConfigError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise RunConfigError(f"--seeds repeats a seed: {spec}")
    return seeds


# -- overrides ------------------------------------------------------------------------------


def pairs_string(values: dict[str, Any]) -> str:
    """A dict as one ``k=v k2=v2`` string that ``flwr run --run-config`` parses back."""
    return " ".join(f"{k}={launcher.toml_value(v)}" for k, v in values.items())


def common_overrides(run_config: Sequence[str]) -> list[str]:
    """The user's ``--run-config`` items (k=v strings and TOML files, in order: later wins),
    checked: RunConfigError for a bad item or a key that compare sets itself."""
    items = [item for item in run_config if item]
    for key in launcher.parse_overrides(items):
        if key in SET_BY_COMPARE:
            raise RunConfigError(f"--run-config sets '{key}', which compare sets; use "
                                 f"{SET_BY_COMPARE[key]}")
    return items


def run_overrides(common: Sequence[str], entry: Entry, seed: int, runs_dir: Path) -> list[str]:
    """What ``run_app`` gets for one run: common, the entry's own, then compare's keys."""
    last = pairs_string({"method": entry.method, "seed": seed, "output-dir": str(runs_dir),
                         "run-name": entry.run_name(seed)})
    return [*common, *([entry.overrides] if entry.overrides else []), last]


# -- runs -----------------------------------------------------------------------------------


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


def existing_run(prepared: launcher.PreparedRun, resume: bool) -> str | None:
    """What to do with the run's folder: None if it holds nothing yet (start the run);
    with ``resume``, "reuse" if it holds a final.json of this very config (its
    ``config_digest``), "resume" if it holds a checkpoint of it. Any other folder that
    holds something is a RunConfigError naming it: the ServerApp would refuse to run there."""
    run_dir = prepared.run_dir
    if not launcher.holds_files(run_dir):
        return None
    if not resume:
        raise RunConfigError(f"run folder {run_dir} already holds a run; pass --resume to reuse "
                             "finished runs of the same config and continue interrupted ones, "
                             "or choose another --output-dir")
    if launcher.finished_final(run_dir, prepared.digest) is not None:
        return "reuse"
    if launcher.can_resume(run_dir, prepared.digest):
        return "resume"
    raise RunConfigError(f"run folder {run_dir} holds neither a finished run of this config nor "
                         "a checkpoint of it to continue; remove it or choose another "
                         "--output-dir")


def _say(out: Callable[[str], None], message: str) -> None:
    out(f"reefl compare: {message}")


def run_view(tag: str, verbose: bool) -> LogView:
    """What ``compare`` shows of one run's Flower log (all of which goes to the run's
    flower.log): every line with ``verbose``, else a progress line after the run's ``tag``
    that gives way to compare's own "done" line once the run ends."""
    from reefl.outputs.progress import ProgressView, StreamView

    if verbose:
        return StreamView()
    return ProgressView(prefix=f"reefl compare: {tag} · ", transient=True)


def _accuracy_note(final: dict[str, Any]) -> str:
    parts = []
    if final.get("mean_accuracy") is not None:
        parts.append(f"mean {final['mean_accuracy']:.2f}%")
    if final.get("ensemble_accuracy") is not None:
        parts.append(f"ensemble {final['ensemble_accuracy']:.2f}%")
    return ", ".join(parts) or "no accuracy in final.json"


def compare(
    entries: Sequence[Entry],
    seeds: Sequence[int],
    output_dir: Path | str,
    run_config: Sequence[str] = (),
    federation_config: Sequence[str] = (),
    app_dir: Path | str | None = None,
    resume: bool = False,
    out: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> Comparison:
    """Run every entry × seed (seed by seed) with ``launcher.run_app``; write the reports.
    While a run goes on, its progress line is shown (``run_view``), or with ``verbose`` its
    Flower log.

    Checks every run's config before starting any (RunConfigError). A run that fails
    (``LaunchError``, including ``RunFailed``) is recorded and the others go on. On Ctrl-C the
    reports of the finished runs are written, then KeyboardInterrupt propagates. With
    ``resume``, a run folder that already holds a finished run of the same config is reused
    and one with a checkpoint of it is continued (``existing_run``); without it, a run
    folder that already holds something is a RunConfigError.
    """
    out = out or (lambda line: print(line, flush=True))
    output_dir = Path(output_dir).expanduser().resolve()
    runs_dir = output_dir / RUNS_SUBDIR
    common = common_overrides(run_config)
    comparison = Comparison(list(entries), list(seeds), output_dir, common,
                            {e.label: {} for e in entries})
    plan: list[tuple[Entry, int, list[str], launcher.PreparedRun, str | None]] = []
    for seed in seeds:
        for entry in entries:
            overrides = run_overrides(common, entry, seed, runs_dir)
            try:
                prepared = launcher.prepare_run(overrides, app_dir, federation_config,
                                                existing_ok=True)
                action = existing_run(prepared, resume)
            except RunConfigError as err:
                raise RunConfigError(f"{entry.label} (seed {seed}): {err}") from None
            plan.append((entry, seed, overrides, prepared, action))
    output_dir.mkdir(parents=True, exist_ok=True)
    _say(out, f"{len(plan)} runs ({len(entries)} entries × {len(seeds)} seeds) into {runs_dir}")
    try:
        for index, (entry, seed, overrides, prepared, action) in enumerate(plan, 1):
            tag = f"[{index}/{len(plan)}] {entry.label} · seed {seed}"
            result = RunResult(entry, seed, prepared.run_dir, config=prepared.config)
            comparison.results[entry.label][seed] = result
            if action == "reuse":
                result.final = json.loads((prepared.run_dir / "final.json").read_text())
                result.reused = True
                result.seconds = float(result.final.get("wall_seconds", 0.0))
                _say(out, f"{tag} · reused {prepared.run_dir} · {_accuracy_note(result.final)}")
                continue
            resumed = action == "resume"
            _say(out, f"{tag} · {'resumed' if resumed else 'started'} ({prepared.run_dir})")
            started = time.monotonic()
            try:
                run_dir = launcher.run_app([] if resumed else overrides, app_dir=app_dir,
                                           federation_overrides=federation_config, quiet=True,
                                           resume=prepared.run_dir if resumed else None,
                                           view=run_view(tag, verbose))
                result.run_dir = Path(run_dir)
                result.final = json.loads((result.run_dir / "final.json").read_text())
            except RunFailed as err:
                result.error, result.run_dir = str(err), err.run_dir
            except LaunchError as err:
                result.error = str(err)
            except Exception as err:  # e.g. an unreadable final.json: keep the other runs
                result.error = f"{type(err).__name__}: {err}"
            result.seconds = time.monotonic() - started
            if result.ok:
                assert result.final is not None
                _say(out, f"{tag} · done in {result.seconds:.0f} s · "
                          f"{_accuracy_note(result.final)}")
            else:
                _say(out, f"{tag} · FAILED after {result.seconds:.0f} s: {result.error}")
            write_reports(comparison)
    except KeyboardInterrupt:
        for by_seed in comparison.results.values():
            for result in by_seed.values():
                if not result.ok and result.error is None:
                    result.error = "interrupted"
        write_reports(comparison)
        raise
    if not plan or result.reused:  # the last run wrote no report
        write_reports(comparison)
    return comparison


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


def main_compare(methods: str | Sequence[str], seeds: str, output_dir: Path | str,
                 run_config: Sequence[str] = (), federation_config: Sequence[str] = (),
                 app_dir: Path | str | None = None, resume: bool = False,
                 verbose: bool = False) -> int:
    """``reefl compare``: run (``verbose``: streaming every run's Flower log), print the
    table; 0 if every run finished, 1 otherwise. Raises RunConfigError for bad arguments
    (before anything runs)."""
    from reefl.outputs.tables import print_table

    entries = parse_entries(methods)
    comparison = compare(entries, parse_seeds(seeds), output_dir, run_config,
                         federation_config, app_dir, resume, verbose=verbose)
    print(flush=True)
    print_table(comparison_table(comparison))
    print("\n" + comparison_legend(comparison).replace("`", ""), flush=True)
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        print(f"reefl compare: wrote {comparison.output_dir / name}", flush=True)
    failed = comparison.failed
    if failed:
        listed = ", ".join(f"{r.entry.label} seed {r.seed}" for r in failed)
        print(f"reefl compare: {len(failed)} run(s) failed: {listed}", file=sys.stderr,
              flush=True)
        return 1
    return 0
