"""Decoding examples of any source into reefl's arrays, naming the file that fails.

Images of any mode become grey (1 channel) when every image is grey, RGB (3) otherwise; of
any size, they are kept at their size when all share one, else resized once to the run's
``img-size`` square (training then crops and resizes per batch). Audio of any sampling rate,
channel count and length becomes log-mel features (``reefl.data.audio``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reefl.data.spec import DataError

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
MAX_PIXELS = 40_000_000
"""Largest image decoded, in pixels (width x height): 40 megapixels, e.g. 8000 x 5000. A
larger one is refused with one line naming the file and its size, read from its header
before any pixel is decoded (a 20000 x 20000 PNG would take 1.2 GB as RGB; PIL calls images
over 179 megapixels decompression bombs and warns from 89)."""


def _open_source(item: Any) -> Any:
    """A path string or Path as is; bytes as a file object."""
    return io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item


def decode_images(items: Sequence[Any], names: Sequence[str], size: int) -> np.ndarray:
    """uint8 [N, C, H, W] from image files or bytes; ``names`` say which failed.

    Two passes, so that no more than one decoded image is held besides the result: the
    headers first (modes and sizes decide channels and whether to resize), then the pixels.
    """
    from PIL import Image, UnidentifiedImageError

    def opened(item: Any, name: str) -> Image.Image:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # opening reads the header only; MAX_PIXELS applies
        try:
            image = Image.open(_open_source(item))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"cannot read image {name}: {_first_line(err)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
        width, height = image.size
        if width * height > MAX_PIXELS:
            image.close()
            raise DataError(f"image {name} is {width}x{height} pixels "
                            f"({width * height / 1e6:.0f} megapixels), more than the "
                            f"{MAX_PIXELS / 1e6:.0f} reefl decodes; downscale it")
        return image

    if not items:
        raise DataError("no images to decode")
    headers = []
    for item, name in zip(items, names, strict=True):
        with opened(item, name) as image:
            headers.append((image.mode, image.size))
    grey = all(mode in GREY_MODES for mode, _ in headers)
    sizes = {image_size for _, image_size in headers}
    width, height = sizes.pop() if len(sizes) == 1 else (size, size)
    out = np.empty((len(items), 1 if grey else 3, height, width), dtype=np.uint8)
    for i, (item, name) in enumerate(zip(items, names, strict=True)):
        with opened(item, name) as image:
            try:
                image = image.convert("L" if grey else "RGB")
            except (OSError, ValueError) as err:  # truncated or corrupt pixel data
                raise DataError(f"cannot read image {name}: {_first_line(err)}") from None
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        out[i] = array[None] if grey else array.transpose(2, 0, 1)
    return out


def frames_used(rate: int) -> int:
    """How many frames of a ``rate`` Hz recording the features can depend on: the 1.295 s
    that ``NUM_FRAMES`` feature frames span, plus 0.1 s for the resampling filter to see past
    the cut (``resample_poly``'s filter reaches 10 input samples, times the rate over 16 kHz
    when that is larger, so 0.1 s covers any rate), plus 64. A longer file is read only this
    far: its features are the ones the whole file would give, bit for bit."""
    from reefl.data.audio import FRAME_LENGTH_MS, FRAME_SHIFT_MS, NUM_FRAMES

    span_ms = (NUM_FRAMES - 1) * FRAME_SHIFT_MS + FRAME_LENGTH_MS
    return math.ceil(span_ms * rate / 1000) + rate // 10 + 64


def read_audio(item: Any, name: str) -> tuple[np.ndarray, int]:
    """A mono float32 waveform and its sampling rate, from a file or bytes: its first
    ``frames_used`` frames only, so memory does not grow with the recording's length."""
    import soundfile

    try:
        with soundfile.SoundFile(_open_source(item)) as sound:
            rate = sound.samplerate
            wave = sound.read(frames=min(sound.frames, frames_used(rate)) if sound.frames > 0
                              else -1, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as err:  # soundfile.LibsndfileError
        raise DataError(f"cannot read audio {name}: {_first_line(err)}") from None
    if len(wave) == 0:
        raise DataError(f"audio {name} has no samples")
    return wave.mean(axis=1), int(rate)


def decode_audio(items: Sequence[Any], names: Sequence[str]) -> np.ndarray:
    """float16 log-mel features [N, 1, frames, mel bins] from audio files or bytes."""
    from reefl.data.audio import clip_features

    waves, rates = zip(*(read_audio(item, name) for item, name in zip(items, names,
                                                                      strict=True)), strict=True)
    return clip_features(list(waves), list(rates))[:, None].astype(np.float16)


def missing_label(value: Any) -> str:
    """Why ``value`` is no label ("empty": None or blank text; "NaN": a float NaN or the
    text nan in any case), or "" for a label."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty"
    if isinstance(value, str):
        return "NaN" if value.strip().lower() == "nan" else ""
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return "NaN"
    return ""


def check_labels(values: Sequence[Any], column: str, where: str) -> None:
    """One DataError line naming ``where``, the column and the first row (0-based) whose
    label is NaN or empty: such a row would otherwise become a class of its own."""
    for row, value in enumerate(values):
        if what := missing_label(value):
            raise DataError(f"{where} row {row}: column '{column}' holds {what} label "
                            f"{value!r}; every example needs a label (fill or drop the row)")


def label_codes(values: Sequence[Any], column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as int64 codes 0..K-1 (sorted distinct values) and the class names."""
    check_labels(values, column, "labels")
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
    codes = {v: i for i, v in enumerate(distinct)}
    return np.array([codes[v] for v in values], dtype=np.int64), tuple(map(str, distinct))


def group_codes(values: Sequence[Any]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Natural ids as int32 codes into sorted distinct names; empty, None or NaN gives
    -1 (no natural id)."""
    names = sorted({str(v) for v in values if not missing_label(v)})
    codes = {name: i for i, name in enumerate(names)}
    return (np.array([-1 if missing_label(v) else codes[str(v)] for v in values],
                     dtype=np.int32), tuple(names))


def check_classes(labels: np.ndarray, where: str | Path) -> None:
    """A classification set needs at least two classes."""
    if len(np.unique(labels)) < 2:
        raise DataError(f"{where} has only one class; a classifier needs at least two")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
