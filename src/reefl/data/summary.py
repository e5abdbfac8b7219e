"""What a partition looks like before training: sizes, classes, and a per-client label
histogram (``reefl data``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reefl.data.federated import DataOptions, FederatedData

MIN_TEST_EXAMPLES = 100
MIN_TEST_PER_CLASS = 10
"""A global test set with fewer examples than ``MIN_TEST_EXAMPLES``, or fewer than
``MIN_TEST_PER_CLASS`` of one of its classes, is too small to rank methods: one example is
1 % of accuracy at 100, and a class with under 10 examples moves in steps of 10 %."""


def dataset_slug(dataset: str) -> str:
    """A file-name part for ``dataset`` (a name, or a path's last component), with anything
    but letters, digits, - and _ replaced by -."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(dataset).name)


def label_counts(data: FederatedData) -> np.ndarray:
    """[clients, classes] number of training examples of each class on each client."""
    labels = np.asarray(data.train.labels)
    return np.stack([np.bincount(labels[shard], minlength=data.num_classes)
                     for shard in data.client_indices])


def data_warnings(data: FederatedData, sampled: bool = False) -> list[str]:
    """One line for each reason the data may not measure what a run reports: what reading
    it dropped, a global test set lacking classes or too small to rank methods
    (``MIN_TEST_EXAMPLES``, ``MIN_TEST_PER_CLASS``), natural ids left unused, and training
    examples that no client, test or validation split holds (unless ``sampled``: the options
    draw a sample of the pool on purpose, ``train-examples``). Empty when all is well."""
    lines = list(data.spec.notes)
    test_labels = np.asarray(data.test.labels)[np.asarray(data.test_indices, dtype=np.int64)]
    present, counts = np.unique(test_labels, return_counts=True)
    if len(present) < data.num_classes:
        lines.append(f"the global test set holds examples of {len(present)} of the "
                     f"{data.num_classes} classes; accuracy says nothing of the others")
    if len(test_labels) < MIN_TEST_EXAMPLES or (len(counts) and counts.min()
                                                 < MIN_TEST_PER_CLASS):
        fewest = f", {int(counts.min())} of its rarest class" if len(counts) else ""
        lines.append(f"the global test set is too small to rank methods: "
                     f"{len(test_labels)} examples{fewest} (wanted: at least "
                     f"{MIN_TEST_EXAMPLES}, and {MIN_TEST_PER_CLASS} per class)")
    groups = data.train.groups
    if data.partitioner == "natural" and groups is not None:
        total = len(np.unique(np.asarray(groups)[np.asarray(groups) >= 0]))
        if len(data.client_groups) < total:
            lines.append(f"the data has {total} natural ids (speakers, writers...); "
                         f"num-clients={len(data.client_groups)} uses "
                         f"{len(data.client_groups)} of them")
    held = [*data.client_indices, data.validation_indices]
    if data.test is data.spec.train:
        held.append(data.test_indices)
    if data.local_test is data.spec.train:
        held += list(data.client_test_indices)
    used = len(np.unique(np.concatenate([np.asarray(h, np.int64) for h in held])))
    if used < len(data.train) and not sampled:
        lines.append(f"{len(data.train) - used} of the {len(data.train)} training examples "
                     "are in no client's data, no test and no validation split")
    return lines


def partition_summary(data: FederatedData, sampled: bool = False) -> dict[str, Any]:
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
        "warnings": data_warnings(data, sampled),
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
        *(f"warning         {line}" for line in summary.get("warnings", ())),
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
    summary = partition_summary(data, sampled=options.train_examples > 0)
    plot_label_histogram(data, path)
    return (json.dumps(summary, indent=2) if as_json else format_summary(summary)), path
