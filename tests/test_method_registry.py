"""A method is one file: it registers its name, settings and checks itself; the config module
knows none. FedAdam is a server option of every method. A sixth method, defined here and
nowhere else, runs end to end."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from reefl.config import ConfigError, RunConfig, Setting, method_spec, registered_methods
from reefl.launch.run_config import prepare_run
from reefl.launch.simulation import run_app
from reefl.methods import ClientUpdate, Method, TaskSpec, build_method, method_names
from reefl.methods.losses import exit_cross_entropies
from reefl.models import EarlyExitModel

ROOT = Path(__file__).resolve().parents[1]
TASK = TaskSpec(num_classes=3, in_chans=1)


class SixthMethod(Method):
    """Per-exit heads trained on a scaled Σ CE: a method that exists only in this file."""

    name = "sixth"
    settings = (Setting("sixth-ce-scale", 1.0, "a number > 0", lambda v: v > 0),)

    def build_architecture(self, tier: int) -> EarlyExitModel:
        return self.build_heads_model(tier)

    def new_loss_state(self, held_out=None) -> None:
        return None

    def local_loss(self, logits: list[torch.Tensor], labels: torch.Tensor,
                   server_round: int, state: object) -> tuple[torch.Tensor, list[float]]:
        ces = exit_cross_entropies(logits, labels)
        return self.cfg.sixth_ce_scale * torch.stack(ces).sum(), [ce.item() for ce in ces]


SIXTH = f"{__name__}:SixthMethod"


def test_config_module_imports_no_method() -> None:
    tree = ast.parse((ROOT / "src/reefl/config.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    assert not [name for name in imported if name and name.startswith("reefl.methods")]


def test_builtin_methods_register_themselves_with_their_settings() -> None:
    assert {"reefl", "depthfl", "inclusivefl", "scalefl", "exclusivefl"} <= set(method_names())
    methods = registered_methods()
    assert [s.key for s in methods["depthfl"].settings] == ["feddyn-alpha"]
    assert methods["depthfl"].server_updates == ("fedavg", "fedadam", "feddyn")
    assert methods["exclusivefl"].server_updates == ("fedavg", "fedadam")
    assert "distillation" in {s.key for s in methods["reefl"].settings}


def test_a_method_outside_the_package_is_named_by_its_import_path() -> None:
    assert method_spec(SIXTH).factory is SixthMethod
    cfg = RunConfig.from_flat({"method": SIXTH, "sixth-ce-scale": 0.5})
    assert cfg.sixth_ce_scale == 0.5 and isinstance(build_method(cfg, TASK), SixthMethod)
    with pytest.raises(ConfigError, match="^sixth-ce-scale must be a number > 0; got '-1.0'"):
        RunConfig.from_flat({"method": SIXTH, "sixth-ce-scale": -1.0})
    with pytest.raises(ConfigError, match="^method must name an importable 'module:Class'; "
                                          "got 'nowhere:Foo' "):
        RunConfig.from_flat({"method": "nowhere:Foo"})
    with pytest.raises(ConfigError, match="^method must be one of depthfl, exclusivefl"):
        RunConfig.from_flat({"method": "fedfoo"})


def test_method_options_carry_settings_the_app_does_not_list(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({"method": SIXTH, "method-options": "sixth-ce-scale = 0.25"})
    assert cfg.sixth_ce_scale == 0.25
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    with pytest.raises(ConfigError, match="^method-options must be TOML"):
        RunConfig.from_flat({"method-options": "sixth-ce-scale"})
    # reefl run moves a key that pyproject lacks but a method declares into method-options
    prepared = prepare_run([f'method="{SIXTH}" sixth-ce-scale=0.5 output-dir="{tmp_path}"'],
                           ROOT)
    assert prepared.overrides["method-options"] == "sixth-ce-scale = 0.5"
    assert "sixth-ce-scale" not in prepared.overrides
    assert RunConfig.from_flat(prepared.config).sixth_ce_scale == 0.5


def _update(state: dict[str, torch.Tensor], n: int) -> ClientUpdate:
    return ClientUpdate(partition_id=n, tier=0, state=state, num_examples=n)


@pytest.mark.parametrize("name", ["reefl", "exclusivefl", "depthfl", "scalefl"])
def test_fedadam_is_a_server_option_of_every_method(name: str) -> None:
    flat = {"method": name, "depth": 2, "num-exits": 2, "embed-dim": 8, "num-heads": 2,
            "scalefl-widths": "0.5,1.0", "fedadam-lr": 0.01}
    fedavg = build_method(RunConfig.from_flat(flat), TASK)
    fedadam = build_method(RunConfig.from_flat({**flat, "server-update": "fedadam"}), TASK)
    w = {"a": torch.tensor([1.0, 2.0]), "idle": torch.tensor([5.0])}
    updates = [_update({"a": torch.tensor([2.0, 2.0])}, 1),
               _update({"a": torch.tensor([4.0, 1.0])}, 3)]
    # FedAvg: (2·1 + 4·3)/4 = 3.5, (2·1 + 1·3)/4 = 1.25 (ScaleFL counts clients: 3, 1.5)
    merged = [3.0, 1.5] if name == "scalefl" else [3.5, 1.25]
    torch.testing.assert_close(fedavg.aggregate(w, updates)["a"], torch.tensor(merged))
    # FedAdam, first step: Δ = merged − w; m = 0.1·Δ, v = 0.001·Δ²; w + 0.01·m/(√v + 1e-6):
    # |0.1·Δ| / (√0.001·|Δ| + 1e-6) = √10 less a hair, so each weight moves by ≈ 0.0316228
    delta = torch.tensor(merged, dtype=torch.float64) - torch.tensor([1.0, 2.0],
                                                                      dtype=torch.float64)
    step = 0.01 * 0.1 * delta / ((0.001 * delta ** 2).sqrt() + 1e-6)
    stepped = fedadam.aggregate(w, updates)
    expected = torch.tensor([1.0, 2.0], dtype=torch.float64) + step
    torch.testing.assert_close(stepped["a"], expected.float())
    assert abs(abs(step[0].item()) - 0.0316228) < 1e-6
    assert stepped["idle"].item() == 5.0  # nobody returned it: no step, no moments
    assert set(fedadam.fedadam.moments) == {"a"}


def test_server_update_values_follow_the_method() -> None:
    RunConfig.from_flat({"method": "depthfl", "server-update": "feddyn"})
    with pytest.raises(ConfigError, match="^server-update must be one of fedavg, fedadam for "
                                          "method scalefl; got 'feddyn'"):
        RunConfig.from_flat({"method": "scalefl", "server-update": "feddyn"})


@pytest.mark.parametrize("driver", [
    "in-process",  # run_local: the ServerApp loop and ClientApp handlers in this process
    pytest.param("flower", marks=[pytest.mark.slow, pytest.mark.extended]),  # ~20-30 s
])
def test_a_sixth_method_runs_end_to_end(driver: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, and through Flower, whose processes import this file by its module name
    (PYTHONPATH)."""
    overrides = [f'method="{SIXTH}" sixth-ce-scale=0.5 num-clients=4 num-exits=2 depth=2 '
                 'embed-dim=16 num-heads=2 num-server-rounds=1 fraction-train=1.0 '
                 f'local-epochs=1 maximum=true output-dir="{tmp_path}" run-name="sixth"']
    if driver == "flower":
        monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        here = str(Path(__file__).parent)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [here, os.environ.get("PYTHONPATH")])))
        run_dir = run_app(overrides, quiet=True)
    else:
        from reefl.federation.local import run_local
        from reefl.launch.run_config import parse_overrides

        run_dir = run_local(RunConfig.from_flat(parse_overrides(overrides)))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == SIXTH and config["sixth-ce-scale"] == 0.5
    final = json.loads((run_dir / "final.json").read_text())
    assert len(final["exit_accuracy"]) == 2 and final["mean_accuracy"] > 10.0  # 10 classes
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # every client is tier 1 (maximum): the reported loss is half the sum of both exits' CE
    first = rounds[0]
    assert first["train-loss"] == pytest.approx(
        0.5 * (first["train-ce-exit0"] + first["train-ce-exit1"]), rel=1e-5)


def test_the_config_digest_ignores_other_methods_at_their_defaults() -> None:
    """SixthMethod is registered in this process only (the ServerApp's process never imports
    this file): its setting at its default must not change a reefl run's fingerprint, or the
    launcher and the ServerApp would disagree; a changed value, or a change of the run's
    own settings, must change it; ``resume`` must not."""
    from reefl.outputs.run_folder import config_digest

    base = RunConfig.from_flat({"method": "reefl"})
    assert "sixth-ce-scale" in base.to_flat() and "sixth-ce-scale" not in base.identity()
    assert "kd-temperature" in base.identity()  # reefl's own, at its default
    same = {config_digest(RunConfig.from_flat({"method": "reefl", **extra}))
            for extra in ({}, {"resume": True}, {"sixth-ce-scale": 1.0})}
    assert same == {config_digest(base)}
    changed = {config_digest(RunConfig.from_flat({"method": "reefl", **extra}))
               for extra in ({"sixth-ce-scale": 2.0}, {"seed": 1}, {"kd-temperature": 2.0})}
    assert len(changed) == 3 and config_digest(base) not in changed
    assert "sixth-ce-scale" in RunConfig.from_flat({"method": SixthMethod.name}).identity()
