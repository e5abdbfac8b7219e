"""Early-exit inference, calibration and exported tiers (reefl.anytime).

The maths is pinned against hand-computed values; the early-stopping loop against the plain
forward pass; a tiny real run ties predictions, FLOPs and exports to what the run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reefl.anytime import ExitPolicy, confidence, load
from reefl.anytime.calibrate import (
    ExitScores,
    calibrate_run,
    geometric_shares,
    operating_point,
    thresholds_for_shares,
)
from reefl.anytime.export import OnnxTier, export_tier
from reefl.anytime.model import BUNDLE_FORMAT, TierBundle, write_bundle
from reefl.anytime.policy import NEVER, last_affordable_exit
from reefl.anytime.predict import parse_flops
from reefl.cli import main
from reefl.config import RunConfig
from reefl.federation.local import run_local
from reefl.methods import TaskSpec, build_method
from reefl.models.finetune import Regime, apply_regime, merge_regime
from reefl.outputs.accounting import exit_flops_in, tier_costs

TASK = TaskSpec(num_classes=5, in_chans=1)
SMALL = {"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 4, "num-heads": 2,
         "num-exits": 3, "exit-blocks": "0,2,3", "mlp-ratio": 2.0}


def _model(extra: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """The deepest tier of a small model with random (not initial) weights."""
    cfg = RunConfig.from_flat({**SMALL, **(extra or {})})
    torch.manual_seed(seed)
    model = build_method(cfg, TASK).build_model(cfg.num_exits - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


# -- the policy -------------------------------------------------------------------------------


def test_confidence_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax (0.25, 0.75)
    assert confidence(logits, "maxprob").item() == pytest.approx(0.75)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert confidence(logits, "entropy").item() == pytest.approx(1 - entropy / math.log(2))
    assert confidence(torch.zeros(1, 4), "entropy").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="criterion must be one of maxprob, entropy"):
        confidence(logits, "margin")


def test_exits_taken_and_budget_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.2, 0.5],
                           [0.1, 0.8, 0.3, 0.5],
                           [0.0, 0.0, 0.0, 0.0]])
    policy = ExitPolicy((0.5, 0.7, 0.0))
    assert policy.exits_taken(scores).tolist() == [0, 1, 2, 0]
    assert ExitPolicy((0.0, 0.0, 0.0)).exits_taken(scores).tolist() == [0, 0, 0, 0]
    assert ExitPolicy((1.01, 1.01, 1.01)).exits_taken(scores).tolist() == [2, 2, 2, 2]
    flops = [100, 250, 400]
    assert last_affordable_exit(flops, None) == 2
    assert last_affordable_exit(flops, 300) == 1
    assert last_affordable_exit(flops, 249) == 0
    assert last_affordable_exit(flops, 10) == 0  # below exit 0's cost: still exit 0
    capped = ExitPolicy.build(3, NEVER, exit_flops=flops, budget=249)
    assert capped.last_exit == 0 and capped.exits_taken(scores).tolist() == [0, 0, 0, 0]
    assert parse_flops("1.5M") == 1.5e6 and parse_flops("250k") == 250e3
    with pytest.raises(ValueError, match="thresholds must be one number or 3"):
        ExitPolicy.build(3, [0.5, 0.5])


# -- the early-stopping loop --------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {}, {"ree-depth": 2, "ree-recurrent-steps": 2}, {"modulation": False},
    {"method": "depthfl"},
], ids=["ree", "ree-deep-recurrent", "no-modulation", "heads"])
def test_forward_until_gives_the_plain_forward_at_the_exit_taken(extra: dict) -> None:
    model = _model(extra)
    x = torch.randn(12, 1, 8, 8)
    with torch.no_grad():
        every = torch.stack(model(x))  # [K, B, C]
        scores = confidence(every)
        for thresholds in [(0.0,) * 3, (NEVER,) * 3, tuple(scores.median(dim=1).values)]:
            policy = ExitPolicy(tuple(float(t) for t in thresholds))
            logits, taken = model.forward_until(x, policy.stops)
            assert taken.tolist() == policy.exits_taken(scores).tolist()
            torch.testing.assert_close(logits, every[taken, torch.arange(12)],
                                       atol=1e-6, rtol=1e-5)
    assert set(policy.exits_taken(scores).tolist()) != {0}  # the median mixes exits


def test_forward_until_computes_deeper_blocks_only_for_samples_still_going() -> None:
    model = _model()
    rows: list[int] = []
    model.backbone.blocks[3].register_forward_hook(lambda m, i, o: rows.append(len(o)))
    x = torch.randn(10, 1, 8, 8)
    with torch.no_grad():
        scores = confidence(torch.stack(model(x)))
        rows.clear()
        threshold = float(scores[0].sort().values[6])  # 4 samples leave at exit 0
        policy = ExitPolicy((threshold, NEVER, 0.0))
        model.forward_until(x, policy.stops)
    assert rows == [10 - int((scores[0] >= threshold).sum())] == [6]  # the 6 still going


# -- FLOPs and folded regimes --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["reefl", "depthfl"])
def test_exit_flops_in_one_pass_equal_reefl_costs(method: str) -> None:
    cfg = RunConfig.from_flat({**SMALL, "method": method})
    costs = [c["forward_flops"] for c in tier_costs(build_method(cfg, TASK))]
    assert exit_flops_in(_model({"method": method}), 1, 8) == costs


def test_lora_and_ssf_fold_by_hand() -> None:
    weight, bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.5, -1.0])
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])  # rank 1, B A = [[2,0],[0,0]]
    merged, name = merge_regime({"m.weight": weight, "m.bias": bias, "m.lora_a": a,
                                 "m.lora_b": b}, Regime("lora", 1, 2.0, 8))
    assert name == "full" and set(merged) == {"m.weight", "m.bias"}
    assert merged["m.weight"].tolist() == [[5.0, 2.0], [3.0, 4.0]]  # + (2/1)·[[2,0],[0,0]]
    merged, _ = merge_regime({"m.weight": weight, "m.bias": bias,
                              "m.ssf_scale": torch.tensor([2.0, 0.5]),
                              "m.ssf_shift": torch.tensor([1.0, 1.0])}, Regime("ssf", 1, 1, 8))
    assert merged["m.weight"].tolist() == [[2.0, 4.0], [1.5, 2.0]]
    assert merged["m.bias"].tolist() == [2.0, 0.5]
    state = {"m.weight": weight}
    assert merge_regime(state, Regime("sa", 1, 1, 8)) == (state, "sa")


@pytest.mark.parametrize("regime", ["lora", "ssf"])
def test_folded_model_computes_what_the_regime_model_computes(regime: str) -> None:
    adapted = _model({"regime": regime})
    merged, name = merge_regime(adapted.state_dict(), Regime(regime, 32, 64.0, 32))
    cfg = RunConfig.from_flat({**SMALL, "regime": name})
    plain = apply_regime(build_method(cfg, TASK).build_architecture(2), Regime(name, 32, 64, 32))
    plain.load_state_dict(merged, strict=True)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        for mine, theirs in zip(plain.eval()(x), adapted(x), strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


# -- calibration ------------------------------------------------------------------------------


def test_calibration_maths_by_hand() -> None:
    assert geometric_shares(3, 1.0) == pytest.approx([1 / 3] * 3)
    assert geometric_shares(2, 0.5) == pytest.approx([2 / 3, 1 / 3])  # 0.5 : 0.25
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.2],
                           [0.5, 0.5, 0.6, 0.4],
                           [0.1, 0.1, 0.1, 0.1]])
    # half leave at exit 0 (the two most confident), a quarter at exit 1 (sample 2), rest last
    assert thresholds_for_shares(scores, [0.5, 0.25, 0.25]) == pytest.approx([0.8, 0.6, 0.0])
    assert thresholds_for_shares(scores, [0.0, 1.0, 0.0])[0] == NEVER
    correct = torch.tensor([[True, False, False, False],
                            [True, True, True, False],
                            [True, True, True, True]])
    result = ExitScores(scores, correct, (100, 200, 400)).evaluate([0.8, 0.6, 0.0])
    assert result["accuracy"] == pytest.approx(75.0)  # exits 0, 0, 1, 2: right, wrong, right, right
    assert result["flops"] == pytest.approx((100 + 100 + 200 + 400) / 4)
    assert result["exit_share"] == pytest.approx([0.5, 0.25, 0.25])


def test_operating_point_by_hand() -> None:
    points = [{"point": n, "validation_flops": f, "validation_accuracy": a}
              for n, f, a in [("a", 100, 80.0), ("b", 200, 89.5), ("c", 300, 90.0),
                              ("d", 400, 90.2)]]
    assert operating_point(points)["point"] == "b"  # cheapest within 1 point of 90.2
    assert operating_point(points, tolerance=0.1)["point"] == "d"
    assert operating_point(points, target_accuracy=85)["point"] == "b"
    assert operating_point(points, target_accuracy=99)["point"] == "d"  # none: the best
    assert operating_point(points, target_flops=350)["point"] == "c"
    assert operating_point(points, target_flops=50)["point"] == "a"  # none: the cheapest


# -- a real run --------------------------------------------------------------------------------

RUN = {"num-clients": 4, "num-exits": 3, "depth": 3, "embed-dim": 16, "num-heads": 2,
       "num-server-rounds": 2, "eval-every": 2, "fraction-train": 1.0, "local-epochs": 1,
       "seed": 3, "train-examples": 400, "test-examples": 200, "validation-fraction": 0.2}


def _run(tmp: Path, **extra: object) -> Path:
    cfg = RunConfig.from_flat({**RUN, **extra, "output-dir": str(tmp),
                               "run-name": "-".join(f"{v}" for v in extra.values()) or "run"})
    return run_local(cfg)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ReeFL run in the LoRA regime (so exports fold LoRA), with a validation
    split."""
    return _run(tmp_path_factory.mktemp("runs"), regime="lora", **{"lora-rank": 4})


