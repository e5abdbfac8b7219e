"""Check reefl's LoRA against PEFT's on the same backbone and the same A and B matrices.

PEFT is not a dependency of reefl (see models/finetune.py for why); install it to run this:

    pip install peft && python benchmarks/lora_vs_peft.py

It builds a DeiT-S-sized backbone (random weights), adapts q and v of every block with rank
32 and alpha 64 in both implementations, copies reefl's A and B into PEFT's (with B moved off
zero, so that LoRA changes the output), and prints the largest difference of the block
outputs, the number of trainable parameters of each, and their forward time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from reefl.models import VisionTransformer
from reefl.models.finetune import Regime, apply_regime


def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


class Tokens(torch.nn.Module):
    """The backbone's tokens after every block (what LoRA changes)."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.embed(x)
        for block in self.backbone.blocks:
            h = block(h)
        return h


def main() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = VisionTransformer(embed_dim=384, depth=12, num_heads=6)
    ours = Tokens(copy.deepcopy(base))
    apply_regime(ours, Regime("lora", args.rank, args.alpha, adapter_dim=0))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.02)
    theirs = Tokens(copy.deepcopy(base))
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                        target_modules=r".*blocks\.\d+\.attn\.(q|v)")
    theirs = inject_adapter_in_model(config, theirs)
    ours_state = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                layer, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
                p.copy_(ours_state[f"{layer}.lora_{kind.lower()}"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
        plain = (Tokens(base)(x) - ours(x)).abs().max().item()

    def trainable(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    print(f"max |reefl - peft| over the tokens after block 12: {diff:.3g} "
          f"(LoRA itself moves them by up to {plain:.3g})")
    print(f"trainable parameters: reefl {trainable(ours):,}, peft {trainable(theirs):,}")
    print(f"forward, batch 2 at 224 px: reefl {_forward_seconds(ours, x, args.repeats):.3f} s, "
          f"peft {_forward_seconds(theirs, x, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
