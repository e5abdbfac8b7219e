"""Exit thresholds set on held-out data, and the accuracy-vs-FLOPs curve they trace.

As in MSDNet's budgeted setting (Huang et al., 2018): for a share p, a fraction
∝ p^(k+1) of the validation samples is meant to leave at exit k (p < 1 favours early exits,
p > 1 late ones). Walking the exits in order, exit k's threshold is the confidence of the
n_k-th most confident sample still going, so that about n_k samples leave there; the last
exit takes the rest. Each p gives one set of thresholds; applied to the test set they give
one point (average FLOPs per image, accuracy). Every exit alone (all samples leave there)
ends the curve on both sides. Thresholds come from the validation split only (the run's
``validation-fraction``), never from the test set.

Each tier (a device that runs exits 0..t) gets its own curve and an operating point: the
cheapest point whose validation accuracy reaches the target (default: within ``tolerance``
points of the best on its curve), or the most accurate one within a FLOPs target.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reefl.anytime.model import CALIBRATION_FILE, AnytimeModel, ModelLoadError, load
from reefl.anytime.policy import NEVER, ExitPolicy, confidence

if TYPE_CHECKING:
    from reefl.outputs.tables import Table

SHARE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 40))
"""MSDNet's values of p: 0.05, 0.10, ..., 1.95."""
CURVE_CSV = "accuracy_vs_flops.csv"
CURVE_PNG = "accuracy_vs_flops.png"
DEFAULT_TOLERANCE = 1.0


@dataclass(frozen=True)
class ExitScores:
    """Every exit's confidence [K, N] and correctness [K, N] on one split, and the FLOPs
    of reaching each exit."""

    confidence: torch.Tensor
    correct: torch.Tensor
    exit_flops: tuple[int, ...]

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor, exit_flops: Sequence[int],
           criterion: str) -> ExitScores:
        """From every exit's logits [K, N, classes] and the labels [N]."""
        return cls(confidence(logits, criterion), logits.argmax(-1) == labels,
                   tuple(exit_flops))

    def evaluate(self, thresholds: Sequence[float]) -> dict[str, Any]:
        """Accuracy (%), average FLOPs per image and the share leaving at each exit when
        every sample stops at its first exit whose confidence reaches its threshold."""
        taken = ExitPolicy(tuple(thresholds)).exits_taken(self.confidence)
        n = taken.numel()
        flops = torch.tensor(self.exit_flops, dtype=torch.float64)[taken]
        hits = self.correct[taken, torch.arange(n)]
        shares = torch.bincount(taken, minlength=len(self.exit_flops)).double() / n
        return {"accuracy": 100.0 * hits.double().mean().item(),
                "flops": flops.mean().item(), "exit_share": shares.tolist()}


def geometric_shares(num_exits: int, p: float) -> list[float]:
    """The fraction of samples meant to leave at each exit: ∝ p^(k+1), summing to 1."""
    weights = np.power(p, np.arange(1, num_exits + 1, dtype=np.float64))
    return (weights / weights.sum()).tolist()


def thresholds_for_shares(scores: torch.Tensor, shares: Sequence[float]) -> list[float]:
    """Per-exit thresholds under which about ``shares[k]`` of the samples leave at exit k,
    from their confidences [K, N] (the most confident of those still going leave first;
    ties may take a few more). The last exit's threshold is 0: it takes the rest."""
    num_exits, n = scores.shape
    going = torch.ones(n, dtype=torch.bool)
    thresholds: list[float] = []
    for k in range(num_exits - 1):
        count = int(np.floor(n * shares[k]))
        here = scores[k][going]
        if count <= 0 or len(here) == 0:
            threshold = NEVER
        else:
            threshold = float(here.sort(descending=True).values[min(count, len(here)) - 1])
        thresholds.append(threshold)
        going &= scores[k] < threshold
    return [*thresholds, 0.0]


def single_exit_thresholds(num_exits: int, k: int) -> list[float]:
    """Thresholds that send every sample to exit k."""
    return [NEVER] * k + [0.0] * (num_exits - k)


def curve(validation: ExitScores, test: ExitScores) -> list[dict[str, Any]]:
    """One point per p of ``SHARE_GRID`` and per single exit, sorted by validation FLOPs:
    the thresholds (from the validation split) and what they give on both splits."""
    num_exits = len(validation.exit_flops)
    candidates = [(f"p={p:g}", thresholds_for_shares(validation.confidence,
                                                     geometric_shares(num_exits, p)))
                  for p in SHARE_GRID]
    candidates += [(f"exit {k}", single_exit_thresholds(num_exits, k))
                   for k in range(num_exits)]
    points = []
    for name, thresholds in candidates:
        on_validation, on_test = validation.evaluate(thresholds), test.evaluate(thresholds)
        points.append({
            "point": name, "thresholds": thresholds,
            "validation_accuracy": on_validation["accuracy"],
            "validation_flops": on_validation["flops"],
            "test_accuracy": on_test["accuracy"], "test_flops": on_test["flops"],
            "test_exit_share": on_test["exit_share"],
        })
    return sorted(points, key=lambda q: (q["validation_flops"], -q["validation_accuracy"]))


