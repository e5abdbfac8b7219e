"""README and the user guide in docs/ tell the truth: their example outputs are what the
current code prints, every ``reefl`` command they show is one the command line accepts, README
links every page of docs/, and the configuration reference lists every run-config key.

An example output in README or a docs/ page is a fenced block whose first line is
``$ reefl ...``: the rest of the block is what that command prints (stdout and stderr, in
order of the streams), with the working directory shown as ``/path/to/cwd``. The quick ones
run here in-process on every test run; ``reefl run``'s (a 3-minute training) runs in the
extended suite, where only its layout is compared (the digits differ between CPUs, as README
says): the block must appear, line for line, in what the command prints (the progress lines
come around it).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from reefl.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
SLOW = ("reefl run",)
CWD = "/path/to/cwd"


@dataclass(frozen=True)
class Example:
    """A ``$ reefl ...`` block: its page and line, the command and the expected lines."""

    page: str
    line: int
    command: str
    expected: list[str]


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, info string, lines) of every fenced code block."""
    blocks, current, start, info = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(.*)$", line)
        if fence and current is None:
            current, start, info = [], number + 1, fence.group(1).strip()
        elif fence:
            blocks.append((start, info, current))
            current = None
        elif current is not None:
            current.append(line.strip() if info == "bash" else line.rstrip())
    return blocks


def examples(text: str, page: str = "README.md") -> list[Example]:
    """Every block that starts with ``$ reefl``."""
    return [Example(page, start, lines[0][2:], lines[1:])
            for start, _, lines in fenced_blocks(text)
            if lines and lines[0].startswith("$ reefl ")]


def shown_commands(text: str) -> list[tuple[int, str]]:
    """Every ``reefl ...`` command line of the bash blocks (comments cut, continuation lines
    joined)."""
    found = []
    for start, info, lines in fenced_blocks(text):
        if info != "bash":
            continue
        joined = "\n".join(lines).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("reefl "):
                found.append((start + offset, line))
    return found


def run_command(command: str, capfd: pytest.CaptureFixture, cwd: Path) -> list[str]:
    """What ``command`` prints, run in-process in ``cwd``, with ``cwd`` written as README
    writes it."""
    argv = shlex.split(command)[1:]
    capfd.readouterr()
    main(argv)
    captured = capfd.readouterr()
    text = (captured.out + captured.err).replace(str(cwd), CWD)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def name(page: Path) -> str:
    """The page's path from the repository root (``README.md``, ``docs/data.md``)."""
    return page.relative_to(ROOT).as_posix()


TEXT = README.read_text()
EXAMPLES = [e for page in PAGES for e in examples(page.read_text(), name(page))]
COMMANDS = [(name(page), line, command) for page in PAGES
            for line, command in shown_commands(page.read_text())]


def test_the_pages_have_examples_to_check() -> None:
    commands = [e.command for e in EXAMPLES]
    assert any(c.startswith("reefl costs") for c in commands)
    assert any(c.startswith("reefl data") for c in commands)
    assert any(e.page == "README.md" and e.command == "reefl run" for e in EXAMPLES)
    assert any(e.page == "README.md" and e.command.startswith("reefl run -c")
               for e in EXAMPLES)  # an error example
    assert len(shown_commands(TEXT)) >= 5
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("page,line,command", COMMANDS)
def test_every_command_shown_is_accepted(page: str, line: int, command: str) -> None:
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as err:
        pytest.fail(f"{page}:{line}: `{command}` is refused (exit {err.code})")


def readme_links() -> set[str]:
    """The relative targets README links to, without their #anchors."""
    return {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", TEXT)
            if "://" not in target}


@pytest.mark.parametrize("page", [name(p) for p in PAGES if p.parent == DOCS]
                         + ["docs/claim/results.md"])
def test_readme_links_every_docs_page(page: str) -> None:
    assert page in readme_links(), f"README.md does not link {page}"


def test_readme_links_lead_to_files() -> None:
    for target in readme_links():
        assert (ROOT / target).exists(), f"README.md links {target}, which does not exist"


def test_the_configuration_reference_lists_every_key() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    listed = re.findall(r"^\| `([a-z0-9-]+)` \|", (DOCS / "configuration.md").read_text(), re.M)
    assert listed == list(config), "docs/configuration.md must list pyproject's keys in order"


def is_quick(example: Example) -> bool:
    """Not a training run, or one refused before anything starts."""
    refused = bool(example.expected) and example.expected[0].startswith("reefl: error:")
    return refused or not example.command.startswith(SLOW)


QUICK = [e for e in EXAMPLES if is_quick(e)]


@pytest.mark.parametrize("example", QUICK, ids=[f"{e.page}:{e.line}" for e in QUICK])
def test_example_output_is_what_the_command_prints(example: Example, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture) -> None:
    if "fashion-mnist" in example.command and not Path(
            "/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    monkeypatch.chdir(tmp_path)
    assert run_command(example.command, capfd, tmp_path) == example.expected


def masked(lines: list[str]) -> list[str]:
    """Lines with every digit replaced: what stays is the layout."""
    return [re.sub(r"\d", "#", line) for line in lines]


SLOW_EXAMPLES = [e for e in EXAMPLES if e not in QUICK]


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("example", SLOW_EXAMPLES,
                         ids=[f"{e.page}:{e.line}" for e in SLOW_EXAMPLES])
def test_slow_example_prints_the_layout_readme_shows(example: Example, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    printed = masked(run_command(example.command, capfd, tmp_path))
    expected = masked(example.expected)
    starts = [i for i in range(len(printed)) if printed[i:i + len(expected)] == expected]
    assert starts, "README's block is not in what it printed:\n" + "\n".join(printed[-20:])
