"""``reefl.outputs.tables``: one table, as Markdown (files) and as rich renders it (the terminal),
and the tables reefl prints through it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from reefl.anytime.calibrate import format_operating_points
from reefl.outputs.run_folder import format_final_table
from reefl.outputs.tables import markdown, print_table, table, text

SAMPLE = table(["entry", "runs", "acc %"],
               [["reefl[modulation=false]", "2", "81.00 ± 1.41"], ["a|b", "1", "7.00"],
                ["mean", "", "44.00"]],
               align="llr", sections=[1], title="two entries · seeds 0, 1")


def test_markdown_is_padded_aligned_and_escaped() -> None:
    assert markdown(SAMPLE).splitlines() == [
        "| entry                   | runs |        acc % |",
        "|-------------------------|------|-------------:|",
        "| reefl[modulation=false] | 2    | 81.00 ± 1.41 |",
        "| a\\|b                    | 1    |         7.00 |",
        "| mean                    |      |        44.00 |",
    ]


def test_text_is_rich_plain_and_stable() -> None:
    assert text(SAMPLE).splitlines() == [
        "two entries · seeds 0, 1",
        "entry                     runs          acc %",
        "─" * 45,
        "reefl[modulation=false]   2      81.00 ± 1.41",  # brackets are no rich markup
        "a|b                       1              7.00",
        "─" * 45,
        "mean                                    44.00",
    ]
    assert text(SAMPLE) == text(SAMPLE, width=60)  # narrower than any of reefl's: the same


def test_print_table_off_a_terminal_prints_the_text() -> None:
    stream = io.StringIO()
    print_table(SAMPLE, stream)
    assert stream.getvalue() == text(SAMPLE) + "\n"


def test_print_table_on_a_terminal_uses_rich() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    print_table(SAMPLE, stream)
    out = stream.getvalue()
    assert "\x1b[1m" in out  # the header in bold
    assert "reefl[modulation=false]" in out and "81.00 ± 1.41" in out


def test_a_row_of_the_wrong_width_or_a_bad_alignment_is_refused() -> None:
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="align must be one of 'l'/'r' per column"):
        table(["a", "b"], [["x", "y"]], align="lc")


FINAL = {"method": "reefl", "seed": 0, "rounds": 3, "wall_seconds": 41.6,
         "exit_blocks": [0, 1, 2, 3], "exit_accuracy": [61.25, 70.5, 74.0, 75.125],
         "exit_loss": [1.2345, 0.98, 0.8, 0.75], "mean_accuracy": 70.21875,
         "ensemble_accuracy": 76.0}


def test_final_table() -> None:
    assert format_final_table(FINAL).splitlines() == [
        "reefl · seed 0 · 3 rounds · 42 s of training",
        "exit       block   accuracy %    loss",
        "─" * 37,
        "0              0        61.25   1.234",
        "1              1        70.50   0.980",
        "2              2        74.00   0.800",
        "3              3        75.12   0.750",
        "─" * 37,
        "mean                    70.22",
        "ensemble                76.00",
    ]


def test_operating_points_table() -> None:
    record = {"tiers": [
        {"tier": 0, "exit_flops": [1_350_000], "thresholds": [0.0], "test_accuracy": 70.0,
         "test_flops": 1_350_000},
        {"tier": 1, "exit_flops": [1_350_000, 2_630_000], "thresholds": [float("inf"), 0.0],
         "test_accuracy": 77.5, "test_flops": 2_630_000},
        {"tier": 2, "exit_flops": [1, 2, 4_000_000], "thresholds": [0.9, 0.75, 0.0],
         "test_accuracy": 80.0, "test_flops": 3_000_000},
    ]}
    assert format_operating_points(record).splitlines() == [
        "tier   test acc %   MFLOPs/img   of deepest   thresholds",
        "─" * 57,
        "0           70.00        1.350       100.0%   (one exit)",
        "1           77.50        2.630       100.0%   -",
        "2           80.00        3.000        75.0%   0.900 0.750",
    ]


def test_calibrate_command_prints_the_operating_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from reefl.anytime import calibrate
    from reefl.cli import main

    record = {"method": "reefl", "seed": 3, "tiers": [
        {"tier": 0, "exit_flops": [2_000_000], "thresholds": [0.0], "test_accuracy": 51.0,
         "test_flops": 2_000_000}]}
    monkeypatch.setattr(calibrate, "calibrate_run", lambda folder, **_: record)
    (tmp_path / "config.json").write_text("{}")
    assert main(["calibrate", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "reefl · seed 3",
        "tier   test acc %   MFLOPs/img   of deepest   thresholds",
        "─" * 56,
        "0           51.00        2.000       100.0%   (one exit)",
        f"wrote {tmp_path / 'accuracy_vs_flops.png'}",
    ]
