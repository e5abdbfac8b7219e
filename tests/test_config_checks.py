"""Run-config values that used to pass validation and fail later (in numpy, in torch, or as a
run that trains nothing): each is now one ConfigError line naming the key."""

from __future__ import annotations

import pytest

from reefl import config as config_module
from reefl.config import ConfigError, RunConfig, method_setting_keys
from reefl.presets import preset_names, preset_path, read_config_file


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
        ({"seed": -1}, "seed must be an integer from 0 to 9223372036854775807"),
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


# -- issue 24: values that slipped past validation and started Flower or failed late -------
INT64 = "from -9223372036854775808 to 9223372036854775807 (Flower carries run-config " \
        "integers as 64-bit)"


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"dataset": ""}, "dataset must be a source name or a path, not empty (an empty path "
         "is the current folder, whose files would be read as a data set; write \".\" to mean "
         "it); got ''"),
        ({"output-dir": ""}, "output-dir must be a folder, not empty (run folders would be "
         "written into the current folder; write \".\" to mean it); got ''"),
        ({"output-dir": "  "}, "output-dir must be a folder, not empty (run folders would be "
         "written into the current folder; write \".\" to mean it); got '  '"),
        ({"num-server-rounds": 10**9}, "num-server-rounds must be an integer from 1 to 1000000 "
         "(1000 times the paper's 1000 rounds; even at one second a round that is 11.6 days); "
         "got '1000000000'"),
        ({"local-epochs": 10**5}, "local-epochs must be an integer from 1 to 10000 (passes "
         "over a client's data; 10000 is far beyond any recipe); got '100000'"),
        ({"personalised-epochs": 10**5}, "personalised-epochs must be an integer from 0 to "
         "10000 (passes over a client's data; 10000 is far beyond any recipe); got '100000'"),
        ({"seed": 2**70}, "seed must be an integer from 0 to 9223372036854775807 (2**63 - 1, "
         "the largest integer a Flower run config carries); got '1180591620717411303424'"),
        ({"seed": 2**63}, "seed must be an integer from 0 to 9223372036854775807 (2**63 - 1, "
         "the largest integer a Flower run config carries); got '9223372036854775808'"),
        ({"num-clients": 2**63}, f"num-clients must be an integer {INT64}; "
         "got '9223372036854775808'"),
        ({"kd-rounds": -(2**63) - 1}, f"kd-rounds must be an integer {INT64}; "
         "got '-9223372036854775809'"),
        ({"ree-heads": 2**64}, f"ree-heads must be an integer {INT64}; "
         "got '18446744073709551616'"),  # a method's setting
        ({"dirichlet-alpha": float("inf")}, "dirichlet-alpha must be a finite number > 0 (a "
         "large one, such as 1000.0, gives every client nearly the same class mix); got 'inf'"),
        ({"lr-max": float("nan")}, "lr-max must be a finite number; got 'nan'"),
        ({"max-update-norm": float("-inf")}, "max-update-norm must be a finite number; "
         "got '-inf'"),
        ({"ree-mlp-ratio": float("inf")}, "ree-mlp-ratio must be a finite number; got 'inf'"),
    ],
)  # fmt: skip
def test_out_of_range_value_is_one_exact_line(flat: dict, message: str) -> None:
    assert _rejected(flat) == message


def _keys_of_type(kind: type) -> list[str]:
    core = [f.replace("_", "-") for f, field in RunConfig.__dataclass_fields__.items()
            if str(field.type) == kind.__name__]
    defaults = RunConfig.from_flat({})
    own = [key for key in method_setting_keys()
           if type(getattr(defaults, key.replace("-", "_"))) is kind]
    return sorted(set(core) | set(own))


@pytest.mark.parametrize("key", _keys_of_type(int))
def test_every_integer_key_is_within_flowers_int64(key: str) -> None:
    assert _rejected({key: 2**63}).startswith(f"{key} must be an integer ")


@pytest.mark.parametrize("key", _keys_of_type(float))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_number_key_refuses_a_value_that_is_not_finite(key: str, value: float) -> None:
    assert _rejected({key: value}).startswith(f"{key} must be a finite number")


@pytest.mark.parametrize("flat", [{"num-server-rounds": 10**6}, {"local-epochs": 10**4},
                                  {"personalised-epochs": 10**4}, {"dirichlet-alpha": 1e300},
                                  {"dataset": "."}, {"output-dir": "."},
                                  {"num-clients": 2**63 - 1, "num-exits": 1}])
def test_largest_allowed_values_pass(flat: dict) -> None:
    RunConfig.from_flat(flat)


# one batch's memory: a lower bound, compared with this machine's memory by the launcher
GB = 25_300_000_000


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"img-size": 7000}, "img-size=7000 with batch-size=32: one training batch needs at "
         "least ~268.4 GB (1000001 tokens x embed-dim 64 x depth 4 x 8 values x 4 bytes per "
         "example, plus the input); this machine has 25.3 GB of memory in all"),
        ({"batch-size": 10**7}, "batch-size=10000000 with img-size=28: one training batch "
         "needs at least ~1424.0 GB (17 tokens x embed-dim 64 x depth 4 x 8 values x 4 bytes "
         "per example, plus the input); this machine has 25.3 GB of memory in all"),
        ({"eval-batch-size": 10**7}, "eval-batch-size=10000000 with img-size=28: one "
         "evaluation batch needs at least ~118.4 GB (17 tokens x embed-dim 64 x 2 values x 4 "
         "bytes per example, plus the input); this machine has 25.3 GB of memory in all"),
    ],
)  # fmt: skip
def test_a_batch_that_cannot_fit_is_refused_with_the_estimate(flat: dict, message: str) -> None:
    config = RunConfig.from_flat(flat)  # valid as such: another machine may have the memory
    with pytest.raises(ConfigError) as error:
        config.check_machine(GB)
    assert str(error.value) == message


def test_the_estimate_reads_this_machines_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RunConfig.from_flat({"img-size": 7000})
    monkeypatch.setattr(config_module, "machine_memory", lambda: 10**12)
    config.check_machine()  # fits a terabyte
    monkeypatch.setattr(config_module, "machine_memory", lambda: GB)
    with pytest.raises(ConfigError, match="this machine has 25.3 GB of memory in all$"):
        config.check_machine()


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_fits_a_small_machine(name: str) -> None:
    """The paper's experiments (DeiT-S, 224 px, batch 32; evaluation batch 128), and a batch
    of 64, fit 4 GB by the estimate (``k12``, a base, on top of ``paper``)."""
    from pathlib import Path

    from reefl.launch import run_config

    flat = {**run_config.app_defaults(Path.cwd()), **read_config_file(preset_path("paper")),
            **read_config_file(preset_path(name))}
    for batch in (flat["batch-size"], 64):
        RunConfig.from_flat({**flat, "batch-size": batch}).check_machine(4 * 10**9)
