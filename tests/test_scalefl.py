"""ScaleFL (docs/method.md §6): width slicing, element-wise count-based averaging, tier models, the
exit evaluator and the loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from reefl.config import ConfigError, RunConfig
from reefl.methods import ClientUpdate, TaskSpec, build_method
from reefl.methods.aggregate import slice_to, sliced_mean, weighted_mean_per_key
from reefl.methods.scalefl import ScaleFL, scaled_channels
from reefl.models import EarlyExitModel, PerExitHeads, VisionTransformer

TASK = TaskSpec(num_classes=5, in_chans=1)
# d = 20, 4 heads, MLP hidden 40, 4 blocks with one exit each, widths 0.4/0.55/0.75/1.0:
#   tier 0: d 8,  attention 8,              hidden 16
#   tier 1: d 11, attention 11 -> 12 (4·3), hidden 22
#   tier 2: d 15, attention 15 -> 16 (4·4), hidden 30
#   tier 3: d 20, attention 20,             hidden 40
SMALL = {"method": "scalefl", "img-size": 8, "patch-size": 4, "embed-dim": 20, "depth": 4,
         "num-heads": 4, "num-exits": 4, "mlp-ratio": 2.0}


def _method(**overrides) -> ScaleFL:
    return build_method(RunConfig.from_flat({**SMALL, **overrides}), TASK)


def _global_state(method: ScaleFL) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach() for k, v in method.build_global_model().state_dict().items()}


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_slice_to_keeps_the_first_channels_of_every_dimension() -> None:
    matrix = torch.arange(16.0).reshape(4, 4)
    # [[0, 1, 2, 3], [4, 5, 6, 7], ...] -> first 2 rows, first 3 columns
    torch.testing.assert_close(slice_to(matrix, (2, 3)), torch.tensor([[0.0, 1, 2], [4, 5, 6]]))
    pos = torch.arange(24.0).reshape(1, 3, 8)  # a dimension that is not scaled keeps its size
    torch.testing.assert_close(slice_to(pos, (1, 3, 2)), pos[:, :, :2])
    with pytest.raises(ValueError, match="does not fit"):
        slice_to(matrix, (5, 1))
    with pytest.raises(ValueError, match="does not fit"):
        slice_to(matrix, (2,))


def test_sliced_mean_averages_each_element_over_the_clients_covering_it() -> None:
    global_state = {"w": torch.full((3, 3), 9.0), "idle": torch.tensor([7.0])}
    narrow = {"w": torch.tensor([[1.0]])}
    middle = {"w": torch.tensor([[4.0, 8.0], [2.0, 6.0]])}
    wide = {"w": torch.tensor([[10.0, 0.0, 3.0], [4.0, 4.0, 5.0]])}
    merged = sliced_mean(global_state, [(narrow, 1.0), (middle, 1.0), (wide, 1.0)])
    # (0,0): (1 + 4 + 10)/3 = 5; (0,1): (8 + 0)/2 = 4; (0,2): 3 (wide only);
    # (1,0): (2 + 4)/2 = 3; (1,1): (6 + 4)/2 = 5; (1,2): 5; row 2: nobody, stays 9
    expected = torch.tensor([[5.0, 4.0, 3.0], [3.0, 5.0, 5.0], [9.0, 9.0, 9.0]])
    torch.testing.assert_close(merged["w"], expected)
    torch.testing.assert_close(merged["idle"], torch.tensor([7.0]))
    assert global_state["w"][0, 0].item() == 9.0  # the input is not modified

    weighted = sliced_mean(global_state, [(narrow, 10), (middle, 30), (wide, 60)])
    # (0,0): (10·1 + 30·4 + 60·10)/100 = 7.3; (0,1): (30·8 + 60·0)/90 = 2.6667;
    # (1,0): (30·2 + 60·4)/90 = 3.3333; (1,1): (30·6 + 60·4)/90 = 4.6667
    expected = torch.tensor([[7.3, 8 / 3, 3.0], [10 / 3, 14 / 3, 5.0], [9.0, 9.0, 9.0]])
    torch.testing.assert_close(weighted["w"], expected)


def test_sliced_mean_of_full_tensors_is_the_per_key_weighted_mean() -> None:
    global_state = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    updates = [({"a": torch.full((2, 2), 1.0), "b": torch.tensor([1.0, 2.0, 3.0])}, 10),
               ({"a": torch.full((2, 2), 4.0)}, 30)]
    expected = weighted_mean_per_key(global_state, updates)
    for key, value in sliced_mean(global_state, updates).items():
        torch.testing.assert_close(value, expected[key])


def test_scalefl_aggregation_counts_clients_not_examples() -> None:
    method = _method()
    global_state = _global_state(method)
    key = "exits.heads.0.fc.bias"  # [5], not width-scaled: every tier holds all of it
    updates = [ClientUpdate(tier, tier, {key: torch.full((5,), float(tier))}, 10 ** tier)
               for tier in range(3)]
    merged = method.aggregate(global_state, updates)
    torch.testing.assert_close(merged[key], torch.full((5,), 1.0))  # (0 + 1 + 2)/3
    untouched = "exits.heads.3.fc.bias"
    torch.testing.assert_close(merged[untouched], global_state[untouched])


def test_tier_models_have_the_scaled_shapes() -> None:
    method = _method()
    shapes = {name: tuple(s) for name, s in method.tier_shapes(1).items()}
    assert shapes["backbone.patch_embed.proj.weight"] == (11, 1, 4, 4)
    assert shapes["backbone.patch_embed.proj.bias"] == (11,)
    assert shapes["backbone.cls_token"] == (1, 1, 11)
    assert shapes["backbone.pos_embed"] == (1, 5, 11)  # class token + 4 patches, all kept
    assert shapes["backbone.blocks.1.norm1.weight"] == (11,)
    assert shapes["backbone.blocks.1.attn.q.weight"] == (12, 11)  # 11 rounded up to 4·3
    assert shapes["backbone.blocks.1.attn.v.bias"] == (12,)
    assert shapes["backbone.blocks.1.attn.proj.weight"] == (11, 12)
    assert shapes["backbone.blocks.1.mlp.fc1.weight"] == (22, 11)
    assert shapes["backbone.blocks.1.mlp.fc2.weight"] == (11, 22)
    assert shapes["exits.heads.1.norm.weight"] == (11,)
    assert shapes["exits.heads.1.fc.weight"] == (5, 11)  # classes are not scaled
    assert not any(name.startswith("backbone.blocks.2") for name in shapes)
    widths = [(method.tier_width(t).embed_dim, method.tier_width(t).attn_dim,
               method.tier_width(t).mlp_hidden) for t in range(4)]
    assert widths == [(8, 8, 16), (11, 12, 22), (15, 16, 30), (20, 20, 40)]
    model = method.build_model(1)
    assert model.backbone.blocks[0].attn.scale == pytest.approx(3**-0.5)  # narrow head size 3
    assert scaled_channels(0.29, 100) == 29  # 0.29·100 = 28.999… in floating point


def test_client_payload_is_the_leading_block_of_every_global_tensor() -> None:
    method = _method()
    global_state = _global_state(method)
    payload = method.client_payload(global_state, 0)
    assert set(payload) == set(method.trainable_keys(0))
    q = "backbone.blocks.0.attn.q.weight"
    torch.testing.assert_close(payload[q], global_state[q][:8, :8], rtol=0, atol=0)
    model = method.build_model(0)
    model.load_state_dict(payload, strict=True)  # exactly the tier model's shapes
    assert [tuple(z.shape) for z in model(_images())] == [(3, 5)]


def test_full_width_tier_is_a_plain_vit_with_per_exit_heads() -> None:
    method = _method()
    global_state = _global_state(method)
    plain = EarlyExitModel(
        VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=20, depth=4,
                          num_heads=4, mlp_ratio=2.0),
        PerExitHeads(20, 5, [0, 1, 2, 3]))
    plain.load_state_dict(global_state, strict=True)
    scalefl = method.build_global_model()
    scalefl.load_state_dict(global_state, strict=True)
    x = _images()
    for a, b in zip(scalefl.eval()(x), plain.eval()(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exit_k_is_evaluated_with_tier_k_width_and_depth() -> None:
    method = _method()
    global_state = _global_state(method)
    x = _images()
    with torch.no_grad():
        logits = method.exit_evaluator(global_state).eval()(x)
        full = method.build_global_model()
        full.load_state_dict(global_state)
        full_logits = full.eval()(x)
        assert len(logits) == 4
        for tier in range(4):
            model = method.build_model(tier)
            model.load_state_dict(method.client_payload(global_state, tier))
            torch.testing.assert_close(logits[tier], model.eval()(x)[tier], rtol=0, atol=0)
        torch.testing.assert_close(logits[3], full_logits[3], rtol=0, atol=0)
        assert not torch.allclose(logits[0], full_logits[0])  # tier 0 is narrower


LN3 = math.log(3.0)
# Three exits, one example, two classes, label 0; the deepest exit (2) teaches, τ = 3:
#   exit 2 logits [3 ln 3, 0]: p2^τ = softmax([ln 3, 0]) = [0.75, 0.25];  CE2 = ln(28/27)
#   exit 0 logits [0, 0]:      p0^τ = [0.5, 0.5];                        CE0 = ln 2
#   exit 1 logits [0, 3 ln 3]: p1^τ = [0.25, 0.75];                      CE1 = ln 28
#   KL(p2 ‖ p0) = 0.75·ln 1.5 + 0.25·ln 0.5 = 0.130812
#   KL(p2 ‖ p1) = 0.75·ln 3 + 0.25·ln(1/3) = 0.549306
#   loss = ln 2 + ln 28 + ln(28/27) + 0.05·9·(0.130812 + 0.549306)
#        = 0.693147 + 3.332205 + 0.036368 + 0.306053 = 4.367773
LOGITS = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 3 * LN3]]),
          torch.tensor([[3 * LN3, 0.0]])]
LABELS = torch.tensor([0])


def test_loss_is_summed_ce_plus_weighted_kl_from_the_deepest_exit() -> None:
    method = _method(**{"num-exits": 3, "depth": 3, "scalefl-widths": "0.5,0.75,1.0"})
    logits = [z.clone().requires_grad_() for z in LOGITS]
    loss, ces = method.local_loss(logits, LABELS, 1, method.new_loss_state())
    assert ces == pytest.approx([0.693147, 3.332205, 0.036368], abs=1e-6)
    assert loss.item() == pytest.approx(4.367773, abs=1e-5)
    loss.backward()
    # the teacher gets only its CE gradient: p2 − onehot = [27/28 − 1, 1/28]
    torch.testing.assert_close(logits[2].grad, torch.tensor([[-1 / 28, 1 / 28]]))
    single, _ = method.local_loss(LOGITS[:1], LABELS, 1, None)  # a tier-0 client: CE only
    assert single.item() == pytest.approx(math.log(2), abs=1e-6)
    no_kd = _method(**{"num-exits": 3, "depth": 3, "scalefl-widths": "0.5,0.75,1.0",
                       "scalefl-kd-weight": 0.0})
    assert no_kd.local_loss(LOGITS, LABELS, 1, None)[0].item() == pytest.approx(
        0.693147 + 3.332205 + 0.036368, abs=1e-5)


@pytest.mark.parametrize("widths", ["0.5,1.0", "0.5,0.4,0.75,1.0", "0.4,0.55,0.75,0.9",
                                    "0,0.55,0.75,1.0", "a,b,c,d", "0.01,0.55,0.75,1.0"])
def test_bad_widths_are_one_line_errors_naming_the_key(widths: str) -> None:
    with pytest.raises(ConfigError, match="^scalefl-widths must be") as error:
        RunConfig.from_flat({**SMALL, "scalefl-widths": widths})  # 0.01·20 < 1 channel
    assert "\n" not in str(error.value)


def test_widths_are_checked_only_for_scalefl() -> None:
    RunConfig.from_flat({"method": "reefl", "num-exits": 2})  # no ScaleFL widths for K = 2
    with pytest.raises(ConfigError, match="^scalefl-widths must be given for num-exits=2"):
        RunConfig.from_flat({"method": "scalefl", "num-exits": 2})
    RunConfig.from_flat({"method": "scalefl", "num-exits": 2, "scalefl-widths": "1,1"})
    with pytest.raises(ConfigError, match="^scalefl-kd-temperature"):
        RunConfig.from_flat({**SMALL, "scalefl-kd-temperature": 0.0})


DEIT_S = {"method": "scalefl", "model": "deit-small", "img-size": 224}


def test_paper_widths_and_exits_by_default_for_4_and_12_exits() -> None:
    four = _method(**DEIT_S)
    assert four.widths == [0.4, 0.55, 0.75, 1.0]
    assert four.exit_blocks == [3, 5, 8, 11]  # ScaleFL's own, not §1's 2, 5, 8, 11
    twelve = _method(**DEIT_S, **{"num-exits": 12})
    assert twelve.widths == [0.25, 0.3, 0.35, 0.4, 0.48, 0.55, 0.61, 0.69, 0.75, 0.84, 0.92,
                             1.0]
    assert twelve.exit_blocks == list(range(12))
    assert _method(**DEIT_S, **{"exit-blocks": "2,5,8,11"}).exit_blocks == [2, 5, 8, 11]
    assert _method().exit_blocks == [0, 1, 2, 3]  # 4 blocks: §1's rule


def test_mlp_hidden_width_follows_the_narrowed_embedding() -> None:
    # DeiT-S d = 384, MLP 4·d. Tier 0 (w 0.4): ⌊153.6⌋ = 153 channels, MLP int(153·4) = 612
    # (⌊0.4·1536⌋ would be 614); attention 153 rounded up to 6 heads · 26 = 156.
    widths = [_method(**DEIT_S).tier_width(t) for t in range(4)]
    assert [(w.embed_dim, w.attn_dim, w.mlp_hidden) for w in widths] == [
        (153, 156, 612), (211, 216, 844), (288, 288, 1152), (384, 384, 1536)]
