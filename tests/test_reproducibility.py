"""One seed fixes client sampling and local training; the defaults match pyproject.toml."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import torch

from reefl.config import RunConfig, registered_methods
from reefl.data import build_federated_data, client_loader, input_pipeline
from reefl.federation.strategy import sample_clients
from reefl.methods import TaskSpec, build_method
from reefl.training import train_locally

ROOT = Path(__file__).resolve().parents[1]


def test_runconfig_defaults_are_the_apps_defaults() -> None:
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert RunConfig.from_flat(app_config["config"]) == RunConfig.from_flat({})
    core = {k: v for k, v in RunConfig().to_flat().items() if k in app_config["config"]}
    assert core == {k: app_config["config"][k] for k in core}
    # the app lists every built-in method's settings, with the method's own default
    for spec in registered_methods().values():
        builtin = spec.factory.__module__.startswith("reefl.methods.")
        for setting in spec.settings if builtin else ():
            assert app_config["config"][setting.key] == setting.default, setting.key


def test_client_sampling_is_seeded_over_partition_ids() -> None:
    cfg = RunConfig.from_flat({"num-clients": 20, "fraction-train": 0.5, "seed": 0})
    ids = list(range(20))
    first = sample_clients(cfg, 1, ids)
    assert len(first) == 10 and set(first) <= set(ids)
    assert sample_clients(cfg, 1, ids[::-1]) == first  # independent of roster order
    assert sample_clients(cfg, 2, ids) != first  # a new draw each round
    other_seed = RunConfig.from_flat({"num-clients": 20, "fraction-train": 0.5, "seed": 1})
    assert sample_clients(other_seed, 1, ids) != first


def _train_once(loader_seed: int) -> dict[str, torch.Tensor]:
    # 500 training examples: client 1 holds about 100, four shuffled, augmented batches
    cfg = RunConfig.from_flat({"depth": 2, "num-exits": 2, "embed-dim": 16, "num-heads": 2,
                               "local-epochs": 1, "augment": True, "train-examples": 500})
    data = build_federated_data(replace(cfg.data_options, num_clients=4))
    pipeline = input_pipeline(data, cfg.img_size, pretrained=False, augment=cfg.augment)
    method = build_method(cfg, TaskSpec(num_classes=10, in_chans=1))
    torch.manual_seed(0)
    model = method.build_model(1)
    loader = client_loader(data, pipeline, 1, cfg.batch_size, loader_seed)
    train_locally(model, loader, method, cfg, 0.002, 1, torch.device("cpu"))
    return model.state_dict()


def test_local_training_is_reproducible_from_its_seed() -> None:
    first, again, other = _train_once(5), _train_once(5), _train_once(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
