"""What every data source returns: arrays of one split, and the data set they form.

Sources differ (a CSV in a wheel, IDX files, the Hugging Face hub, a folder, an archive) but
they all end as a ``DataSpec``, so partitioning, loaders and federation never ask which source
it was. Inputs are stored compactly and may be memory-mapped from the on-disk cache:
images as uint8 [N, C, H, W] at their stored size, audio as float16 log-mel features
[N, 1, frames, mel bins] (computed once, see ``reefl.data.audio``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the file, folder or column."""


@dataclass(frozen=True)
class Split:
    """The examples of one split: inputs, labels and (optionally) a natural id per example.

    ``groups`` holds, per example, an index into ``DataSpec.group_names`` (the writer, the
    speaker...) or -1 for an example that belongs to no group (Speech Commands' silence).
    """

    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSpec:
    """A labelled data set: a training split, an optional test split, and how to augment it.

    ``natural`` says how clients come from ``groups`` when the source has a natural
    partition: ``"sample"`` (a seeded sample of groups, as for FEMNIST's writers) or
    ``"largest"`` (the groups with the most examples, as for Speech Commands' speakers);
    "" when it has none. ``crop_scale`` and ``flip`` are the training augmentation of
    images under ``augmentation="crop"`` (RandomResizedCrop's area range; horizontal flips,
    wrong for characters); ``"translate"`` shifts by up to 2 pixels instead (digits).
    ``noise`` holds background-noise features [K, frames, mel bins] for audio augmentation.
    """

    name: str
    kind: str
    train: Split
    num_classes: int
    class_names: tuple[str, ...]
    test: Split | None = None
    group_names: tuple[str, ...] = ()
    natural: str = ""
    augmentation: str = "crop"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    noise: np.ndarray | None = field(default=None, repr=False)
    notes: tuple[str, ...] = ()
    """What reading the data dropped, one line each (e.g. duplicated metadata.csv rows)."""

    @property
    def channels(self) -> int:
        """Input channels as stored (1 for grey images and for audio features)."""
        return int(self.train.inputs.shape[1])
