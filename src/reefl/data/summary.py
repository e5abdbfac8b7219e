"""What a partition looks like before training: sizes, classes, and a per-client label
histogram (``reefl data``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reefl.data.federated import DataOptions, FederatedData


def dataset_slug(dataset: str) -> str:
    """A file-name part for ``dataset`` (a name, or a path's last component), with anything
    but letters, digits, - and _ replaced by -."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(dataset).name)


def label_counts(data: FederatedData) -> np.ndarray:
    """[clients, classes] number of training examples of each class on each client."""
    labels = np.asarray(data.train.labels)
    return np.stack([np.bincount(labels[shard], minlength=data.num_classes)
                     for shard in data.client_indices])


def partition_summary(data: FederatedData) -> dict[str, Any]:
    """Clients, examples per client (min/median/max, train and local test), classes per
    client, and the global test set's size."""
    counts = label_counts(data)
    sizes = counts.sum(axis=1)
    local = np.array([len(t) for t in data.client_test_indices])

    def spread(values: np.ndarray) -> dict[str, float]:
        return {"min": int(values.min()), "median": float(np.median(values)),
                "max": int(values.max())}

    return {
        "source": data.spec.name, "kind": data.spec.kind, "classes": data.num_classes,
        "partitioner": data.partitioner, "clients": len(sizes),
        "train_examples": int(sizes.sum()), "test_examples": len(data.test_indices),
        "examples_per_client": spread(sizes), "local_test_per_client": spread(local),
        "classes_per_client": spread((counts > 0).sum(axis=1)),
        "input_shape": list(data.train.inputs.shape[1:]),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines."""
    def spread(key: str) -> str:
        s = summary[key]
        return f"min {s['min']}, median {s['median']:g}, max {s['max']}"

    return "\n".join([
        f"source          {summary['source']} ({summary['kind']}, input "
        f"{'x'.join(map(str, summary['input_shape']))}, {summary['classes']} classes)",
        f"partition       {summary['partitioner']}, {summary['clients']} clients, "
        f"{summary['train_examples']} training examples",
        f"per client      {spread('examples_per_client')} examples",
        f"classes/client  {spread('classes_per_client')}",
        f"local test      {spread('local_test_per_client')} examples per client",
        f"global test     {summary['test_examples']} examples",
    ])


def plot_label_histogram(data: FederatedData, path: Path) -> Path:
    """A PNG heat map: one row per client, one column per class, colour = examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_counts(data)
    clients, classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(16, max(8, 4 + 0.12 * classes)),
                                    min(12, max(4, 2.5 + 0.08 * clients))))
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client (partition id)")
    ax.set_title(f"{Path(data.spec.name).name}: training examples per client and class\n"
                 f"{data.partitioner} partition, {clients} clients", fontsize=10)
    fig.colorbar(image, ax=ax, label="examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def histogram_path(options: DataOptions, output_dir: Path) -> Path:
    """``<output_dir>/data-<dataset>-s<seed>-<digest>.png``: the digest (8 hex digits of
    SHA-256 over every option that fixes the partition) gives other options another file."""
    import hashlib

    digest = hashlib.sha256(repr(options).encode()).hexdigest()[:8]
    name = dataset_slug(options.source.dataset)
    return output_dir / f"data-{name}-s{options.seed}-{digest}.png"


def write_summary(options: DataOptions, output_dir: Path,
                  output: Path | None = None, as_json: bool = False) -> tuple[str, Path]:
    """``reefl data``: partition the data of ``options``, draw its label histogram at
    ``output`` (default ``histogram_path``) and return the summary (text, or JSON with
    ``as_json``) and the PNG's path. DataError for data that cannot be read."""
    import json

    from reefl.data import build_federated_data

    data = build_federated_data(options)
    path = output or histogram_path(options, output_dir)
    summary = partition_summary(data)
    plot_label_histogram(data, path)
    return (json.dumps(summary, indent=2) if as_json else format_summary(summary)), path
