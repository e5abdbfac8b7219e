"""The bf16 paths on the CPU (autocast runs on any x86 CPU, natively or emulated).

Tolerances: bf16 keeps 8 significant bits, so one rounding is off by at most 2^-9 ≈ 0.2% of
the value. Attention's output is a convex combination of v (weights summing to 1): rounding
q, k, v, the scores and the weights keeps its error within a few roundings of max|v|; we
allow 2^-7 · max|v| (four roundings). A forward pass of the tiny model rounds a few dozen
times on the way to the logits, and the cross-entropy near ln(classes) moves by much less
than the logits do: losses within 1% of fp32's (measured here: under 0.03%).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reefl import training
from reefl.config import RunConfig
from reefl.evaluation import evaluate_exits
from reefl.methods import TaskSpec, build_method
from reefl.models.vit import attention

CPU = torch.device("cpu")
TINY_REE = {"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 4, "num-heads": 2,
            "num-exits": 4, "mlp-ratio": 2.0, "ree-depth": 2, "ree-recurrent-steps": 2}
BF16_ROUNDING = 2.0**-9


@pytest.mark.parametrize(("shape", "scale"), [
    ((4, 8, 6, 2), 16**-0.5),  # Ree: 8 heads of width 2, scale (attention width 16)^-0.5
    ((4, 3, 17, 64), 64**-0.5),  # a DeiT-Tiny-like head
], ids=["ree", "backbone"])
def test_attention_bf16_branch_equals_sdpa_in_fp32_to_bf16_rounding(shape, scale) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, scale=scale)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, scale)
    assert out.dtype == torch.bfloat16  # the bf16 branch ran, not fp32 SDPA
    error = (out.float() - reference).abs()
    bound = 4 * BF16_ROUNDING * v.abs().max().item()
    assert error.max().item() < bound
    assert error.max().item() > 0  # it did round
    # a wrong scale (or none) is far outside that bound
    wrong = F.scaled_dot_product_attention(q, k, v, scale=2 * scale)
    assert (wrong - reference).abs().max().item() > 10 * bound


def _logits(cfg: RunConfig, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), training.autocast(cfg, CPU):
        return [z.float() for z in model(x)]


def test_a_deep_recurrent_ree_forward_in_bf16_is_close_to_fp32() -> None:
    """Ree of 2 layers × 2 steps, every exit: bf16 autocast against fp32, same weights."""
    fp32 = RunConfig.from_flat({**TINY_REE, "mixed-precision": "fp32"})
    bf16 = RunConfig.from_flat({**TINY_REE, "mixed-precision": "bf16"})
    torch.manual_seed(0)
    model = build_method(fp32, TaskSpec(5, 1)).build_global_model().eval()
    with torch.no_grad():  # scale ~1 weights so that the logits are O(1), not O(0.01)
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(1.0 / (0.02 * math.sqrt(p[0].numel())))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    exact, rounded = _logits(fp32, model, x), _logits(bf16, model, x)
    assert len(exact) == len(rounded) == 4
    for a, b in zip(exact, rounded, strict=True):
        scale = a.abs().max().item()
        assert scale > 0.5
        error = (a - b).abs().max().item()
        assert 0 < error < 0.05 * scale  # rounded, by a few percent at most


def _record_linear_dtypes(model: nn.Module) -> tuple[set[torch.dtype], list]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, nn.Linear)]
    return seen, hooks


def _one_step_and_evaluation(precision: str) -> tuple[dict, dict, dict, set, set]:
    """One local step (one batch of 8, one epoch) of ReeFL from a fixed start, then one
    evaluation of the updated model; the dtypes of every Linear output in each."""
    cfg = RunConfig.from_flat({**TINY_REE, "mixed-precision": precision, "local-epochs": 1})
    gen = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 5, (8,),
                                                                           generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    method = build_method(cfg, TaskSpec(5, 1))
    torch.manual_seed(0)
    model = method.build_model(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_train, hooks = _record_linear_dtypes(model)
    metrics = training.train_locally(model, loader, method, cfg, 0.01, 1, CPU)
    for h in hooks:
        h.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    delta = {k: v - before[k] for k, v in model.state_dict().items()}
    seen_eval, hooks = _record_linear_dtypes(model)
    evaluation = evaluate_exits(model, loader, cfg, CPU)
    for h in hooks:
        h.remove()
    return metrics, evaluation, delta, seen_train, seen_eval


def test_one_bf16_step_and_evaluation_run_in_bf16_and_stay_close_to_fp32() -> None:
    m32, e32, d32, train32, eval32 = _one_step_and_evaluation("fp32")
    m16, e16, d16, train16, eval16 = _one_step_and_evaluation("bf16")
    # the bf16 path was really taken (a silently disabled autocast fails here), fp32's not
    assert train16 == eval16 == {torch.bfloat16}
    assert train32 == eval32 == {torch.float32}
    # the step's loss (before the update) and every exit's CE: finite, within 1%, not equal
    for key in ("train-loss", *(f"train-ce-exit{k}" for k in range(4))):
        assert math.isfinite(m16[key]) and m16[key] == pytest.approx(m32[key], rel=0.01), key
    assert m16["train-loss"] != m32["train-loss"]
    # AdamW's first step moves each weight by lr·g/|g|: the same step in both precisions
    # wherever the gradient's sign survives the rounding (nearly everywhere)
    moved = torch.cat([(d16[k] - d32[k]).abs().flatten() < 1e-4 for k in d32])
    assert moved.double().mean().item() > 0.95
    assert max(d32[k].abs().max().item() for k in d32) == pytest.approx(0.01, rel=1e-3)
    # the evaluation of the updated model
    assert e16["num_test_examples"] == e32["num_test_examples"] == 8
    assert len(e16["exit_loss"]) == 4
    for a, b in zip(e16["exit_loss"], e32["exit_loss"], strict=True):
        assert math.isfinite(a) and a == pytest.approx(b, rel=0.01)


# -- which precision "auto" picks (README: mixed-precision; docs/method.md §3) ----------------

@pytest.mark.parametrize(("embed_dim", "heads", "native", "expected"), [
    (176, 2, True, "fp32"),  # just below 192: fp32 even with native bf16
    (192, 3, True, "bf16"),  # 192 and wider
    (384, 6, True, "bf16"),
    (384, 6, False, "fp32"),  # no native bf16: emulated bf16 is slower, fp32
])
def test_auto_switches_to_bf16_at_width_192_with_native_bf16(
        monkeypatch, embed_dim: int, heads: int, native: bool, expected: str) -> None:
    assert training.BF16_MIN_EMBED_DIM == 192  # the documented threshold
    monkeypatch.setattr(training, "bf16_supported", lambda device: native)
    cfg = RunConfig.from_flat({"embed-dim": embed_dim, "num-heads": heads})
    assert training.resolved_precision(cfg, CPU) == expected
    line = training.precision_line(cfg, CPU)
    assert line.startswith(f"precision {expected} (mixed-precision=auto; backbone width "
                           f"{embed_dim}, native bf16 on cpu: {'yes' if native else 'no'})")


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True)])
def test_native_bf16_on_a_cpu_means_avx512_bf16_or_amx(monkeypatch, avx512_bf16: bool,
                                                       amx: bool, expected: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    check = training.bf16_supported.__wrapped__  # past the per-process cache
    assert check(CPU) is expected


@pytest.mark.parametrize("says", [True, False])
def test_native_bf16_on_cuda_is_what_cuda_says(monkeypatch, says: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: says)
    assert training.bf16_supported.__wrapped__(torch.device("cuda")) is says
    assert training.bf16_supported.__wrapped__(torch.device("meta")) is False


def test_this_machine_s_embedded_default_stays_fp32() -> None:
    """Whatever this CPU has, the embedded default (width 64) runs without autocast."""
    cfg = RunConfig()
    assert cfg.mixed_precision == "auto" and cfg.backbone["embed_dim"] == 64
    assert training.resolved_precision(cfg, CPU) == "fp32"
    with training.autocast(cfg, CPU):
        assert not torch.is_autocast_enabled("cpu")
