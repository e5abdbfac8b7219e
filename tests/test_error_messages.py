"""Every rejected run-config value is one line, ``reefl: error: <key> must be <rule>; got
'<value>'``, through the real CLI: values that Flower's own parser rejects (where it says only
"invalid format"), values of the wrong type, values that break a rule, and cross-key rules
(the key whose own value is wrong is blamed first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reefl.cli import main
from reefl.config import KIND_RULES, ConfigError, RunConfig, method_setting_keys

RULES = "|".join(KIND_RULES.values())


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line ``reefl <argv>`` writes to stderr (it must fail with code 2 and print
    nothing else)."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("reefl: error: ")
    return lines[0].removeprefix("reefl: error: ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # rejected by Flower's parser (its message: "...is in an invalid format...")
        ("num-clients=abc", "num-clients must be an integer; got 'abc'"),
        ('dataset="cifar100', "dataset must be a string in matching quotes; got '\"cifar100'"),
        ("dataset=cifar100", "dataset must be a string in quotes; got 'cifar100'"),
        ("augment=maybe", "augment must be true or false; got 'maybe'"),
        ("augment=True", "augment must be true or false; got 'True'"),
        ("lr-max=1e-3x", "lr-max must be a number; got '1e-3x'"),
        ("ree-heads=x", "ree-heads must be an integer; got 'x'"),
        ("seed=[1", "seed must be an integer; got '[1'"),
        ("seed=1 seed=2", "seed is given twice in 'seed=1 seed=2'"),
        # parsed, but of the wrong type (was: "seed must be a int, got 1.5")
        ("seed=1.5", "seed must be an integer; got '1.5'"),
        ("augment=1", "augment must be true or false; got '1'"),
        ('num-clients="3"', "num-clients must be an integer; got '\"3\"'"),
        ('lr-max="fast"', "lr-max must be a number; got '\"fast\"'"),
        ("dataset=true", "dataset must be a string in quotes; got 'true'"),
        ("modulation=0", "modulation must be true or false; got '0'"),
        # a rule of the key's own value
        ("num-clients=0", "num-clients must be an integer >= 1; got '0'"),
        ("dirichlet-alpha=0.0", "dirichlet-alpha must be a number > 0; got '0.0'"),
        ("fraction-train=1.5", "fraction-train must be a number in (0, 1]; got '1.5'"),
        ("test-fraction=1.0", "test-fraction must be a number in (0, 1); got '1.0'"),
        ("clip-value=-1.0", "clip-value must be a number >= 0 (0 turns clipping off); "
                            "got '-1.0'"),
        ("round-timeout=0.0", "round-timeout must be a number of seconds > 0; got '0.0'"),
        ("num-exits=9", "num-exits must be an integer from 1 to the number of blocks (4); "
                        "got '9'"),
        ('regime="prompt"', "regime must be one of frozen, full, lora, sa, pa, ssf; "
                            "got 'prompt'"),
        ('exit-blocks="1,x"', "exit-blocks must be 4 comma-separated, increasing block "
                              "indices in 0..3; got '1,x'"),
        ('tier-rule="ratios" tier-ratios="1,2"', "tier-ratios must be 4 comma-separated "
         "non-negative numbers with a positive sum; got '1,2'"),
        # cross-key rules: each key's own rule first (was: lr-max=-0.1 blamed lr-min)
        ("lr-max=-0.1", "lr-max must be a number > 0; got '-0.1'"),
        ("lr-max=-0.1 lr-min=-0.2", "lr-max must be a number > 0; got '-0.1'"),
        ("lr-min=0.0", "lr-min must be a number > 0; got '0.0'"),
        ("lr-max=0.00005", "lr-min must be at most lr-max (5e-05); got '0.0001'"),
        ("embed-dim=66", "embed-dim must be a multiple of num-heads (4); got '66'"),
        ("patch-size=5", "img-size must be a multiple of patch-size (5); got '28'"),
        ("ree-attn-dim=18", "ree-attn-dim must be a multiple of ree-heads (8); got '18'"),
        ('run-name="a/b"', "run-name must be a plain folder name (no '/'); got 'a/b'"),
        # issue 24: values that started Flower, or failed inside it in a traceback
        ('dataset=""', "dataset must be a source name or a path, not empty (an empty path is "
                       "the current folder, whose files would be read as a data set; write "
                       "\".\" to mean it); got ''"),
        ('output-dir=""', "output-dir must be a folder, not empty (run folders would be "
                          "written into the current folder; write \".\" to mean it); got ''"),
        ("num-server-rounds=1000000000", "num-server-rounds must be an integer from 1 to "
         "1000000 (1000 times the paper's 1000 rounds; even at one second a round that is "
         "11.6 days); got '1000000000'"),
        ("seed=1180591620717411303424", "seed must be an integer from 0 to "
         "9223372036854775807 (2**63 - 1, the largest integer a Flower run config carries); "
         "got '1180591620717411303424'"),
        ("dirichlet-alpha=inf", "dirichlet-alpha must be a finite number > 0 (a large one, "
         "such as 1000.0, gives every client nearly the same class mix); got 'inf'"),
        ("lr-min=nan", "lr-min must be a finite number; got 'nan'"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_its_key_and_value(
        override: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _error_line(capsys, ["costs", "-c", override]) == message


@pytest.mark.parametrize(
    "command",
    [["run"], ["compare", "-m", "reefl", "-o", "{tmp}/cmp"], ["costs"], ["data"],
     ["pretrain"], ["deploy", "--nodes", "2"]],
    ids=lambda argv: argv[0],
)
def test_every_command_parses_the_run_config_alike(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [part.format(tmp=tmp_path) for part in command]
    # compare checks every run's config first and names the run a value fails in
    run = "reefl (seed 0): " if command[0] == "compare" else ""
    for override, message in [("num-clients=abc", "num-clients must be an integer; got 'abc'"),
                              ("eval-every=1.5", f"{run}eval-every must be an integer; got '1.5'"),
                              ("lr-max=-0.1", f"{run}lr-max must be a number > 0; got '-0.1'")]:
        assert _error_line(capsys, [*argv, "-c", override]) == message
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_a_compare_entry_names_the_entry_and_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _error_line(capsys, ["compare", "-m", "reefl[seed=x]", "-o", str(tmp_path)]) == (
        "--methods entry 'reefl[seed=x]': seed must be an integer; got 'x'")


def test_a_bad_value_in_a_config_file_names_its_key_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('num-clients = 10\nseed = abc\ndataset = "cifar100"\n')
    assert _error_line(capsys, ["costs", "-c", str(path)]) == (
        f"seed must be an integer; got 'abc' ({path}, line 2)")
    path.write_text("num-clients = 10\nseed = 1.5\n")  # TOML, of the wrong type
    assert _error_line(capsys, ["costs", "-c", str(path)]) == (
        f"seed must be an integer; got '1.5' (set in {path})")
    path.write_text("num-client = 10\n")  # a key the app does not declare
    assert _error_line(capsys, ["costs", "-c", str(path)]) == (
        f"unknown run-config key 'num-client' in {path} (not in the app's "
        "[tool.flwr.app.config]); did you mean 'num-clients'?")


def _every_key() -> list[str]:
    core = [name.replace("_", "-") for name in RunConfig.__dataclass_fields__
            if name != "method_settings"]
    return sorted(set(core) | method_setting_keys())


@pytest.mark.parametrize("key", _every_key())
def test_every_key_names_its_type_in_words(key: str) -> None:
    """A value of the wrong type (a TOML array) for any key: the key, its type in words
    (never "a int", "a bool"), and the value as written."""
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat({key: [1]})
    assert str(error.value).startswith(f"{key} must be ")
    assert str(error.value).split(" must be ")[1] in {f"{rule}; got '[1]'"
                                                       for rule in RULES.split("|")}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("img-size=7000", "img-size=7000 with batch-size=32: one training batch needs at least "
         "~268.4 GB (1000001 tokens x embed-dim 64 x depth 4 x 8 values x 4 bytes per example, "
         "plus the input); this machine has 16.0 GB of memory in all"),
        ("batch-size=10000000", "batch-size=10000000 with img-size=28: one training batch "
         "needs at least ~1424.0 GB (17 tokens x embed-dim 64 x depth 4 x 8 values x 4 bytes "
         "per example, plus the input); this machine has 16.0 GB of memory in all"),
    ],
)  # fmt: skip
def test_a_batch_this_machine_cannot_hold_is_one_line_with_the_estimate(
        override: str, message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("reefl.config.machine_memory", lambda: 16 * 10**9)
    assert _error_line(capsys, ["costs", "-c", override]) == message


def test_the_estimate_names_the_file_that_set_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("reefl.config.machine_memory", lambda: 16 * 10**9)
    path = tmp_path / "big.toml"
    path.write_text("img-size = 7000\n")
    assert _error_line(capsys, ["costs", "-c", str(path)]).endswith(
        f"this machine has 16.0 GB of memory in all (set in {path})")
