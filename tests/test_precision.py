"""Precision and attention kernel: ``mixed-precision = "auto"`` decided per model and device,
the attention kernel per autocast state, and the bf16 paths of training and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from reefl import training
from reefl.config import ConfigError, RunConfig
from reefl.evaluation import evaluate_exits
from reefl.methods import TaskSpec, build_method
from reefl.models.vit import attention

CPU = torch.device("cpu")


@pytest.mark.parametrize(("flat", "native", "expected"), [
    ({}, True, "fp32"),  # the embedded default: width 64
    ({"model": "deit-tiny", "img-size": 32}, True, "bf16"),  # width 192
    ({"model": "deit-small", "img-size": 32}, True, "bf16"),
    ({"model": "deit-small", "img-size": 32}, False, "fp32"),  # no native bf16 on this device
    ({"model": "deit-small", "img-size": 32, "mixed-precision": "fp32"}, True, "fp32"),
    ({"mixed-precision": "bf16"}, False, "bf16"),  # stated: taken as it is
])
def test_auto_precision_is_bf16_for_wide_models_on_devices_with_bf16(
        monkeypatch, flat: dict, native: bool, expected: str) -> None:
    monkeypatch.setattr(training, "bf16_supported", lambda device: native)
    cfg = RunConfig.from_flat(flat)
    assert training.resolved_precision(cfg, CPU) == expected
    with training.autocast(cfg, CPU):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")


def test_auto_is_the_default_and_a_bad_precision_names_the_key() -> None:
    assert RunConfig().mixed_precision == "auto"
    with pytest.raises(ConfigError, match="mixed-precision must be one of auto, fp32, bf16"):
        RunConfig.from_flat({"mixed-precision": "half"})


def _toy_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two tokens, one head of width 1: q = k = [1, 0], v = [1, 3]."""
    q = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    return q, q.clone(), torch.tensor([1.0, 3.0]).view(1, 1, 2, 1)


def test_attention_matches_hand_computed_values_in_fp32_and_bf16() -> None:
    # row 0: softmax([1, 0]) = [e, 1] / (e + 1), out = (e + 3) / (e + 1); row 1: mean of v = 2
    expected = torch.tensor([(math.e + 3) / (math.e + 1), 2.0]).view(1, 1, 2, 1)
    q, k, v = _toy_qkv()
    torch.testing.assert_close(attention(q, k, v, 1.0), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0)


def test_attention_kernel_sdpa_in_fp32_explicit_products_under_cpu_bf16() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=gen) for _ in range(3))
    scale = 8 ** -0.5
    # fp32: SDPA itself, bit for bit
    assert torch.equal(attention(q, k, v, scale),
                       F.scaled_dot_product_attention(q, k, v, scale=scale))
    # CPU bf16 autocast: exactly the bf16 products and softmax, done by hand
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    by_hand = ((qb @ kb.transpose(-2, -1)) * scale).softmax(dim=-1) @ vb
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, scale)
    assert torch.equal(out, by_hand)
    reference = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert (out.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("method_name", ["reefl", "depthfl"])
def test_bf16_training_and_evaluation_stay_close_to_fp32(method_name: str) -> None:
    """Local steps of a width-192 ViT in bf16 and in fp32 from the same start: train losses
    and evaluation losses within 5%, parameters kept in fp32."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = RunConfig.from_flat({"method": method_name, "mixed-precision": precision,
                                   "embed-dim": 192, "num-heads": 3, "local-epochs": 2})
        method = build_method(cfg, TaskSpec(10, 1))
        torch.manual_seed(0)
        model = method.build_model(len(method.exit_blocks) - 1)
        metrics = training.train_locally(model, loader, method, cfg, 0.001, 1, CPU)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        evaluation = evaluate_exits(model, loader, cfg, CPU)
        results[precision] = (metrics["train-loss"], evaluation)
    (loss32, eval32), (loss16, eval16) = results["fp32"], results["bf16"]
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)
    assert eval16["exit_loss"] == pytest.approx(eval32["exit_loss"], rel=0.05)
