"""Time one ReeFL local training step in fp32 and under bf16 autocast, for the embedded
default's CPU-sized ViT and for DeiT-S (224 px, 4 exits, 100 classes).

Usage: ``python benchmarks/mixed_precision.py [--threads N] [--steps N]``. Prints a markdown
table of the median step time per setting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.training import autocast, make_optimizer

MODELS = {
    "embedded default (28 px, d 64, 4 blocks)": ({}, TaskSpec(10, 1)),
    "DeiT-S (224 px, 12 blocks, 4 exits)": (
        {"model": "deit-small", "img-size": 224}, TaskSpec(100, 3)),
}


def step_seconds(flat: dict, task: TaskSpec, precision: str, steps: int) -> float:
    """Median wall time of a forward + backward + SGD step on a batch of 32."""
    cfg = RunConfig.from_flat({**flat, "mixed-precision": precision, "optimizer": "sgd"})
    method = build_method(cfg, task)
    model = method.build_global_model().train()
    optimizer = make_optimizer(list(model.parameters()), cfg, 0.01)
    images = torch.randn(cfg.batch_size, task.in_chans, cfg.img_size, cfg.img_size)
    labels = torch.randint(0, task.num_classes, (cfg.batch_size,))
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        with autocast(cfg, torch.device("cpu")):
            logits = model(images)
        loss, _ = method.local_loss(logits, labels, 1, method.new_loss_state())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| model | fp32 step ms | bf16 step ms | bf16 speed-up |")
    print("|---|---|---|---|")
    for name, (flat, task) in MODELS.items():
        fp32 = step_seconds(flat, task, "fp32", args.steps)
        bf16 = step_seconds(flat, task, "bf16", args.steps)
        print(f"| {name} | {1000 * fp32:.1f} | {1000 * bf16:.1f} | {fp32 / bf16:.2f}× |")


if __name__ == "__main__":
    main()
