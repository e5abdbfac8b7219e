"""``reefl report``: one self-contained HTML page, with its plots as PNGs, for a run folder or
a comparison folder.

A **run folder** (``metrics.jsonl``, usually with ``final.json``, ``config.json`` and
``accounting.json``) gives the test accuracy of every exit over the rounds, the final per-exit
table, the per-tier cost table and the run config; when present, also the calibrated
accuracy-vs-FLOPs curve with the tiers' operating points (``calibration.json``) and the
personalised accuracies (``personalised.json``). A **comparison folder** (``comparison.json``,
written by ``reefl compare``) gives the comparison table, the accuracy per exit of every
entry, their per-round curves (mean over seeds), every entry's costs and, when present,
``accuracy_vs_flops.png``.

Everything goes into ``<folder>/report/``: the PNGs and ``index.html``, which carries the same
PNGs as base64 ``data:`` URIs, so the page works when copied alone (no network, no JavaScript
library). One inline script counts the images that loaded into
``<body data-images-loaded="N/M">``, for a browser check to read.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reefl.anytime.calibrate import (
    CALIBRATION_FILE,
    CURVE_PNG,
    DEFAULT_TOLERANCE,
    operating_points_table,
    plot_curves,
)
from reefl.outputs.accounting import (
    ACCOUNTING_FILE,
    FLOPS_NOTE,
    human,
    read_accounting,
    tier_table,
)
from reefl.outputs.compare import (
    RUNS_SUBDIR,
    Comparison,
    Entry,
    RunResult,
    comparison_legend,
    comparison_table,
    has_spread,
    plot_comparison,
)
from reefl.outputs.run_folder import final_table, final_title
from reefl.outputs.tables import Table, plural

if TYPE_CHECKING:
    from matplotlib.axes import Axes

REPORT_SUBDIR = "report"
PAGE_FILE = "index.html"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
CONFIG_FILE = "config.json"
PERSONALISED_FILE = "personalised.json"
COMPARISON_FILE = "comparison.json"

IMAGE_COUNT_SCRIPT = """<script>
// Browser checks read <body data-images-loaded="N/M">: N of the M images decoded.
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0);
  document.body.dataset.imagesLoaded = `${loaded.length}/${images.length}`;
});
</script>"""

STYLE = """<style>
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right;
         white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th.left, td.left { text-align: left; }
