"""Index-level splits: a stratified global test set and Dirichlet label skew over clients."""

import warnings

import numpy as np

# Smallest client we ask flwr-datasets for: enough for a few SGD steps, small enough that
# alpha = 0.1 over 20 clients of a 4,000-example pool is normally met on the first draws.
MIN_PARTITION_SIZE = 10


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, test) indices with test_fraction of every class in test, so the global
    test set keeps the source's label balance whatever the client skew."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in np.unique(labels)]
    test = np.sort(np.concatenate([idx[: round(test_fraction * len(idx))] for idx in per_class]))
    return np.setdiff1d(np.arange(len(labels)), test), test


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Share example indices out over clients with Dirichlet(alpha) label skew (smaller alpha,
    more skew).

    Every client is first asked for MIN_PARTITION_SIZE examples (at most half a fair share, so
    small pools work). flwr-datasets re-draws up to 10 times and then raises; we then retry, with a
    warning, asking for one example per client (an empty client could not train), then give up.
    """
    preferred = max(1, min(MIN_PARTITION_SIZE, len(labels) // (2 * num_clients)))
    for min_size in dict.fromkeys((preferred, 1)):
        try:
            return _flwr_dirichlet(labels, num_clients, alpha, seed, min_size)
        except ValueError as exc:
            error = exc
            if min_size > 1:
                warnings.warn(
                    f"Dirichlet partitioning (alpha={alpha}, {num_clients} clients) could not "
                    f"give every client {min_size} examples; falling back to a minimum of 1",
                    stacklevel=2,
                )
    raise ValueError(
        f"Dirichlet partitioning of {len(labels)} examples over {num_clients} clients with "
        f"alpha={alpha} failed ({error}); raise alpha or use fewer clients"
    ) from error


def _flwr_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Run flwr-datasets' DirichletPartitioner on the labels alone, reading indices back from a
    column."""
    # Imported here: they take seconds to import, which code that only validates config avoids.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on every re-draw; we report the outcome
        return [
            np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(num_clients)
        ]
