"""validation-fraction: a held-out split of the training pool that no client trains on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reefl.config import ConfigError, RunConfig
from reefl.data.federated import _partition, hold_out_validation
from reefl.data.sources import load_source


def test_hold_out_by_hand() -> None:
    labels = np.array([0] * 10 + [1] * 20)
    pool = np.arange(30)
    rest, held = hold_out_validation(pool, labels, 0.1, [0, 8])
    assert sorted(np.bincount(labels[held]).tolist()) == [1, 2]  # 10 % of each class
    assert sorted(np.concatenate([rest, held]).tolist()) == pool.tolist()
    same_rest, same_held = hold_out_validation(pool, labels, 0.0, [0, 8])
    assert same_rest is pool and len(same_held) == 0


@pytest.mark.parametrize("partitioner", ["dirichlet", "natural"])
def test_no_client_holds_a_validation_example(partitioner: str) -> None:
    cfg = RunConfig.from_flat({"num-clients": 5})
    options = dataclasses.replace(cfg.data_options, validation_fraction=0.2)
    spec = load_source(options.source)
    if partitioner == "natural":  # the embedded digits have no writers: make five groups
        groups = np.arange(len(spec.train.labels)) % 5
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, groups=groups),
                                   group_names=tuple("abcde"))
        options = dataclasses.replace(options, partitioner="natural")
    data = _partition(spec, options)
    shards = np.concatenate(data.client_indices)
    assert len(np.intersect1d(shards, data.validation_indices)) == 0
    assert data.test is data.train  # the embedded digits: the test set is split off train
    assert len(np.intersect1d(data.test_indices, data.validation_indices)) == 0
    share = len(data.validation_indices) / (len(shards) + len(data.validation_indices))
    assert share == pytest.approx(0.2, abs=0.01)


def test_validation_fraction_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"validation-fraction must be a number in \[0, 0.5\)"):
        RunConfig.from_flat({"validation-fraction": 0.5})
