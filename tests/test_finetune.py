"""Fine-tuning regimes (docs/method.md §5): the maths of LoRA, adapters and SSF, what trains in each
regime, that nothing frozen moves, and pretrained weights in the federated model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY, timm_checkpoint
from reefl.config import REGIMES, ConfigError, RunConfig
from reefl.methods import TaskSpec, build_method, method_names
from reefl.models import VisionTransformer
from reefl.models.checkpoints import load_backbone
from reefl.models.finetune import (
    Regime,
    add_adapter,
    add_lora,
    add_scale_shift,
    apply_regime,
)
from reefl.models.vit import trunc_normal_
from reefl.training import train_locally

TASK = TaskSpec(num_classes=5, in_chans=1)
SMALL = {**TINY, "lora-rank": 2, "lora-alpha": 6.0, "adapter-dim": 3}


def _method(**overrides: object):  # noqa: ANN202
    return build_method(RunConfig.from_flat({**SMALL, **overrides}), TASK)


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# -- the maths, against hand computations ------------------------------------------------
def test_lora_adds_alpha_over_rank_times_b_a_x() -> None:
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    add_lora(linear, rank=1, alpha=4.0)  # scaling 4
    with torch.no_grad():
        linear.lora_a.copy_(torch.tensor([[1.0, 2.0]]))   # A x = 1·3 + 2·4 = 11
        linear.lora_b.copy_(torch.tensor([[0.1], [-1.0]]))
    out = linear(torch.tensor([[3.0, 4.0]]))
    # W x + b = [3.5, 3.5]; (α/r)·B A x = 4·[1.1, −11] = [4.4, −44]
    torch.testing.assert_close(out, torch.tensor([[7.9, -40.5]]))


def test_lora_starts_with_b_at_zero_and_a_random() -> None:
    linear = nn.Linear(4, 3)
    add_lora(linear, rank=2, alpha=4.0)
    assert linear.lora_a.shape == (2, 4) and linear.lora_b.shape == (3, 2)
    assert torch.count_nonzero(linear.lora_b) == 0 and torch.count_nonzero(linear.lora_a) == 8


def test_ssf_scales_and_shifts_each_channel() -> None:
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    add_scale_shift(linear, 2)
    with torch.no_grad():
        linear.ssf_scale.copy_(torch.tensor([2.0, -1.0]))
        linear.ssf_shift.copy_(torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(linear(torch.tensor([[3.0, 4.0]])), torch.tensor([[6.5, -3.0]]))


def _set_adapter(sublayer: nn.Module) -> None:
    """down = [[1, −1]] with bias 0.5, up = [[2], [1]] with bias [0, 1] (ReLU between)."""
    with torch.no_grad():
        sublayer.adapter.down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        sublayer.adapter.down.bias.fill_(0.5)
        sublayer.adapter.up.weight.copy_(torch.tensor([[2.0], [1.0]]))
        sublayer.adapter.up.bias.copy_(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("sequential", [True, False])
def test_adapters_read_the_output_in_sequence_and_the_input_in_parallel(sequential: bool
                                                                         ) -> None:
    sublayer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        sublayer.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the channels
    add_adapter(sublayer, dim=2, hidden=1, sequential=sequential)
    _set_adapter(sublayer)
    x = torch.tensor([[3.0, 1.0]])  # o = swap(x) = [1, 3]
    # sequential reads o: z = 1 − 3 + 0.5 = −1.5, ReLU 0, up: [0, 1]; o + [0, 1] = [1, 4]
    # parallel reads x: z = 3 − 1 + 0.5 = 2.5, ReLU 2.5, up: [5, 3.5]; o + that = [6, 6.5]
    expected = [[1.0, 4.0]] if sequential else [[6.0, 6.5]]
    torch.testing.assert_close(sublayer(x), torch.tensor(expected))


# -- initialisation (docs/method.md §5, as the official code) ----------------------------
def test_adapter_linears_start_like_the_vit_s_truncated_normal_with_zero_bias() -> None:
    sublayer = nn.Linear(192, 192)
    torch.manual_seed(3)
    add_adapter(sublayer, dim=192, hidden=32, sequential=True)
    adapter = sublayer.adapter
    torch.manual_seed(3)  # the same draws: two nn.Linear, then vit.py's init, down first
    down, up = nn.Linear(192, 32), nn.Linear(32, 192)
    trunc_normal_(down.weight, std=0.02)
    trunc_normal_(up.weight, std=0.02)
    assert torch.equal(adapter.down.weight, down.weight)
    assert torch.equal(adapter.up.weight, up.weight)
    assert torch.count_nonzero(adapter.down.bias) == 0
    assert torch.count_nonzero(adapter.up.bias) == 0
    for weight in (adapter.down.weight, adapter.up.weight):  # 6144 draws each
        # N(0, 0.02) cut at ±2 std: |w| ≤ 0.04 and std 0.02·√(1 − 4φ(2)/(2Φ(2) − 1)) = 0.01759
        assert weight.abs().max() <= 0.04
        assert weight.std().item() == pytest.approx(0.01759, rel=0.04)
    assert isinstance(adapter.act, nn.ReLU)


def test_ssf_starts_at_plain_normals_around_one_and_zero() -> None:
    linear = nn.Linear(2, 2)
    torch.manual_seed(5)
    add_scale_shift(linear, 20000)
    torch.manual_seed(5)  # as the official init_ssf_scale_shift: scale first, then shift
    scale = torch.empty(20000).normal_(mean=1.0, std=0.02)
    shift = torch.empty(20000).normal_(mean=0.0, std=0.02)
    assert torch.equal(linear.ssf_scale, scale) and torch.equal(linear.ssf_shift, shift)
    assert linear.ssf_scale.mean().item() == pytest.approx(1.0, abs=1e-3)
    assert linear.ssf_shift.std().item() == pytest.approx(0.02, rel=0.03)
    # not truncated: P(|z| > 2) = 4.55%, about 910 of 20000 beyond 2 std
    assert 700 < int(((linear.ssf_scale - 1).abs() > 0.04).sum()) < 1100


# -- which parameters each regime trains ---------------------------------------------------
def _trainable(regime: str, method: str = "reefl") -> list[str]:
    return _method(method=method, regime=regime).trainable_keys(1)


def test_frozen_trains_the_exit_module_alone() -> None:
    method = _method(regime="frozen")
    for tier in range(4):
        model = method.build_model(tier)
        assert method.trainable_keys(tier) == [f"exits.{n}" for n, _ in
                                               model.exits.named_parameters()]


def test_full_trains_everything() -> None:
    method = _method(regime="full")
    assert method.trainable_keys(2) == [n for n, _ in method.build_model(2).named_parameters()]


def _suffixes(keys: list[str]) -> set[str]:
    """The distinct backbone parameter names a regime trains, with the block index dropped."""
    return {k.split(".", 3)[-1] for k in keys if k.startswith("backbone.")}


def test_lora_trains_a_and_b_of_q_and_v_in_the_tier_s_blocks_only() -> None:
    keys = _trainable("lora")
    assert _suffixes(keys) == {"attn.q.lora_a", "attn.q.lora_b", "attn.v.lora_a",
                               "attn.v.lora_b"}
    assert {k.split(".")[2] for k in keys if k.startswith("backbone.")} == {"0", "1"}
    assert not any("lora" in k for k in keys if k.startswith("exits."))  # Ree is not adapted


@pytest.mark.parametrize("regime", ["sa", "pa"])
def test_adapters_sit_on_attention_and_mlp(regime: str) -> None:
    assert _suffixes(_trainable(regime)) == {
        f"{part}.adapter.{layer}.{p}" for part in ("attn", "mlp") for layer in ("down", "up")
        for p in ("weight", "bias")}


def test_ssf_covers_every_place_method_section_5_lists() -> None:
    keys = _trainable("ssf")
    places = {k.rsplit(".", 1)[0] for k in keys if k.endswith("ssf_scale")}
    assert places == {"backbone.patch_embed", "exits.head.norm"} | {
        f"backbone.blocks.{i}.{m}" for i in (0, 1) for m in (
            "attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")}
    assert {k.replace("ssf_scale", "ssf_shift") for k in keys if "ssf_scale" in k} <= set(keys)
    heads = _trainable("ssf", method="depthfl")  # one head per exit: each head's norm
    assert {"exits.heads.0.norm.ssf_scale", "exits.heads.1.norm.ssf_scale"} <= set(heads)


def test_an_unknown_regime_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="frozen, full, lora, sa, pa, ssf"):
        apply_regime(nn.Linear(2, 2), Regime("prompt", 1, 1.0, 1))


@pytest.mark.parametrize("regime", ["lora", "sa", "pa", "ssf"])
def test_only_lora_starts_as_the_model_it_adapts(regime: str) -> None:
    """LoRA with B at zero leaves every exit's logits exactly unchanged; the adapters (a
    random up-projection) and SSF (random scale and shift) do not."""
    method = _method(regime=regime)
    torch.manual_seed(0)
    plain = method.build_architecture(3).eval()
    adapted = apply_regime(copy.deepcopy(plain), method.regime).eval()
    assert len(adapted.state_dict()) > len(plain.state_dict())
    x = _images()
    for a, b in zip(plain(x), adapted(x), strict=True):
        assert torch.equal(a, b) == (regime == "lora")
    with torch.no_grad():  # the added parameters are live: moving them moves every exit
        for key, p in adapted.named_parameters():
            if key.endswith(("lora_b", "up.weight", "ssf_shift")):
                p.normal_(std=0.1)
    for a, b in zip(plain(x), adapted(x), strict=True):
        assert not torch.allclose(a, b)


# -- nothing outside the trainable set moves ------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("name", method_names())
def test_a_local_step_changes_only_trainable_parameters(name: str, regime: str) -> None:
    cfg = RunConfig.from_flat({**SMALL, "method": name, "regime": regime, "local-epochs": 1,
                               "scalefl-widths": "0.5,0.5,0.75,1.0", "lr-max": 0.05})
    method = build_method(cfg, TASK)
    tier = method.num_exits - 1
    torch.manual_seed(0)
    model = method.build_model(tier)
    with torch.no_grad():  # move LoRA's B off zero (and the adapters' up-projection)
        for key, p in model.named_parameters():
            if key.endswith(("lora_b", "up.weight")):
                p.normal_(std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(_images(4), torch.tensor([0, 1, 2, 3]))
    train_locally(model, DataLoader(data, batch_size=4), method, cfg, 0.05, 1,
                  torch.device("cpu"))
    after = model.state_dict()
    trainable = set(method.trainable_keys(tier))
    frozen = [k for k in after if k not in trainable]
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    moved = {k for k in trainable if not torch.equal(after[k], before[k])}
    assert moved and (regime != "full" or frozen == [])
    if regime not in ("frozen", "full"):
        assert any(k.startswith("backbone.") for k in moved)  # the adapters learn


# -- frozen weights come from the initial state, never from the server ------------------------
def test_client_model_takes_frozen_weights_from_the_initial_state() -> None:
    from reefl.federation.client_app import _setup, tier_model

    cfg = RunConfig.from_flat({**SMALL, "method": "scalefl", "regime": "lora",
                               "scalefl-widths": "0.5,0.5,0.75,1.0"})
    method = _setup(cfg)[2]  # the client's own, on the run's data
    initial = method.initial_state()
    payload = {k: v + 1.0 for k, v in method.client_payload(initial, 0).items()}
    model = tier_model(method, initial, 0, payload)
    state = model.state_dict()
    sliced = method.tier_state(initial, 0)
    for key, value in state.items():
        expected = payload[key] if key in payload else sliced[key]
        assert torch.equal(value, expected), key
    assert "backbone.blocks.0.attn.q.weight" not in payload
    assert [k for k, p in model.named_parameters() if p.requires_grad] == list(payload)


def test_initial_state_depends_on_the_seed_only() -> None:
    a, b = _method(seed=4).initial_state(), _method(seed=4).initial_state()
    torch.manual_seed(123)
    c = _method(seed=4).initial_state()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["exits.meta_token"], _method(seed=5).initial_state()
                           ["exits.meta_token"])


def _checkpoint_file(tmp_path: Path, method_cfg: dict[str, object]) -> Path:
    cfg = RunConfig.from_flat({**SMALL, **method_cfg})
    bb = cfg.backbone
    torch.manual_seed(42)
    backbone = VisionTransformer(img_size=cfg.img_size, patch_size=bb["patch_size"],
                                 in_chans=1, embed_dim=bb["embed_dim"], depth=bb["depth"],
                                 num_heads=bb["num_heads"], mlp_ratio=bb["mlp_ratio"])
    path = tmp_path / "deit.pth"
    torch.save({"model": timm_checkpoint(backbone)}, path)
    return path


@pytest.mark.parametrize("name", method_names())
def test_pretrained_weights_reach_every_backbone_tensor_of_every_tier(
        name: str, tmp_path: Path) -> None:
    path = _checkpoint_file(tmp_path, {})
    method = _method(method=name, regime="lora", pretrained=str(path),
                     **({"scalefl-widths": "0.5,0.5,0.75,1.0"} if name == "scalefl" else {}))
    initial = method.initial_state()
    for tier in range(method.num_exits):
        arch = method.build_architecture(tier)
        load_backbone(arch.backbone, str(path), "custom", allow_narrower=True)
        expected = {f"backbone.{k}": v for k, v in arch.backbone.state_dict().items()}
        got = method.tier_state(initial, tier, list(expected))
        for key, value in expected.items():
            assert torch.equal(got[key], value), (tier, key)
    qkv = torch.load(path, weights_only=True)["model"]["blocks.1.attn.qkv.weight"]
    assert torch.equal(initial["backbone.blocks.1.attn.k.weight"], qkv[16:32])  # d = 16
    if name == "inclusivefl":  # tier 1's own copy of its top block
        assert torch.equal(initial["tiers.1.block.attn.k.weight"], qkv[16:32])
    assert torch.count_nonzero(initial["backbone.blocks.0.attn.q.lora_b"]) == 0


def test_a_missing_checkpoint_or_a_named_one_without_deit_is_a_config_error(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^pretrained must be"):
        RunConfig.from_flat({"pretrained": str(tmp_path / "nope.pth")})
    with pytest.raises(ConfigError, match="^model must be one of deit-tiny"):
        RunConfig.from_flat({"pretrained": "official"})
    with pytest.raises(ConfigError, match="^regime must be one of frozen, full, lora"):
        RunConfig.from_flat({"regime": "prefix"})
    with pytest.raises(ConfigError, match="^lora-rank must be"):
        RunConfig.from_flat({"lora-rank": 0})
