"""Train-step throughput of every method × regime at DeiT-S shapes, against the plain backbone
(one LayerNorm + Linear head after the last block) in the same regime, i.e. with the same
trainable set.

One step is what a client does per batch: forward under the precision's autocast, the method's
loss, backward, clipping, an SGD step. Each model is the method's deepest tier: DeiT-S (224 px,
100 classes, 4 exits) or, with ``--shape embedded``, the embedded default's small ViT.
Settings are interleaved: every repetition times every setting once, so a noisy neighbour
slows all of them alike. Times are the process's CPU time per step (what this
process computed; the machine is shared), with the wall time beside it.

Precisions: ``fp32``; ``bf16`` (autocast, attention by the library's choice, see
``reefl.models.vit.attention``); ``bf16-sdpa`` (autocast, attention always by
``scaled_dot_product_attention``: the kernel before this benchmark existed). GFLOP/img counts
forward + backward (matmuls, convolutions and attention products; ``FlopCounterMode``).

Usage: ``python benchmarks/train_step.py [--shape deit-s] [--threads 1] [--batch 8] [--reps 3]
[--methods reefl,depthfl] [--regimes full,frozen] [--precisions fp32,bf16,bf16-sdpa]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from reefl.config import REGIMES, RunConfig
from reefl.methods import TaskSpec, build_method, method_names
from reefl.models import vit
from reefl.training import autocast, make_optimizer

SHAPES = {  # run config and task of each model shape
    "deit-s": ({"model": "deit-small", "img-size": 224, "optimizer": "sgd", "pretrained": ""},
               TaskSpec(num_classes=100, in_chans=3)),
    "embedded": ({"optimizer": "sgd"}, TaskSpec(num_classes=10, in_chans=1)),  # the default
}
PLAIN = "plain"  # the backbone with one head after its last block
PRECISIONS = ("fp32", "bf16", "bf16-sdpa")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention as its two products and a softmax (what FlopCounterMode can count)."""
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@contextlib.contextmanager
def attention_kernel(kernel: object) -> Iterator[None]:
    """Swap the backbone's attention function (``vit.attention``) for the duration."""
    library = vit.attention
    vit.attention = kernel if kernel is not None else library
    try:
        yield
    finally:
        vit.attention = library


@dataclass
class Setting:
    """One model in one precision, and its step times."""

    method: str
    regime: str
    precision: str
    step: object  # Callable[[], None]
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


@dataclass
class Model:
    """One method's deepest tier in one regime, its optimiser and a fixed random batch (shared
    by the precisions: autocast changes the step, not the model)."""

    cfg: RunConfig
    task: TaskSpec
    method: object  # reefl.methods.Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    images: torch.Tensor
    labels: torch.Tensor


def build_model(shape: str, method_name: str, regime: str, batch: int) -> Model:
    base, task = SHAPES[shape]
    flat = {**base, "regime": regime}
    if method_name == PLAIN:
        flat |= {"method": "depthfl", "num-exits": 1}
    else:
        flat |= {"method": method_name}
    cfg = RunConfig.from_flat(flat)
    method = build_method(cfg, task)
    model = method.build_model(len(method.exit_blocks) - 1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Model(cfg, task, method, model, make_optimizer(params, cfg, 0.01), params,
                 torch.randn(batch, task.in_chans, cfg.img_size, cfg.img_size),
                 torch.randint(0, task.num_classes, (batch,)))


def build_step(built: Model, precision: str):
    """A closure that runs one training step of ``built`` in ``precision``."""
    cfg = replace(built.cfg, mixed_precision="fp32" if precision == "fp32" else "bf16")
    kernel = sdpa_attention if precision == "bf16-sdpa" else None
    device = torch.device("cpu")

    def step() -> None:
        with attention_kernel(kernel):
            with autocast(cfg, device):
                logits = built.model(built.images)
            loss, _ = built.method.local_loss(logits, built.labels, 1,
                                              built.method.new_loss_state())
            built.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(built.params, cfg.clip_value)
            built.optimizer.step()

    return step


def count_flops(built: Model) -> float:
    """GFLOP per image of forward + backward (attention as its products, so counted)."""
    with attention_kernel(math_attention), FlopCounterMode(display=False) as counter:
        logits = built.model(built.images)
        loss, _ = built.method.local_loss(logits, built.labels, 1, built.method.new_loss_state())
        loss.backward()
    built.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(built.images) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="deit-s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join([PLAIN, *method_names()]))
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if PLAIN not in methods:
        methods.insert(0, PLAIN)
    settings: list[Setting] = []
    flops: dict[tuple[str, str], float] = {}
    for regime in args.regimes.split(","):
        for method in methods:
            built = build_model(args.shape, method, regime, args.batch)
            flops[method, regime] = count_flops(built)
            for precision in args.precisions.split(","):
                step = build_step(built, precision)
                step()  # warm-up: allocations, autocast caches
                settings.append(Setting(method, regime, precision, step))
    print(f"torch {torch.__version__}, {args.shape}, {args.threads} thread(s), batch {args.batch}, "
          f"{len(settings)} settings × {args.reps} interleaved repetitions", flush=True)
    for rep in range(args.reps):
        for setting in settings:
            cpu, wall = time.process_time(), time.perf_counter()
            setting.step()
            setting.cpu.append(time.process_time() - cpu)
            setting.wall.append(time.perf_counter() - wall)
        print(f"repetition {rep + 1}/{args.reps} done", flush=True)
    print_table(settings, flops, args.batch)


def print_table(settings: list[Setting], flops: dict[tuple[str, str], float],
                batch: int) -> None:
    """img/s per precision (CPU time; wall in brackets) and each against the plain backbone
    at equal FLOPs: (img/s · GFLOP/img) / the plain backbone's, same regime and precision."""
    rate = {(s.method, s.regime, s.precision): batch / statistics.median(s.cpu) for s in settings}
    wall = {(s.method, s.regime, s.precision): batch / statistics.median(s.wall)
            for s in settings}
    precisions = list(dict.fromkeys(s.precision for s in settings))
    head = " | ".join(f"{p} img/s (wall) | {p} vs plain" for p in precisions)
    print(f"\n| method | regime | GFLOP/img | {head} |")
    print("|---|---|---|" + "---|---|" * len(precisions))
    for method, regime in dict.fromkeys((s.method, s.regime) for s in settings):
        cells = []
        for p in precisions:
            own = rate[method, regime, p] * flops[method, regime]
            plain = rate[PLAIN, regime, p] * flops[PLAIN, regime]
            cells.append(f"{rate[method, regime, p]:.2f} ({wall[method, regime, p]:.2f}) | "
                         f"{own / plain:.2f}×")
        print(f"| {method} | {regime} | {flops[method, regime]:.3g} | {' | '.join(cells)} |")
    if "bf16" in precisions and "bf16-sdpa" in precisions:
        print("\nbf16 (library's attention) over bf16-sdpa, per setting: " + ", ".join(
            f"{m}/{r} {rate[m, r, 'bf16'] / rate[m, r, 'bf16-sdpa']:.2f}×"
            for m, r in dict.fromkeys((s.method, s.regime) for s in settings)))


if __name__ == "__main__":
    main()
