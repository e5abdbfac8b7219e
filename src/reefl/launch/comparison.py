"""``reefl compare``: run several methods (and ablations) × seeds; the reports are
``outputs.compare``'s.

Every row of the table is an *entry*: a method name, optionally with its own run-config
overrides in brackets, e.g. ``reefl``, ``reefl[modulation=false]``,
``reefl[distillation="none" kd-rounds=100]``. The whole text is the entry's label; its method
is the name before the bracket, unless the brackets set ``method=...`` (so
``noMod[method="reefl" modulation=false]`` is the row "noMod"). Inside the brackets the syntax is
``--run-config``'s (``k=v`` separated by spaces; commas between pairs are accepted too).

Each entry × seed is one ``launch.simulation.run_app`` call with the overrides, in order (later
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
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reefl.launch import simulation
from reefl.launch.errors import LaunchError, RunConfigError, RunFailed
from reefl.launch.run_config import (
    PreparedRun,
    can_resume,
    finished_final,
    parse_overrides,
    parse_pairs,
    prepare_run,
    toml_value,
)
from reefl.outputs.compare import (
    RUNS_SUBDIR,
    Comparison,
    Entry,
    RunResult,
    comparison_legend,
    comparison_table,
    write_reports,
)
from reefl.outputs.run_folder import holds_run_files
from reefl.outputs.tables import plural

if TYPE_CHECKING:
    from reefl.outputs.progress import LogView

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
        values = parse_pairs(inner, what)
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
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def common_overrides(run_config: Sequence[str]) -> list[str]:
    """The user's ``--run-config`` items (k=v strings and TOML files, in order: later wins),
    checked: RunConfigError for a bad item or a key that compare sets itself."""
    items = [item for item in run_config if item]
    for key in parse_overrides(items):
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


def existing_run(prepared: PreparedRun, resume: bool) -> str | None:
    """What to do with the run's folder: None if it holds nothing yet (start the run);
    with ``resume``, "reuse" if it holds a final.json of this very config (its
    ``config_digest``), "resume" if it holds a checkpoint of it. Any other folder that
    holds something is a RunConfigError naming it: the ServerApp would refuse to run there."""
    run_dir = prepared.run_dir
    if not holds_run_files(run_dir):
        return None
    if not resume:
        raise RunConfigError(f"run folder {run_dir} already holds a run; pass --resume to reuse "
                             "finished runs of the same config and continue interrupted ones, "
                             "or choose another --output-dir")
    if finished_final(run_dir, prepared.digests) is not None:
        return "reuse"
    if can_resume(run_dir, prepared.digests):
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
    """Run every entry × seed (seed by seed) with ``simulation.run_app``; write the reports.
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
    plan: list[tuple[Entry, int, list[str], PreparedRun, str | None]] = []
    for seed in seeds:
        for entry in entries:
            overrides = run_overrides(common, entry, seed, runs_dir)
            try:
                prepared = prepare_run(overrides, app_dir, federation_config,
                                                existing_ok=True)
                action = existing_run(prepared, resume)
            except RunConfigError as err:
                raise RunConfigError(f"{entry.label} (seed {seed}): {err}") from None
            plan.append((entry, seed, overrides, prepared, action))
    output_dir.mkdir(parents=True, exist_ok=True)
    _say(out, f"{plural(len(plan), 'run')} ({plural(len(entries), 'entry', 'entries')} × "
              f"{plural(len(seeds), 'seed')}) into {runs_dir}")
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
                run_dir = simulation.run_app([] if resumed else overrides, app_dir=app_dir,
                                           federation_overrides=federation_config, quiet=True,
                                           table=False,
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
