"""Seconds per round of the paper's CIFAR-100 setting: DeiT-S at 224 px, 4 exits, 10 clients
a round with 500 images each, one local epoch of batch 32, then the server's evaluation of
every exit. Runs on a CUDA device when there is one, else on the CPU.

The data are random images in CIFAR-100's schema (32×32 RGB, 100 classes), so the script runs
as is on a machine without the data set or internet; the input pipeline (upsampling to 224 px,
augmentation) is the real one, and so are the clients' rounds (``client_round``, what the
ClientApp runs) and the server's aggregation and evaluation. The backbone is randomly
initialised (the weights do not change the time). Clients run one after another, as one
simulated ClientApp per GPU would; ``--regimes`` and ``--precisions`` select the settings.

Usage: ``python benchmarks/paper_round.py [--regimes frozen,full,lora] [--methods reefl]
[--precisions auto,fp32] [--clients 10] [--images 500] [--rounds 2] [--test 1000]``.
The first round includes warm-up; the table reports the last round.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from reefl.config import RunConfig
from reefl.data import DataOptions, SourceOptions, input_pipeline, test_loader
from reefl.data.federated import _partition
from reefl.data.spec import DataSpec, Split
from reefl.evaluation import evaluate_exits
from reefl.federation.client_app import ClientSetup, client_round
from reefl.federation.strategy import train_metrics
from reefl.federation.tiers import client_tier
from reefl.methods import ClientUpdate, TaskSpec, build_method
from reefl.presets import preset_path, read_config_file
from reefl.training import resolved_precision

CLASSES = 100


def cifar_shaped(images: int, test: int, seed: int = 0) -> DataSpec:
    """Random uint8 images and labels in CIFAR-100's schema."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                     np.arange(n, dtype=np.int64) % CLASSES)

    return DataSpec(name="cifar100-shaped", kind="image", train=split(images),
                    num_classes=CLASSES, class_names=tuple(map(str, range(CLASSES))),
                    test=split(test), crop_scale=(0.08, 1.0), flip=True)


def round_seconds(flat: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Time ``args.rounds`` rounds of ``args.clients`` clients; the last round's figures."""
    cfg = RunConfig.from_flat(flat)
    spec = cifar_shaped(args.clients * args.images, args.test)
    options = DataOptions(SourceOptions("cifar100-shaped"), args.clients, "equal-dirichlet",
                          1.0, 0.2, 0.2, cfg.seed)
    data = _partition(spec, options)
    pipeline = input_pipeline(data, cfg.img_size, pretrained=True, augment=cfg.augment)
    method = build_method(cfg, TaskSpec(CLASSES, 3))
    state = method.initial_state()
    setup = ClientSetup(cfg, data, pipeline, method, state)
    tiers = {pid: client_tier(pid, cfg, {}) for pid in range(args.clients)}
    loader = test_loader(data, pipeline, cfg.eval_batch_size)
    result: dict = {}
    for server_round in range(1, args.rounds + 1):
        started = time.perf_counter()
        updates = []
        for pid, tier in tiers.items():
            payload = {k: v.clone() for k, v in method.client_payload(state, tier).items()}
            trained, metrics = client_round(setup, pid, tier, server_round, 0.01, payload, {})
            updates.append(ClientUpdate(pid, tier, trained, int(metrics["num-examples"]),
                                        train_metrics(metrics)))
        state = method.aggregate(state, updates)
        if device.type == "cuda":
            torch.cuda.synchronize()
        trained_at = time.perf_counter()
        evaluation = evaluate_exits(method.exit_evaluator(state), loader, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        result = {"train_s": trained_at - started, "eval_s": done - trained_at,
                  "round_s": done - started,
                  "train_img_s": sum(u.num_examples for u in updates) * cfg.local_epochs
                  / (trained_at - started),
                  "mean_accuracy": evaluation["mean_accuracy"]}
        print(f"  round {server_round}: {result['round_s']:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="reefl")
    parser.add_argument("--regimes", default="frozen,full,lora")
    parser.add_argument("--precisions", default="auto,fp32")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU thread(s); "
          f"{args.clients} clients × {args.images} images, {args.test} test images", flush=True)
    base = read_config_file(preset_path("cifar100"))
    rows = []
    for method in args.methods.split(","):
        for regime in args.regimes.split(","):
            for precision in args.precisions.split(","):
                flat = {**base, "pretrained": "", "dataset": "embedded-mnist",
                        "num-clients": args.clients, "fraction-train": 1.0,
                        "method": method, "regime": regime, "mixed-precision": precision}
                cfg = RunConfig.from_flat(flat)
                label = f"{method} {regime} {precision}→{resolved_precision(cfg, device)}"
                print(label, flush=True)
                rows.append((label, round_seconds(flat, args, device)))
    print(f"\n| setting ({name}) | round s | train s | eval s | train img/s | mean acc % |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['round_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | "
              f"{r['train_img_s']:.0f} | {r['mean_accuracy']:.1f} |")


if __name__ == "__main__":
    main()