def test_predict_reaches_the_runs_own_exit_accuracies(lora_run: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    final = json.loads((lora_run / "final.json").read_text())
    for threshold, exit_ in [("0", 0), ("1.5", -1)]:
        assert main(["predict", str(lora_run), "--split", "test", "-q",
                     "--threshold", threshold]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"accuracy {final['exit_accuracy'][exit_]:.2f}%" in line
    model = load(lora_run)
    # a budget just below exit 1's cost takes exit 0 whatever the thresholds say
    assert main(["predict", str(lora_run), "--split", "test", "-q", "--threshold", "2",
                 "--budget", str(model.exit_flops[1] - 1)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"accuracy {final['exit_accuracy'][0]:.2f}%" in line and "[100.0% 0.0% 0.0%]" in line
    accounting = json.loads((lora_run / "accounting.json").read_text())
    # LoRA folded away: each exit costs what the same model costs without LoRA's extra path
    full = RunConfig.from_flat({**RUN, "regime": "full"})
    assert model.exit_flops == [c["forward_flops"] for c in
                                tier_costs(build_method(full, model.bundle.task))]
    assert all(m < c["forward_flops"] for m, c in zip(model.exit_flops, accounting["tiers"],
                                                       strict=True))


def test_calibration_on_a_run(lora_run: Path) -> None:
    record = calibrate_run(lora_run)
    final = json.loads((lora_run / "final.json").read_text())
    assert abs(record["validation_examples"] - 80) <= 5  # 20 % of 400, rounded per class
    assert record["test_examples"] == 200
    # each exit alone, on the test set, is what the run's own evaluation measured
    assert [e["test_accuracy"] for e in record["exits"]] == pytest.approx(final["exit_accuracy"])
    assert [t["tier"] for t in record["tiers"]] == [0, 1, 2]
    flops = [q["test_flops"] for q in record["curve"]]
    assert min(flops) == record["exit_flops"][0] and max(flops) <= record["exit_flops"][-1]
    for name in ("calibration.json", "accuracy_vs_flops.csv", "accuracy_vs_flops.png"):
        assert (lora_run / name).stat().st_size > 0


@pytest.mark.parametrize("tier", [1, 2])
def test_exported_tier_gives_the_runs_logits(lora_run: Path, tmp_path: Path, tier: int) -> None:
    cfg = RunConfig.from_flat(json.loads((lora_run / "config.json").read_text()))
    exported = load(export_tier(lora_run, tier, tmp_path / "tier"))
    method = build_method(cfg, exported.bundle.task)
    model = method.build_model(tier)  # the run's own model, LoRA not folded
    model.load_state_dict(method.tier_state(load_file(str(lora_run / "model.safetensors")),
                                            tier))
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(tier))
    with torch.no_grad():
        expected = torch.stack(model.eval()(x))
    torch.testing.assert_close(exported.exit_logits(x), expected, atol=1e-6, rtol=0)
    onnx = OnnxTier(tmp_path / "tier")
    for mine, theirs in zip(onnx.exit_logits(x.numpy()), expected, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-5)
    ranked = confidence(expected)[0].sort().values
    threshold = float(ranked[7] + ranked[8]) / 2  # between two samples: no float ties
    labels, exits = onnx.predict(x.numpy(), threshold)
    prediction = exported.predict(x, threshold)
    assert exits.tolist() == prediction.exits.tolist()
    assert labels.tolist() == prediction.labels.tolist()


def test_predict_files_with_an_exported_tier(lora_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(folder / "b.jpg")
    assert main(["export", str(lora_run), "--tier", "1", "-o", str(tmp_path / "t1"),
                 "--no-onnx"]) == 0
    out = tmp_path / "rows.csv"
    assert main(["predict", str(tmp_path / "t1"), str(folder), "--threshold", "0",
                 "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "input,prediction,exit,confidence,flops"
    assert [line.split(",")[2] for line in lines[1:]] == ["0", "0"]  # threshold 0: exit 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "t1"), "--split", "test"]) == 2
    assert "exported tier carries no data" in capsys.readouterr().err
    assert main(["export", str(lora_run), "-o", str(tmp_path / "t1")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_calibrate_needs_a_validation_split(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    config = RunConfig.from_flat({**RUN, "validation-fraction": 0.0}).to_flat()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["calibrate", str(tmp_path)]) == 2
    assert "validation-fraction > 0" in capsys.readouterr().err


@pytest.mark.parametrize("method,exits", [("scalefl", [[0], [0, 1], [0, 1, 2]]),
                                           ("inclusivefl", [[0], [1], [2]])])
def test_tiers_of_methods_with_their_own_tier_models(method: str, exits: list[list[int]],
                                                      tmp_path: Path) -> None:
    """ScaleFL's tier t has exits 0..t at its own width; InclusiveFL's has exit t alone.
    Either way a loaded tier computes what that tier's model of the run computes."""
    widths = {"scalefl-widths": "0.5,0.75,1.0"} if method == "scalefl" else {}
    run = _run(tmp_path, method=method, **{"num-server-rounds": 1}, **widths)
    cfg = RunConfig.from_flat(json.loads((run / "config.json").read_text()))
    state = load_file(str(run / "model.safetensors"))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for tier in range(3):
        model = load(run, tier)
        assert model.bundle.info["exit_ids"] == exits[tier]
        method_ = build_method(cfg, model.bundle.task)
        own = method_.build_model(tier)
        own.load_state_dict(method_.tier_state(state, tier))
        with torch.no_grad():
            expected = torch.stack(own.eval()(x))
        torch.testing.assert_close(model.exit_logits(x), expected, atol=1e-6, rtol=0)


# -- a hand-built tier (no run): inputs, paths, exports, the command line ------------------


def _tier(folder: Path) -> Path:
    """An exported tier of ``_model()`` (grey 8x8 images, 5 classes, 3 exits), without
    calibration, written to ``folder`` as ``reefl export`` writes one."""
    cfg = RunConfig.from_flat(SMALL)
    model = _model()
    info = {"format": BUNDLE_FORMAT, "tier": 2, "method": cfg.method,
            "source_run": "runs/the-run", "model_config": cfg.to_flat(),
            "task": {"num_classes": 5, "in_chans": 1}, "exit_ids": [0, 1, 2],
            "exit_blocks": [0, 2, 3],
            "pipeline": {"kind": "image", "size": 8, "channels": 1, "mean": [0.5],
                         "std": [0.25]},
            "class_names": list("abcde"), "exit_flops": exit_flops_in(model, 1, 8)}
    return write_bundle(TierBundle(info, model.state_dict()), folder)


def test_inputs_take_numpy_pil_paths_and_lists(tmp_path: Path) -> None:
    from PIL import Image

    model = load(_tier(tmp_path / "tier"))
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)  # H, W, C as PIL gives it
    grey = np.round(rgb.astype(np.float64).mean(axis=-1)).astype(np.uint8)
    # what the stored (channels-first tensor) path gives for the same pixels
    expected = model.inputs(torch.from_numpy(grey)[None, None])
    assert expected.shape == (1, 1, 8, 8) and expected.dtype == torch.float32
    torch.testing.assert_close(model.inputs(rgb), expected)  # RGB averaged to grey
    torch.testing.assert_close(model.inputs(grey), expected)  # [H, W]
    torch.testing.assert_close(model.inputs(grey[..., None]), expected)  # [H, W, 1]
    rgba = np.concatenate([rgb, np.zeros((12, 10, 1), np.uint8)], axis=-1)
    torch.testing.assert_close(model.inputs(rgba), expected)  # alpha dropped
    torch.testing.assert_close(model.inputs(torch.from_numpy(rgb).permute(2, 0, 1)),
                               expected)  # one [C, H, W] tensor, RGB
    batch = np.stack([rgb, rgb[::-1].copy()])  # [N, H, W, C]
    other = model.inputs(torch.from_numpy(grey[::-1].copy())[None, None])
    torch.testing.assert_close(model.inputs(batch), torch.cat([expected, other]))
    torch.testing.assert_close(model.inputs(np.stack([grey, grey[::-1]])),
                               torch.cat([expected, other]))  # grey batch [N, H, W]
    image = Image.fromarray(rgb)
    torch.testing.assert_close(model.inputs(image), expected)
    image.save(tmp_path / "one.png")
    small = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "two.png")
    torch.testing.assert_close(model.inputs(str(tmp_path / "one.png")), expected)
    mixed = model.inputs([rgb, small, tmp_path / "one.png"])  # a list, sizes of their own
    torch.testing.assert_close(mixed, torch.cat([expected, model.inputs(small), expected]))
    # a folder, as reefl predict reads it: its images sorted by name
    folder = tmp_path / "photos"
    folder.mkdir()
    image.save(folder / "a.png")
    Image.fromarray(grey[::-1].copy()).save(folder / "b.png")
    torch.testing.assert_close(model.inputs(folder), torch.cat([expected, other]))
    prediction = model.predict(model.inputs(batch), threshold=0.0)
    assert prediction.exits.tolist() == [0, 0]
    with pytest.raises(ValueError, match="numpy images must be uint8"):
        model.inputs(rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="channels last"):
        model.inputs(np.zeros((2, 3, 8, 8), np.uint8))


def test_export_and_onnx_tier_take_str_paths(tmp_path: Path) -> None:
    source = _tier(tmp_path / "tier")
    out = export_tier(str(source), None, str(tmp_path / "exported"))
    assert out == tmp_path / "exported"
    model = load(str(out))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = model.exit_logits(x)
    for folder in (str(out), out):
        onnx = OnnxTier(folder)
        for mine, theirs in zip(onnx.exit_logits(x.numpy()), expected, strict=True):
            np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-5)
    assert onnx.policy is None  # the source was not calibrated
    ranked = confidence(expected[0]).sort().values
    thresholds = [float(ranked[2] + ranked[3]) / 2, 0.0, 0.0]  # between two: no float ties
    labels, exits = onnx.predict(x.numpy(), thresholds)  # one threshold per exit
    prediction = model.predict(x, thresholds)
    assert exits.tolist() == prediction.exits.tolist()
    assert labels.tolist() == prediction.labels.tolist()
    assert exits.tolist().count(0) == 3


def test_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    import reefl.anytime.export as export

    source = _tier(tmp_path / "tier")
    parent = tmp_path / "exports"

    def fail(model: object, folder: Path) -> Path:
        (folder / "exit-0.onnx").write_bytes(b"half")  # a half-written graph
        raise RuntimeError("exporter broke\nmore lines")

    monkeypatch.setattr(export, "export_onnx", fail)
    with pytest.raises(export.ExportError, match="ONNX export of tier 2 failed "
                                                  r"\(RuntimeError: exporter broke\)"):
        export_tier(source, None, parent / "out")
    assert list(parent.iterdir()) == []  # no out/, no temporary sibling
    (parent / "empty").mkdir()
    assert main(["export", str(source), "-o", str(parent / "empty")]) == 2
    assert "--no-onnx writes the safetensors and JSON only" in capsys.readouterr().err
    assert [p.name for p in parent.iterdir()] == ["empty"]
    assert list((parent / "empty").iterdir()) == []  # left as it was
    monkeypatch.undo()
    assert main(["export", str(source), "-o", str(parent / "empty")]) == 0
    assert [p.name for p in parent.iterdir()] == ["empty"]  # renamed into place
    assert sorted(p.name for p in (parent / "empty").iterdir()) == [
        "exit-0.onnx", "exit-1.onnx", "exit-2.onnx", "model.safetensors", "onnx-stages.json",
        "reefl-model.json"]


def test_predict_options_before_or_after_inputs(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    tier = str(_tier(tmp_path / "tier"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(photos / "a.png")
    capsys.readouterr()
    for argv in (["predict", tier, "--tier", "2", str(photos), "--threshold", "0"],
                 ["predict", "--threshold", "0", tier, str(photos), "--tier", "2", "-q"],
                 ["predict", tier, str(photos), "--tier", "2", "--threshold", "0"]):
        assert main(argv) == 0, argv
        assert "exits taken [100.0% 0.0% 0.0%]" in capsys.readouterr().out
    # no calibration with the export: the hint names the command that carries it
    assert main(["predict", tier, str(photos), "-q"]) == 0
    assert ("default threshold 0.9 (the tier was exported without calibrated thresholds: "
            "run reefl calibrate runs/the-run, then reefl export again)"
            in capsys.readouterr().out)
    for argv, message in [
            (["predict", tier, str(photos), "--bogus"], "unrecognized arguments: --bogus"),
            (["predict", tier], "give INPUT files or folders to predict, or --split"),
            (["predict", tier, str(photos), "--split", "test"],
             "give INPUT files or folders or --split, not both"),
            (["export", tier], "the following arguments are required: --output")]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: reefl {argv[0]} "), err  # the sub-command's usage
        assert f"reefl {argv[0]}: error: {message}" in err


def test_calibrate_export_predict_carries_the_thresholds(lora_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    record = calibrate_run(lora_run, plot=False)
    thresholds = record["tiers"][1]["thresholds"]
    out = tmp_path / "t1"
    capsys.readouterr()
    assert main(["export", str(lora_run), "--tier", "1", "-o", str(out)]) == 0
    assert "with the calibrated thresholds of tier 1 (maxprob" in capsys.readouterr().out
    carried = json.loads((out / "reefl-model.json").read_text())["calibration"]
    assert carried["thresholds"] == thresholds and carried["criterion"] == "maxprob"
    assert carried["source"] == str(lora_run / "calibration.json")
    policy = json.loads((out / "onnx-stages.json").read_text())["policy"]
    assert policy["thresholds"] == thresholds
    # the exported tier predicts with them: reefl predict, reefl.load and OnnxTier alike
    model = load(out)
    assert model.calibration["thresholds"] == thresholds
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    explicit = model.predict(x, thresholds)
    assert model.predict(x).exits.tolist() == explicit.exits.tolist()
    labels, exits = OnnxTier(out).predict(x.numpy())
    assert exits.tolist() == explicit.exits.tolist()
    assert labels.tolist() == explicit.labels.tolist()
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "not-an-image.npy", np.zeros(1))  # skipped: not an image suffix
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(images / "a.png")
    assert main(["predict", str(out), str(images), "-q"]) == 0
    assert (f"calibrated thresholds of tier 1 ({lora_run / 'calibration.json'})"
            in capsys.readouterr().out)
    # calibrating the export itself is refused, with the way that works
    assert main(["calibrate", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run reefl calibrate {lora_run} (its run folder), then reefl export again" in err
    # another criterion than the calibration's: the default, saying why
    assert main(["predict", str(out), str(images), "-q", "--criterion", "entropy"]) == 0
    assert "the calibration is for maxprob, not --criterion entropy" in capsys.readouterr().out
