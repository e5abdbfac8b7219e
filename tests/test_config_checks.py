"""Run-config values that used to pass validation and fail later (in numpy, in torch, or as a
run that trains nothing): each is now one ConfigError line naming the key."""

from __future__ import annotations

import pytest

from reefl.config import ConfigError, RunConfig


def _rejected(flat: dict) -> str:
    """The one-line ConfigError message ``flat`` gives."""
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat(flat)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("flat", "start"),
    [
        ({"seed": -1}, "seed must be an integer >= 0; got '-1'"),
        ({"mlp-ratio": 0.0}, "mlp-ratio must be a number > 0"),
        ({"mlp-ratio": -1.0}, "mlp-ratio must be a number > 0"),  # torch: negative dimension
        ({"ree-mlp-ratio": 0.0}, "ree-mlp-ratio must be a number > 0"),
        ({"ree-mlp-ratio": -0.5}, "ree-mlp-ratio must be a number > 0"),
        ({"lr-max": 0.0}, "lr-max must be a number > 0"),  # not lr-min's rule
        ({"lr-max": -1.0, "lr-min": -2.0}, "lr-max must be a number > 0"),
    ],
)
def test_bad_value_names_its_key(flat: dict, start: str) -> None:
    assert _rejected(flat).startswith(start)


@pytest.mark.parametrize("flat", [{"seed": 0}, {"seed": 2**63 - 1}, {"mlp-ratio": 0.5},
                                  {"ree-mlp-ratio": 0.1}, {"lr-max": 1e-3, "lr-min": 1e-3}])
def test_edge_values_still_pass(flat: dict) -> None:
    RunConfig.from_flat(flat)


# -- ExclusiveFL trains only the deepest tier: a rule that gives it no client is rejected ----
@pytest.mark.parametrize(
    ("flat", "start"),
    [
        ({"num-clients": 3, "num-exits": 4}, "num-clients must be >= num-exits (4)"),
        ({"num-clients": 10, "num-exits": 4, "tier-rule": "ratios", "tier-ratios": "1,1,1,0"},
         "tier-ratios must give tier 3"),
        # the last run, 0.01 of the ids, is shorter than the gap between two ids' centres
        ({"num-clients": 10, "num-exits": 4, "tier-rule": "ratios",
          "tier-ratios": "1,1,1,0.01"}, "tier-ratios must give tier 3"),
    ],
)
def test_exclusivefl_without_deepest_clients_is_rejected(flat: dict, start: str) -> None:
    message = _rejected({"method": "exclusivefl", **flat})
    assert message.startswith(start) and "exclusivefl" in message and "maximum" in message


@pytest.mark.parametrize(
    "flat",
    [
        {"num-clients": 4, "num-exits": 4},
        {"num-clients": 3, "num-exits": 4, "maximum": True},  # every client is tier 3
        {"num-clients": 10, "num-exits": 4, "tier-rule": "ratios", "tier-ratios": "1,1,1,0.2"},
        {"num-clients": 10, "num-exits": 4, "tier-rule": "ratios", "tier-ratios": "1,1,1,0",
         "maximum": True},
    ],
)
def test_exclusivefl_with_a_deepest_client_passes(flat: dict) -> None:
    RunConfig.from_flat({"method": "exclusivefl", **flat})


def test_other_methods_run_without_deepest_clients() -> None:
    """Every other method trains every tier: three clients of four exits is fine."""
    RunConfig.from_flat({"method": "reefl", "num-clients": 3, "num-exits": 4})
