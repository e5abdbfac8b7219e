"""``exit-standardise`` (docs/method.md §2b): every exit head of every method standardises its
input by running statistics that travel and are averaged like the parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reefl.config import ConfigError, RunConfig
from reefl.federation.local import run_local
from reefl.methods import build_method
from reefl.methods.base import ClientUpdate, TaskSpec
from reefl.models.heads import ExitHead, Standardise

METHODS = ("reefl", "depthfl", "inclusivefl", "scalefl", "exclusivefl")


def test_standardise_by_hand() -> None:
    """Training moves the running statistics towards the batch's (momentum 0.1; the variance
    unbiased), then standardises with them; evaluation uses them as they are."""
    layer = Standardise(2)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # batch mean (2, 4), unbiased var (2, 8)
    out = layer.train()(x)
    mean, var = torch.tensor([0.2, 0.4]), torch.tensor([0.9 + 0.2, 0.9 + 0.8])
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    expected = torch.tensor([[0.8 / math.sqrt(1.1 + 1e-5), 1.6 / math.sqrt(1.7 + 1e-5)],
                             [2.8 / math.sqrt(1.1 + 1e-5), 5.6 / math.sqrt(1.7 + 1e-5)]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.eval()(x), expected)  # same function in evaluation
    torch.testing.assert_close(layer.running_mean, mean)  # and no update there
    layer.train()(x[:1])  # one sample: no variance, so no update
    torch.testing.assert_close(layer.running_mean, mean)


def test_a_head_without_it_is_the_papers() -> None:
    torch.manual_seed(0)
    paper = ExitHead(8, 3)
    torch.manual_seed(0)
    standardised = ExitHead(8, 3, standardise=True)
    assert set(standardised.state_dict()) - set(paper.state_dict()) == {
        "standardise.running_mean", "standardise.running_var"}
    assert all(torch.equal(v, standardised.state_dict()[k]) for k, v in
               paper.state_dict().items())
    # the near-constant case: a shared vector plus a small per-sample part
    shared = torch.randn(1, 8) * 3
    x = shared + 0.05 * torch.randn(64, 8)  # per-sample variance 2.5e-3, well above eps
    for _ in range(200):
        standardised.standardise.train()(x)
    seen = standardised.standardise.eval()(x)
    assert seen.mean(0).abs().max() < 0.05 and (seen.std(0) - 1).abs().max() < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_every_method_sends_and_averages_the_running_statistics(method: str) -> None:
    cfg = RunConfig.from_flat({"method": method, "exit-standardise": True})
    m = build_method(cfg, TaskSpec(10, 1))
    for tier in range(m.num_exits):
        sent = m.trainable_keys(tier)
        stats = [k for k in sent if k.endswith(("running_mean", "running_var"))]
        heads = [n for n, mod in m.build_model(tier).named_modules() if isinstance(mod, ExitHead)]
        assert heads and sorted(stats) == sorted(f"{h}.standardise.{s}" for h in heads
                                                 for s in ("running_mean", "running_var"))
    # the server averages two clients' statistics like parameters (equal sizes: ScaleFL
    # counts clients, the others examples)
    state = m.initial_state()
    key = next(k for k in m.trainable_keys(0) if k.endswith("running_mean"))
    name = m.global_name(key, 0)
    payload = m.client_payload(state, 0)
    updates = [ClientUpdate(p, 0, {**payload, key: torch.full_like(payload[key], v)}, n)
               for p, (v, n) in enumerate([(1.0, 20), (3.0, 20)])]
    merged = m.aggregate(state, updates)
    assert torch.allclose(merged[name][: payload[key].numel()], torch.tensor(2.0))


def test_a_server_optimiser_is_refused() -> None:
    with pytest.raises(ConfigError, match="server-update must be fedavg when exit-standardise"):
        RunConfig.from_flat({"exit-standardise": True, "server-update": "fedadam"})


def test_a_run_learns_the_statistics_and_exports_them(tmp_path: Path) -> None:
    import numpy as np

    from reefl.anytime.export import OnnxTier, export_tier
    from reefl.anytime.model import load

    cfg = RunConfig.from_flat({
        "num-clients": 4, "num-exits": 2, "depth": 2, "embed-dim": 16, "num-heads": 2,
        "num-server-rounds": 2, "eval-every": 2, "fraction-train": 1.0, "local-epochs": 1,
        "train-examples": 300, "test-examples": 100, "seed": 1, "exit-standardise": True,
        "output-dir": str(tmp_path), "run-name": "run"})
    run_dir = run_local(cfg)
    state = load_file(str(run_dir / "model.safetensors"))
    assert not torch.equal(state["exits.head.standardise.running_mean"], torch.zeros(16))
    final = json.loads((run_dir / "final.json").read_text())
    exported = load(export_tier(run_dir, 1, tmp_path / "tier"))
    method = build_method(cfg, exported.bundle.task)
    model = method.build_model(1)
    model.load_state_dict(method.tier_state(state, 1))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.stack(model.eval()(x))
    torch.testing.assert_close(exported.exit_logits(x), expected, atol=1e-6, rtol=0)
    for mine, theirs in zip(OnnxTier(tmp_path / "tier").exit_logits(x.numpy()), expected,
                            strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-5)
    assert len(final["exit_accuracy"]) == 2