def operating_point(points: list[dict[str, Any]], target_accuracy: float | None = None,
                    target_flops: float | None = None,
                    tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The point of a curve chosen on validation numbers alone: with ``target_flops``, the
    most accurate within it (the cheapest if none is); else the cheapest reaching
    ``target_accuracy`` (default: the best validation accuracy less ``tolerance``; the most
    accurate if none does)."""
    if target_flops is not None:
        within = [q for q in points if q["validation_flops"] <= target_flops]
        if not within:
            return min(points, key=lambda q: q["validation_flops"])
        return max(within, key=lambda q: (q["validation_accuracy"], -q["validation_flops"]))
    best = max(q["validation_accuracy"] for q in points)
    goal = best - tolerance if target_accuracy is None else target_accuracy
    reaching = [q for q in points if q["validation_accuracy"] >= goal]
    if not reaching:
        return max(points, key=lambda q: q["validation_accuracy"])
    return min(reaching, key=lambda q: (q["validation_flops"], -q["validation_accuracy"]))


# -- a run folder --------------------------------------------------------------------------


def split_scores(model: AnytimeModel, loader: Any, criterion: str) -> ExitScores:
    """``ExitScores`` of ``model`` over the batches of ``loader`` (model inputs, labels)."""
    logits, labels = [], []
    for inputs, targets in loader:
        logits.append(model.exit_logits(inputs))
        labels.append(targets)
    return ExitScores.of(torch.cat(logits, dim=1), torch.cat(labels), model.exit_flops,
                         criterion)


def calibrate_run(run_dir: Path, criterion: str = "maxprob",
                  target_accuracy: float | None = None, target_flops: float | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, plot: bool = True) -> dict[str, Any]:
    """Calibrate every tier of the finished run in ``run_dir`` on its validation split and
    write calibration.json (and accuracy_vs_flops.csv/.png); returns the record.

    The curve of the run is that of the deepest tier (every exit); each tier's operating
    point is chosen on its own curve (its exits only, its own model)."""
    from reefl.config import RunConfig
    from reefl.data import held_out_loader, test_loader
    from reefl.federation.inputs import run_data

    cfg = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    data, pipeline, _ = run_data(cfg)
    if len(data.validation_indices) == 0:
        raise ModelLoadError(
            f"{run_dir} has no validation split to calibrate on (thresholds are never set on "
            "the test set): train it with validation-fraction > 0, e.g. "
            "-c 'validation-fraction=0.1'")
    loaders = {
        "validation": held_out_loader(data, pipeline, data.validation_indices,
                                      cfg.eval_batch_size),
        "test": test_loader(data, pipeline, cfg.eval_batch_size),
    }
    tiers, deepest_points = [], None
    num_tiers = cfg.num_exits
    for tier in range(num_tiers):
        model = load(run_dir, tier)
        scores = {name: split_scores(model, loader, criterion)
                  for name, loader in loaders.items()}
        points = curve(scores["validation"], scores["test"])
        chosen = operating_point(points, target_accuracy, target_flops, tolerance)
        tiers.append({"tier": tier, "exit_ids": model.bundle.info["exit_ids"],
                      "exit_flops": model.exit_flops, **chosen})
        if tier == num_tiers - 1:
            deepest_points, deepest = points, model
    assert deepest_points is not None
    test_alone = [q for q in deepest_points if q["point"].startswith("exit ")]
    record = {
        "criterion": criterion, "split": "validation",
        "validation_examples": len(data.validation_indices),
        "test_examples": len(data.test_indices),
        "target": {"accuracy": target_accuracy, "flops": target_flops,
                   "tolerance": tolerance},
        "exit_flops": deepest.exit_flops,
        "exits": [{"exit": int(q["point"].split()[1]), "flops": q["test_flops"],
                   "test_accuracy": q["test_accuracy"]} for q in sorted(
                       test_alone, key=lambda q: int(q["point"].split()[1]))],
        "curve": deepest_points,
        "tiers": tiers,
        "method": cfg.method, "seed": cfg.seed,
    }
    (run_dir / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_curve_csv(run_dir / CURVE_CSV, {cfg.method: [record]})
    if plot:
        plot_curves(run_dir / CURVE_PNG, {cfg.method: [record]})
    return record


def operating_points_table(record: dict[str, Any]) -> Table:
    """Each tier's operating point: test accuracy, average MFLOPs per image and that against
    the tier's deepest exit, and the thresholds of its exits but the last ('-': none leaves
    there; '(one exit)' for a tier with one exit)."""
    from reefl.outputs.tables import table

    rows = []
    for t in record["tiers"]:
        deepest = t["exit_flops"][-1]
        shown = " ".join("-" if v >= NEVER else f"{v:.3f}" for v in t["thresholds"][:-1])
        rows.append([str(t["tier"]), f"{t['test_accuracy']:.2f}", f"{t['test_flops'] / 1e6:.3f}",
                     f"{100 * t['test_flops'] / deepest:.1f}%", shown or "(one exit)"])
    return table(["tier", "test acc %", "MFLOPs/img", "of deepest", "thresholds"], rows,
                 align="lrrrl")


def format_operating_points(record: dict[str, Any]) -> str:
    """``operating_points_table`` as text (what ``reefl calibrate`` prints)."""
    from reefl.outputs.tables import text

    return text(operating_points_table(record))


# -- a comparison folder -------------------------------------------------------------------


def calibrate_comparison(folder: Path, **options: Any) -> dict[str, list[dict[str, Any]]]:
    """Calibrate every run of the comparison in ``folder`` (its comparison.json names the
    run folders) and write the curves of all entries to accuracy_vs_flops.csv/.png there."""
    listing = json.loads((folder / "comparison.json").read_text())
    records: dict[str, list[dict[str, Any]]] = {}
    for label, entry in listing.items():
        for _, run_dir in sorted(entry.get("run_dirs", {}).items(), key=lambda kv: int(kv[0])):
            if (Path(run_dir) / "model.safetensors").is_file():
                records.setdefault(label, []).append(
                    calibrate_run(Path(run_dir), plot=False, **options))
    if not records:
        raise ModelLoadError(f"{folder}: no finished run to calibrate")
    write_curve_csv(folder / CURVE_CSV, records)
    plot_curves(folder / CURVE_PNG, records)
    return records


def write_curve_csv(path: Path, records: dict[str, list[dict[str, Any]]]) -> Path:
    """Every point of every run's curve, one row each."""
    columns = ["entry", "method", "seed", "point", "validation_flops", "validation_accuracy",
               "test_flops", "test_accuracy", "thresholds"]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for label, runs in records.items():
            for record in runs:
                for q in record["curve"]:
                    writer.writerow([label, record["method"], record["seed"], q["point"],
                                     f"{q['validation_flops']:.0f}",
                                     f"{q['validation_accuracy']:.4f}",
                                     f"{q['test_flops']:.0f}", f"{q['test_accuracy']:.4f}",
                                     " ".join(f"{t:.6g}" for t in q["thresholds"])])
    return path


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Test FLOPs and accuracy of the p-grid points averaged over runs (seeds), point by
    point (the same p in every run), sorted by FLOPs."""
    by_point: dict[str, list[tuple[float, float]]] = {}
    for record in runs:
        for q in record["curve"]:
            if q["point"].startswith("p="):
                by_point.setdefault(q["point"], []).append((q["test_flops"],
                                                           q["test_accuracy"]))
    means = sorted((float(np.mean([f for f, _ in v])), float(np.mean([a for _, a in v])))
                   for v in by_point.values())
    return [f for f, _ in means], [a for _, a in means]


def plot_curves(path: Path, records: dict[str, list[dict[str, Any]]]) -> Path:
    """Test accuracy against average MFLOPs per image: one line per entry (the mean over
    its seeds of the p-grid points), each exit alone as a marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    averaged = any(len(runs) > 1 for runs in records.values())
    for index, (label, runs) in enumerate(records.items()):
        colour = f"C{index % 10}"
        flops, accuracy = mean_curve(runs)
        seeds = len(runs)
        name = label if seeds == 1 else f"{label} (mean of {seeds} seeds)"
        axes.plot(np.array(flops) / 1e6, accuracy, "-", color=colour, label=name)
        for k, exit_ in enumerate(runs[0]["exits"]):
            alone = [r["exits"][k]["test_accuracy"] for r in runs]
            axes.plot(exit_["flops"] / 1e6, float(np.mean(alone)), "o", color=colour)
            axes.annotate(f"{k}", (exit_["flops"] / 1e6, float(np.mean(alone))),
                          textcoords="offset points", xytext=(4, -10), fontsize="x-small",
                          color=colour)
    axes.set_xlabel("average MFLOPs per image (test set)")
    axes.set_ylabel("test accuracy %")
    means = "; means over seeds" if averaged else ""
    axes.set_title(f"early exit, thresholds set on the validation split (dots: each exit "
                   f"alone{means})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path