tr.section-end td { border-bottom: 2px solid #666; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; height: auto; }
.note { color: #555; font-size: 0.9em; }
</style>"""


COSTS_NOTE = ("Per round, for a client of each tier: parameters sent up and down, MB up "
              f"(payload only), its share of the full model, and {FLOPS_NOTE}.")


class ReportError(Exception):
    """A folder that cannot be reported, or an unreadable file in it (one line)."""


# -- reading --------------------------------------------------------------------------------


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, None when there is no such file (most inputs are optional);
    ReportError naming the file when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from None


def file_section(path: Path, render: Callable[[Any], str]) -> str:
    """``render`` applied to the JSON in ``path`` (None without the file); ReportError naming
    the file when it lacks what the section reads (a hand-edited or foreign file)."""
    data = read_json(path)
    try:
        return render(data)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ReportError(f"{path} does not hold what reefl writes there "
                          f"({type(err).__name__}: {err})") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per round (none when the file is missing)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise ReportError(f"{path} holds a line that is not JSON: {err}") from None


def folder_kind(folder: Path) -> str:
    """"comparison" (it holds comparison.json) or "run" (metrics.jsonl or final.json);
    ReportError, naming the folder and what it lacks, for anything else."""
    if (folder / COMPARISON_FILE).is_file():
        return "comparison"
    if (folder / METRICS_FILE).is_file() or (folder / FINAL_FILE).is_file():
        return "run"
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    raise ReportError(f"{folder} is neither a run folder (no {METRICS_FILE} or {FINAL_FILE}) "
                      f"nor a comparison folder (no {COMPARISON_FILE})")


def _located_run_dir(folder: Path, recorded: str | None) -> Path | None:
    """A run folder that comparison.json names: where it was written, else under
    ``folder/runs`` (the comparison folder was moved), else None."""
    if recorded is None:
        return None
    path = Path(recorded)
    if path.is_dir():
        return path
    moved = folder / RUNS_SUBDIR / path.name
    return moved if moved.is_dir() else None


def load_comparison(folder: Path) -> Comparison:
    """The ``Comparison`` that ``reefl compare`` recorded in ``folder/comparison.json``: its
    entries in order, every seed's final.json, failure and run folder, the common overrides
    and the tier costs, so that compare's own table and plot can be drawn again."""
    data = read_json(folder / COMPARISON_FILE)
    if not isinstance(data, dict):
        raise ReportError(f"{folder / COMPARISON_FILE} is not a comparison (a JSON object of "
                          "entries)")
    entries = [Entry(label, record.get("method", label), record.get("overrides", ""))
               for label, record in data.items()]
    seeds = list(dict.fromkeys(
        int(seed) for record in data.values()
        for part in ("per_seed", "failed", "run_dirs") for seed in record.get(part, {})))
    results: dict[str, dict[int, RunResult]] = {}
    for entry in entries:
        record = data[entry.label]
        per_seed, failed, run_dirs = (record.get(part, {})
                                      for part in ("per_seed", "failed", "run_dirs"))
        results[entry.label] = {
            seed: RunResult(entry, seed, _located_run_dir(folder, run_dirs.get(str(seed))),
                            per_seed.get(str(seed)), failed.get(str(seed)))
            for seed in seeds if str(seed) in per_seed or str(seed) in failed}
    common = next((record.get("common_overrides", []) for record in data.values()), [])
    recorded_costs = {label: record["tier_costs"] for label, record in data.items()
                      if record.get("tier_costs")}
    return Comparison(entries, seeds, folder, common, results, _costs=recorded_costs)


# -- plots ----------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` (PNG, laid out to fit its labels); return ``path``."""
    figure.tight_layout()
    figure.savefig(path)
    return path


def exit_label(k: int, exit_blocks: Sequence[int] | None) -> str:
    """``exit 2 (block 5)``, or ``exit 2`` when the exits' blocks are not known."""
    if exit_blocks is not None and k < len(exit_blocks):
        return f"exit {k} (block {exit_blocks[k]})"
    return f"exit {k}"


def evaluated(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds of ``records`` that evaluated the exits (their test accuracies)."""
    return [r for r in records if r.get("exit_accuracy")]


def plot_round_curves(records: Sequence[dict[str, Any]], exit_blocks: Sequence[int] | None,
                      path: Path) -> Path:
    """Test accuracy of every exit, their mean and their ensemble, at every evaluated round
    of one run (PNG)."""
    rounds = evaluated(records)
    xs = [r["round"] for r in rounds]
    figure = _new_figure(7, 4.5)
    axes = figure.subplots()
    for k in range(max(len(r["exit_accuracy"]) for r in rounds)):
        points = [(r["round"], r["exit_accuracy"][k]) for r in rounds
                  if len(r["exit_accuracy"]) > k]
        axes.plot(*zip(*points, strict=True), marker="o", markersize=3,
                  label=exit_label(k, exit_blocks))
    for key, style, label in (("mean_accuracy", "--", "mean of the exits"),
                              ("ensemble_accuracy", ":", "ensemble of the exits")):
        points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, color="black", label=label)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy %")
    if len(xs) <= 12:
        axes.set_xticks(xs)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.set_title("test accuracy per exit after each evaluated round")
    axes.legend(fontsize="small", loc="lower right")
    return _save(figure, path)


def seed_mean_curve(runs: Sequence[Sequence[dict[str, Any]]], key: str, k: int | None = None
                    ) -> tuple[list[int], list[float]]:
    """Rounds and the mean over runs (seeds) of ``record[key]`` (``[k]`` of it when ``k`` is
    given) at each evaluated round, over the runs that reported it."""
    by_round: dict[int, list[float]] = {}
    for records in runs:
        for record in evaluated(records):
            value = record.get(key)
            if k is not None:
                value = value[k] if value is not None and len(value) > k else None
            if value is not None:
                by_round.setdefault(record["round"], []).append(float(value))
    rounds = sorted(by_round)
    return rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds]


def plot_entry_round_curves(runs_by_entry: dict[str, list[list[dict[str, Any]]]], path: Path
                            ) -> Path:
    """One panel per exit and one for the ensemble; in each, one line per entry: its test
    accuracy after each evaluated round, mean over its seeds (no spread drawn) (PNG)."""
    num_exits = max(len(r["exit_accuracy"]) for runs in runs_by_entry.values()
                    for records in runs for r in evaluated(records))
    panels: list[tuple[str, str, int | None]] = [
        ("exit_accuracy", f"exit {k}", k) for k in range(num_exits)]
    panels.append(("ensemble_accuracy", "ensemble of the exits", None))
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure = _new_figure(3.6 * columns, 3.0 * rows + 0.6)
    grid = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    axes_list: list[Axes] = [a for row in grid for a in row]
    for axes, (key, title, k) in zip(axes_list, panels, strict=False):
        for label, runs in runs_by_entry.items():
            rounds, means = seed_mean_curve(runs, key, k)
            if rounds:
                seeds = f" ({plural(len(runs), 'seed')})" if len(runs) > 1 else ""
                axes.plot(rounds, means, marker="o", markersize=2, label=label + seeds)
        axes.set_title(title, fontsize="medium")
        axes.grid(alpha=0.3)
    for axes in axes_list[len(panels):]:
        axes.set_visible(False)
    for axes in grid[-1]:
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row in grid:
        row[0].set_ylabel("test accuracy %")
    axes_list[0].legend(fontsize="x-small")
    figure.suptitle("test accuracy after each evaluated round (mean over seeds)")
    return _save(figure, path)


# -- HTML pieces ----------------------------------------------------------------------------


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table of strings (escaped): the first column left, the others right."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_html(t: Table) -> str:
    """One of reefl's tables (``reefl.outputs.tables.Table``) in HTML: its columns aligned as in
    the terminal, a heavier rule after each section; the title is not shown."""
    def cell(tag: str, text: str, k: int) -> str:
        left = ' class="left"' if k > 0 and t.align[k] == "l" else ""
        return f"<{tag}{left}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", h, k) for k, h in enumerate(t.header))
    body = "".join(
        ('<tr class="section-end">' if i in t.sections else "<tr>")
        + "".join(cell("td", c, k) for k, c in enumerate(row)) + "</tr>"
        for i, row in enumerate(t.rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_html(path: Path, alt: str) -> str:
    """``path`` (a PNG) as an <img> with the file inside it as a data: URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></p>'


def note(text: str) -> str:
    """A paragraph that explains what is shown above it (escaped)."""
    return f'<p class="note">{html.escape(text)}</p>'


def section(title: str, *parts: str) -> str:
    """An HTML section: a heading over ``parts`` (already HTML)."""
    return f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def page_html(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole page: the sections under a title, the style and the image-count script."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", STYLE, "</head><body>",
        f"<h1>{html.escape(title)}</h1>", note(subtitle), *sections,
        IMAGE_COUNT_SCRIPT, "</body></html>", ""])


# -- run folder -----------------------------------------------------------------------------


def round_curves_section(records: list[dict[str, Any]], exit_blocks: Sequence[int] | None,
                         out: Path) -> str:
    """The per-round accuracy curves ('' when no round was evaluated yet)."""
    if not evaluated(records):
        return ""
    path = plot_round_curves(records, exit_blocks, out / "accuracy_per_round.png")
    return section("Accuracy per round", image_html(path, "test accuracy per exit per round"),
                   note(f"Test accuracy % of every exit on the global test set at the "
                        f"{len(evaluated(records))} evaluated rounds of {len(records)}, from "
                        "metrics.jsonl; one run, so no spread is shown."))


def final_section(final: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    """The final per-exit table (``reefl run`` prints it as text), or a note that there
    is none."""
    if final is None:
        return section("Final accuracy", note(
            "No final.json: the run has not finished "
            f"({plural(len(records), 'round')} recorded)."))
    return section("Final accuracy", table_html(final_table(final)),
                   note("Test accuracy % and loss of every exit after the last round, "
                        "their mean, and the ensemble of the exits (final.json)."))


def costs_section(tiers: list[dict[str, Any]] | None) -> str:
    """The per-tier cost table of ``reefl costs`` ('' without accounting.json)."""
    if not tiers:
        return ""
    return section("Cost per tier", table_html(tier_table(tiers)), note(COSTS_NOTE))


def operating_rule(target: dict[str, Any] | None) -> str:
    """How calibrate chose each tier's operating point, from calibration.json's ``target``
    (``reefl.anytime.calibrate.operating_point``), in words."""
    target = target or {}
    if target.get("flops") is not None:
        return (f"the most accurate point within {human(target['flops'])} FLOPs per image on "
                "the validation split")
    if target.get("accuracy") is not None:
        return f"the cheapest point reaching {target['accuracy']}% on the validation split"
    return (f"the cheapest point within {target.get('tolerance', DEFAULT_TOLERANCE)} points of "
            "the best validation accuracy on the tier's curve")


def calibration_section(calibration: dict[str, Any] | None, out: Path) -> str:
    """The accuracy-vs-FLOPs curve and the tiers' operating points, drawn and printed as
    ``reefl calibrate`` does ('' without calibration.json)."""
    if calibration is None:
        return ""
    method = calibration.get("method", "this run")
    path = plot_curves(out / CURVE_PNG, {method: [calibration]})
    return section(
        "Accuracy vs compute (calibrated early exit)",
        image_html(path, "test accuracy against MFLOPs per image"),
        note(f"Confidence criterion {calibration['criterion']}: a sample leaves at its first "
             "exit whose confidence reaches the exit's threshold. Thresholds are set on the "
             f"{calibration['split']} split ({calibration.get('validation_examples', '?')} "
             "examples), accuracy and average FLOPs per image measured on the test set "
             f"({calibration.get('test_examples', '?')} examples); from calibration.json."),
        "<h3>Operating point of each tier</h3>",
        table_html(operating_points_table(calibration)),
        note(f"Each tier (a device that runs exits 0..t) uses "
             f"{operating_rule(calibration.get('target'))}. 'of deepest': its average FLOPs "
             "against its deepest exit's; thresholds: those of all its exits but the last "
             "('-': no sample leaves there)."))


def personalised_section(personalised: dict[str, Any] | None) -> str:
    """Global vs personalised accuracy per exit ('' without personalised.json)."""
    if personalised is None:
        return ""

    def spread(row: dict[str, Any], which: str) -> str:
        return f"{row[f'{which}_mean']:.2f} ± {row[f'{which}_std']:.2f}"

    header = ["exit", "clients", "global model %", "personalised %", "change (points)"]
    rows = [[str(r["exit"]), str(r["clients"]), spread(r, "global"),
             spread(r, "personalised"), f"{r['personalised_mean'] - r['global_mean']:+.2f}"]
            for r in personalised.get("exits", [])]
    return section("Personalised accuracy", html_table(header, rows), note(
        f"Accuracy % on each client's own local test split: the final global model, then the "
        f"client's copy after {personalised['epochs']} local epochs of fine-tuning; mean ± "
        "population standard deviation over the clients that answered "
        f"({personalised.get('clients_answered', '?')}; failed: "
        f"{personalised.get('clients_failed', 0)}); from personalised.json."))


def config_section(config: dict[str, Any] | None) -> str:
    """The run config (config.json), folded away ('' without it)."""
    if not config:
        return ""
    table = html_table(["key", "value"], [[k, v if isinstance(v, str) else json.dumps(v)]
                                          for k, v in config.items()])
    return section("Run config", f"<details><summary>config.json ({len(config)} keys)"
                                 f"</summary>{table}</details>")


def run_page(run_dir: Path, out: Path) -> tuple[str, str, list[str]]:
    """Title, subtitle and sections of a run folder's page; writes its PNGs into ``out``."""
    records = read_metrics(run_dir)
    final = read_json(run_dir / FINAL_FILE)
    config = read_json(run_dir / CONFIG_FILE) or {}
    try:
        tiers = read_accounting(run_dir)
    except ValueError as err:
        raise ReportError(f"{run_dir / ACCOUNTING_FILE} is not valid JSON: {err}") from None
    exit_blocks = (final or {}).get("exit_blocks") or (
        [t["exit_block"] for t in tiers] if tiers and "exit_block" in tiers[0] else None)
    if final is not None:
        subtitle = final_title(final)
    else:
        subtitle = (f"{config.get('method', '?')} · seed {config.get('seed', '?')} · "
                    f"{len(records)} of "
                    f"{plural(config.get('num-server-rounds', '?'), 'round')} so far")
    if config.get("dataset"):
        subtitle += f" · {config['dataset']}"
    sections = [
        round_curves_section(records, exit_blocks, out),
        final_section(final, records),
        file_section(run_dir / CALIBRATION_FILE, lambda data: calibration_section(data, out)),
        file_section(run_dir / PERSONALISED_FILE, personalised_section),
        costs_section(tiers),
        config_section(config),
    ]
    return f"reefl run {run_dir.name}", subtitle, [s for s in sections if s]


# -- comparison folder ----------------------------------------------------------------------


def comparison_table_section(comparison: Comparison) -> str:
    """compare's table, with the legend compare writes under it in comparison.md."""
    legend = comparison_legend(comparison).replace("`", "")
    return section("Comparison", table_html(comparison_table(comparison)), note(legend))


def comparison_round_curves_section(comparison: Comparison, out: Path) -> str:
    """Every entry's per-round curves, mean over its seeds ('' when no run folder with a
    metrics.jsonl is at hand)."""
    runs_by_entry: dict[str, list[list[dict[str, Any]]]] = {}
    for entry in comparison.entries:
        runs = [read_metrics(r.run_dir) for r in comparison.results.get(entry.label, {}).values()
                if r.ok and r.run_dir is not None]
        runs = [records for records in runs if evaluated(records)]
        if runs:
            runs_by_entry[entry.label] = runs
    if not runs_by_entry:
        return ""
    path = plot_entry_round_curves(runs_by_entry, out / "accuracy_per_round.png")
    return section("Accuracy per round", image_html(path, "test accuracy per round per entry"),
                   note("Test accuracy % after each evaluated round, from the runs' "
                        "metrics.jsonl: the mean over an entry's finished seeds, no spread "
                        "drawn."))


def comparison_flops_section(folder: Path, out: Path) -> str:
    """The comparison's accuracy-vs-FLOPs plot, when one was made ('' otherwise)."""
    source = folder / CURVE_PNG
    if not source.is_file():
        return ""
    path = Path(shutil.copyfile(source, out / CURVE_PNG))
    return section("Accuracy vs compute (calibrated early exit)",
                   image_html(path, "test accuracy against FLOPs per image, every entry"),
                   note(f"{CURVE_PNG} of the comparison folder."))


def comparison_costs_section(comparison: Comparison) -> str:
    """One cost table per distinct set of tier costs, naming the entries that share it."""
    by_costs: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for entry in comparison.entries:
        tiers = comparison.tier_costs(entry.label)
        if tiers:
            key = json.dumps(tiers, sort_keys=True)
            by_costs.setdefault(key, ([], tiers))[0].append(entry.label)
    parts = [f"<h3>{html.escape(', '.join(labels))}</h3>" + table_html(tier_table(t))
             for labels, t in by_costs.values()]
    if not parts:
        return ""
    return section("Cost per tier", *parts, note(COSTS_NOTE))


def per_exit_plot_note(comparison: Comparison) -> str:
    """What the per-exit plot of a comparison shows: error bars named only when drawn."""
    if not has_spread(comparison):
        return ("Final test accuracy % per exit of every entry: one finished run each, so no "
                "error bars.")
    return ("Final test accuracy % per exit: mean over the finished seeds; error bars: sample "
            "standard deviation over seeds, drawn only where more than one seed finished.")


def comparison_page(folder: Path, out: Path) -> tuple[str, str, list[str]]:
    """Title, subtitle and sections of a comparison folder's page; writes its PNGs into
    ``out``."""
    comparison = load_comparison(folder)
    seeds = ", ".join(str(s) for s in comparison.seeds)
    subtitle = f"{len(comparison.entries)} entries · seeds {seeds}"
    if comparison.common:
        subtitle += f" · common run config: {' '.join(comparison.common)}"
    plot = plot_comparison(comparison, out / "accuracy_per_exit.png")
    sections = [
        comparison_table_section(comparison),
        section("Accuracy per exit", image_html(plot, "final test accuracy per exit per entry"),
                note(per_exit_plot_note(comparison))),
        comparison_round_curves_section(comparison, out),
        comparison_flops_section(folder, out),
        comparison_costs_section(comparison),
    ]
    return f"reefl compare {folder.name}", subtitle, [s for s in sections if s]


# -- the command ----------------------------------------------------------------------------


def write_report(folder: Path | str) -> Path:
    """Write ``<folder>/report/`` (the PNGs and index.html) for a run or comparison folder;
    return the page's path. ReportError (one line) for a folder that is neither, or an
    unreadable file in it."""
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    out = folder / REPORT_SUBDIR
    out.mkdir(exist_ok=True)
    try:
        title, subtitle, sections = (run_page if kind == "run" else comparison_page)(folder, out)
    except ReportError:
        with contextlib.suppress(OSError):
            out.rmdir()  # only when empty: a report that failed leaves no empty folder
        raise
    page = out / PAGE_FILE
    page.write_text(page_html(title, subtitle, sections))
    return page
