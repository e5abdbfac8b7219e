"""Index-level splits: a stratified global test set and Dirichlet label skew over clients."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

# Smallest client we ask flwr-datasets for: enough for a few SGD steps, small enough that
# alpha = 0.1 over 20 clients of a 4,000-example pool is normally met on the first draws.
MIN_PARTITION_SIZE = 10


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No progress bars from flwr-datasets (its NaturalIdPartitioner runs a bare ``tqdm``,
    given ``disable=True`` here) nor from Hugging Face ``datasets`` while partitioning: they
    would leak onto reefl's stderr. Both are restored afterwards."""
    from functools import partial

    import datasets
    from flwr_datasets.partitioner import natural_id_partitioner as natural

    bar, bars_were_on = natural.tqdm, datasets.is_progress_bar_enabled()
    natural.tqdm = partial(bar, disable=True)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        natural.tqdm = bar
        if bars_were_on:
            datasets.enable_progress_bars()


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int | list[int]
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
    with warnings.catch_warnings(), quiet_progress():
        warnings.simplefilter("ignore")  # it warns on every re-draw; we report the outcome
        return [
            np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
            for i in range(num_clients)
        ]


def draw_by_mix(labels: np.ndarray, mixes: np.ndarray, per_client: int,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Give client i ``per_client`` examples whose classes follow ``mixes[i]`` (a row of
    class proportions), without replacement across clients, clients in order.

    A class that runs out is dropped from the client's mix and its share redrawn over the
    classes left, so every client gets exactly ``per_client`` examples while the pool lasts.
    Returns sorted indices into ``labels``; labels outside the mixes' classes are never drawn.
    """
    num_classes = mixes.shape[1]
    available = int(((labels >= 0) & (labels < num_classes)).sum())
    if per_client * len(mixes) > available:
        raise ValueError(f"{len(mixes)} clients x {per_client} examples exceed the "
                         f"{available} available")
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    remaining = np.array([len(p) for p in pools])
    shards = []
    for mix in mixes:
        take, need = np.zeros(num_classes, dtype=np.int64), per_client
        while need > 0:
            available = remaining - take
            weights = np.where(available > 0, mix, 0.0)
            if weights.sum() <= 0:
                weights = (available > 0).astype(float)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), available)
            take += draw
            need -= int(draw.sum())
        shard = []
        for c in np.flatnonzero(take):
            shard.extend(pools[c][:take[c]])
            del pools[c][:take[c]]
        remaining -= take
        shards.append(np.sort(np.asarray(shard, dtype=np.int64)))
    return shards


def equal_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                              num_classes: int | None = None
                              ) -> tuple[list[np.ndarray], np.ndarray]:
    """The ReeFL paper's CIFAR-100 split: every client gets the same number of examples
    (the pool's size // num_clients; the remainder is left out) and its own class
    proportions p_i ~ Dir(alpha) (not flwr-datasets' per-class Dirichlet, whose client sizes
    vary). Returns the shards and the proportions [num_clients, classes]; ``num_classes``
    (default: the largest label + 1) must cover classes the pool may lack, so that the
    proportions also fit another split (the test set) that has them."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng([seed, 1])
    mixes = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_clients)
    return draw_by_mix(labels, mixes, len(labels) // num_clients, rng), mixes


def select_groups(groups: np.ndarray, num_clients: int, rule: str, seed: int) -> np.ndarray:
    """The natural ids that become clients 0..num_clients-1, in that order: the
    ``num_clients`` groups with most examples (``"largest"``, ties by id) or a seeded sample
    (``"sample"``), sorted by id."""
    ids, counts = np.unique(groups[groups >= 0], return_counts=True)
    if num_clients > len(ids):
        raise ValueError(f"num-clients={num_clients} but the data has only {len(ids)} "
                         "natural ids (writers, speakers...)")
    if rule == "largest":
        chosen = ids[np.lexsort((ids, -counts))[:num_clients]]
    else:
        chosen = np.random.default_rng([seed, 2]).choice(ids, num_clients, replace=False)
    return np.sort(chosen)


def natural_partition(groups: np.ndarray, chosen: np.ndarray, seed: int) -> list[np.ndarray]:
    """One shard per chosen natural id, through flwr-datasets' NaturalIdPartitioner.
    Examples without a group (-1, e.g. Speech Commands' silence clips) are dealt out to
    the chosen clients uniformly at random (seeded); examples of other groups are unused."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    client_of = np.full(len(groups), -1, dtype=np.int64)
    client_of[np.isin(groups, chosen)] = np.searchsorted(chosen, groups[np.isin(groups, chosen)])
    loose = np.flatnonzero(groups < 0)
    client_of[loose] = np.random.default_rng([seed, 3]).integers(0, len(chosen), len(loose))
    used = np.flatnonzero(client_of >= 0)
    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = Dataset.from_dict({"client": client_of[used], "index": used})
    with warnings.catch_warnings(), quiet_progress():
        warnings.simplefilter("ignore")
        return [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                for i in range(len(chosen))]


def split_per_class(indices: np.ndarray, labels: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) of one client's examples: round(fraction * n_c) of each class c in
    test, but at most n_c - 1 (every class keeps a training example, so a class with one
    example stays in train)."""
    test = [rng.permutation(indices[labels[indices] == c])[: min(round(fraction * count),
                                                                 count - 1)]
            for c, count in zip(*np.unique(labels[indices], return_counts=True), strict=True)]
    test_idx = np.sort(np.concatenate(test)) if test else indices[:0]
    return np.setdiff1d(indices, test_idx), test_idx
