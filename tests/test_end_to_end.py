"""The real Flower app, run by `reefl run`'s launcher on tiny data: two rounds, four clients."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reefl.cli import main
from reefl.config import RunConfig
from reefl.launcher import run_app
from reefl.methods import TaskSpec, build_method

TINY_RUN = ('num-clients=4 num-exits=2 depth=2 embed-dim=16 num-heads=2 num-server-rounds=2 '
            'eval-every=1 fraction-train=1.0 local-epochs=1 seed=3')

# One row per method (and per variant whose wiring differs), added to TINY_RUN.
E2E_RUNS = [
    pytest.param("", id="reefl"),
    pytest.param('distillation="dynamic" exit-module="heads" maximum=true', id="reefl-ablations"),
    pytest.param('method="depthfl"', id="depthfl"),
    pytest.param('method="depthfl" server-update="feddyn"', id="depthfl-feddyn"),
    pytest.param('method="exclusivefl"', id="exclusivefl"),
    pytest.param('method="scalefl" scalefl-widths="0.5,1.0"', id="scalefl"),
    pytest.param('method="inclusivefl"', id="inclusivefl"),
    pytest.param('method="inclusivefl" server-update="fedadam" fedadam-lr=0.01',
                 id="inclusivefl-fedadam"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra", E2E_RUNS)
def test_two_rounds_write_the_run_folder(extra: str, tmp_path: Path) -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    run_dir = run_app([f'{TINY_RUN} {extra} output-dir="{tmp_path}" run-name="e2e"'],
                      quiet=True)
    assert run_dir == tmp_path / "e2e"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 4 and config["seed"] == 3

    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert len(record["exit_accuracy"]) == 2 and len(record["exit_loss"]) == 2
        assert record["train-loss"] > 0
        assert record["mean_accuracy"] == pytest.approx(sum(record["exit_accuracy"]) / 2)
    # four clients of tiers 0,1,0,1 (1 under maximum) trained in round 1 (exclusivefl: the
    # two of tier 1): both exits' CE were reported
    assert {"train-ce-exit0", "train-ce-exit1"} <= set(rounds[0])

    final = json.loads((run_dir / "final.json").read_text())
    assert final["exit_accuracy"] == rounds[-1]["exit_accuracy"]
    assert final["method"] == config["method"] and final["seed"] == 3 and final["wall_seconds"] > 0
    assert 0 <= final["ensemble_accuracy"] <= 100
    assert final["mean_accuracy"] > 10.0  # ten classes: two rounds already beat chance

    state = load_file(str(run_dir / "model.safetensors"))
    cfg = RunConfig.from_flat(config)
    model = build_method(cfg, TaskSpec(num_classes=10, in_chans=1)).build_global_model()
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize(
    ("override", "key"),
    [('method="fedfoo"', "method"), ("num-exits=9", "num-exits"),
     ("dirichlet-alpha=0.0", "dirichlet-alpha"), ("fraction-train=1.5", "fraction-train")],
)
def test_bad_value_stops_before_training(override: str, key: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--run-config", f'{override} output-dir="{tmp_path}"'])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
