"""Every table reefl shows: one ``Table`` of strings, rendered as Markdown for files
(costs.md, comparison.md) and with rich for the terminal.

The text form is rich's, with fixed settings (no colour, a fixed width wider than any of
reefl's tables, trailing spaces cut), so it is the same on a terminal, in a pipe and in a
test. ``print_table`` prints to a terminal with its width and a bold header, and otherwise
exactly ``text(table)``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table as RichTable

TEXT_WIDTH = 240
"""Characters a text table may take before rich folds its cells (none of reefl's comes near)."""


@dataclass(frozen=True)
class Table:
    """Rows of string cells under a header. ``align``: one letter per column, ``l`` (left)
    or ``r`` (right); ``sections``: the rows after which a rule is drawn (e.g. before a
    summary row); ``title``: a line above the table (not part of its Markdown)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str
    sections: tuple[int, ...] = ()
    title: str = ""

    def __post_init__(self) -> None:
        width = len(self.header)
        if len(self.align) != width or set(self.align) - {"l", "r"}:
            raise ValueError(f"align must be one of 'l'/'r' per column ({width}); "
                             f"got '{self.align}'")
        for row in self.rows:
            if len(row) != width:
                raise ValueError(f"a row has {len(row)} cells, the header {width}: {row}")


def plural(count: int | str, word: str, many: str | None = None) -> str:
    """``1 round``, ``2 rounds``: ``count`` and ``word``, or ``many`` (default: ``word`` + s)
    unless the count is one."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "",
          sections: Sequence[int] = (), title: str = "") -> Table:
    """A ``Table``; ``align`` defaults to the first column left, every other right."""
    align = align or "l" + "r" * (len(header) - 1)
    return Table(tuple(header), tuple(tuple(r) for r in rows), align, tuple(sections), title)


def markdown(t: Table) -> str:
    """``t`` as a Markdown (GFM) table, its columns padded to line up in the plain file;
    ``|`` in a cell is escaped. No title and no section rules (Markdown has none)."""
    cells = [[c.replace("|", "\\|") for c in row] for row in (t.header, *t.rows)]
    widths = [max(3, *(len(row[k]) for row in cells)) for k in range(len(t.header))]

    def line(row: Sequence[str]) -> str:
        padded = (c.ljust(w) if a == "l" else c.rjust(w)
                  for c, w, a in zip(row, widths, t.align, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-")
                          for w, a in zip(widths, t.align, strict=True)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _rich_table(t: Table) -> RichTable:
    """``t`` as a rich Table: no outer border, a rule under the header and after each
    section, columns two spaces apart."""
    from rich.box import Box
    from rich.table import Table as RichTable
    from rich.text import Text  # cells are plain text: "reefl[modulation=false]" is no markup

    rules = Box("    \n    \n ── \n    \n ── \n ── \n    \n    \n")
    rich_table = RichTable(box=rules, show_edge=False, pad_edge=False, header_style="bold")
    for name, align in zip(t.header, t.align, strict=True):
        rich_table.add_column(Text(name), justify="left" if align == "l" else "right")
    for index, row in enumerate(t.rows):
        rich_table.add_row(*map(Text, row), end_section=index in t.sections)
    return rich_table


def print_table(t: Table, file: IO[str] | None = None) -> None:
    """Print ``t`` (its title first) with rich: on a terminal at its width with a bold
    header; anywhere else exactly ``text(t)``."""
    from rich.console import Console

    stream = file if file is not None else sys.stdout
    if not stream.isatty():
        print(text(t), file=stream, flush=True)
        return
    console = Console(file=stream, highlight=False, soft_wrap=False)
    if t.title:
        console.print(t.title, markup=False)
    console.print(_rich_table(t))


def text(t: Table, width: int = TEXT_WIDTH) -> str:
    """``t`` as rich renders it, as plain text (no colour, lines right-stripped): the title
    line, the header, a rule, the rows, a rule after each section."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False,
                      highlight=False, soft_wrap=False, legacy_windows=False)
    console.print(_rich_table(t))
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join([t.title, *lines] if t.title else lines)
