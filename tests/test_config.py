"""Run-config validation: bad values stop the run with one line naming the key."""

from __future__ import annotations

import pytest

from reefl.config import ConfigError, RunConfig
from reefl.federation.tiers import client_tier, tier_of


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"method": "fedsomething"}, "method"),
        ({"num-exits": 5, "depth": 4}, "num-exits"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha"),
        ({"dirichlet-alpha": -1.0}, "dirichlet-alpha"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"distillation": "sideways"}, "distillation"),
        ({"exit-blocks": "3,1,2,0"}, "exit-blocks"),
        ({"tier-rule": "ratios", "tier-ratios": "1,1"}, "tier-ratios"),
        ({"num-clients": "many"}, "num-clients"),
        ({"no-such-key": 1}, "no-such-key"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat(override)
    message = str(error.value)
    assert key in message and "\n" not in message


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = RunConfig.from_flat({"num-clients": 8, "fraction-train": 1})
    assert cfg.fraction_train == 1.0
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_tier_rules() -> None:
    cfg = RunConfig.from_flat({"num-clients": 8, "num-exits": 4})
    assert [tier_of(i, cfg) for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    ratios = RunConfig.from_flat({"num-clients": 10, "num-exits": 4, "tier-rule": "ratios",
                                  "tier-ratios": "4,3,2,1"})
    assert [tier_of(i, ratios) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    assert client_tier(5, cfg, {"tier": 3}) == 3  # a device may state its own tier
    assert client_tier(5, cfg, {}) == 1
