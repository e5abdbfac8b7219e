"""The in-process driver gives what the real Flower app gives, bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reefl.config import RunConfig
from reefl.federation.local import run_in_process
from reefl.launch.simulation import run_app

TINY = ('num-clients=4 num-exits=2 depth=2 embed-dim=16 num-heads=2 num-server-rounds=2 '
        'eval-every=1 fraction-train=0.5 local-epochs=1 seed=5')


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    pytest.param("", id="reefl", marks=pytest.mark.extended),
    pytest.param('method="depthfl" server-update="feddyn"', id="depthfl-feddyn",
                 marks=pytest.mark.extended),
])
def test_in_process_run_equals_the_flower_run(extra: str, tmp_path: Path) -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    run_dir = run_app([f'{TINY} {extra} output-dir="{tmp_path}" run-name="flower"'], quiet=True)
    config = json.loads((run_dir / "config.json").read_text())
    flower_state = load_file(str(run_dir / "model.safetensors"))
    flower_rounds = [json.loads(line)
                     for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    seen: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Flower's simulated clients run (Ray: one CPU, one thread)
    try:
        state, records = run_in_process(RunConfig.from_flat(config),
                                        on_round=lambda r: seen.append(r["round"]))
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
    assert set(state) == set(flower_state)
    assert all(torch.equal(state[k], flower_state[k]) for k in state)
    for mine, theirs in zip(records, flower_rounds, strict=True):
        assert mine["exit_accuracy"] == theirs["exit_accuracy"]
        assert mine["train-loss"] == pytest.approx(theirs["train-loss"], rel=1e-12)
