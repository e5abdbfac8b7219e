"""Presets: every one resolves to a valid run config with the paper's settings, bases chain
in order, the command line wins, and a bad preset is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from reefl.config import RunConfig
from reefl.launch import errors, run_config
from reefl.methods.scalefl import tier_widths
from reefl.presets import PresetError, preset_names, preset_path, read_config_file

EXPERIMENTS = [f"{data}-{regime}-k{k}" for data in ("cifar100", "femnist", "speechcommands")
               for regime in ("frozen", "lora", "full") for k in (4, 12)]
DATA = {"cifar100": {"num-clients": 100, "partitioner": "equal-dirichlet"},
        "femnist": {"num-clients": 381}, "speechcommands": {"num-clients": 250,
                                                             "speech-classes": 12}}


def test_every_experiment_of_the_paper_has_a_preset() -> None:
    assert set(EXPERIMENTS) <= set(preset_names())


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_is_a_valid_config_with_the_official_recipe(name: str) -> None:
    data, regime, k = name.split("-")
    values = read_config_file(preset_path(name))
    cfg = RunConfig.from_flat({**run_config.app_defaults(Path.cwd()), **values})
    assert (cfg.dataset, cfg.regime, cfg.num_exits) == (data, regime, int(k[1:]))
    assert (cfg.model, cfg.pretrained, cfg.img_size) == ("deit-small", "official", 224)
    assert (cfg.optimizer, cfg.lr_max, cfg.lr_min) == ("sgd", 0.05, 0.001)
    assert (cfg.local_epochs, cfg.batch_size, cfg.clip_value) == (1, 32, 1.0)
    assert (cfg.num_server_rounds, cfg.fraction_train, cfg.kd_rounds) == (1000, 0.1, 300)
    assert cfg.augment and all(values[key] == v for key, v in DATA[data].items())
    if cfg.num_exits == 12:
        assert cfg.exit_block_list == list(range(12)) and len(tier_widths(cfg)) == 12


def test_bases_merge_in_order_and_the_file_wins(tmp_path: Path) -> None:
    (tmp_path / "one.toml").write_text('seed = 1\nnum-clients = 5\n')
    (tmp_path / "two.toml").write_text('seed = 2\n')
    (tmp_path / "top.toml").write_text('base = ["one", "two", "k12"]\nnum-clients = 7\n')
    assert read_config_file(tmp_path / "top.toml") == {
        "seed": 2, "num-clients": 7, "num-exits": 12,
        "scalefl-widths": "0.25,0.3,0.35,0.4,0.48,0.55,0.61,0.69,0.75,0.84,0.92,1.0"}


def test_a_base_loop_and_an_unknown_base_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('base = "b"\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    with pytest.raises(PresetError, match="loops"):
        read_config_file(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('base = "no-such-preset"\n')
    with pytest.raises(PresetError, match="unknown preset 'no-such-preset'"):
        read_config_file(tmp_path / "c.toml")


def test_the_command_line_applies_on_top_of_a_preset() -> None:
    overrides = run_config.with_preset("cifar100-lora-k4", ['method="depthfl" num-clients=10'])
    prepared = run_config.prepare_run(overrides)
    assert prepared.config["regime"] == "lora" and prepared.config["method"] == "depthfl"
    assert prepared.config["num-clients"] == 10 and prepared.config["dataset"] == "cifar100"
    with pytest.raises(errors.RunConfigError, match="unknown preset 'nope'; presets: "):
        run_config.with_preset("nope", [])
