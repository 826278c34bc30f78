"""The command lines README.md shows a new user parse with the real command-line parser, and every
command of ``stemfast`` is among them."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from stemfast.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _readme_commands() -> list[list[str]]:
    """The arguments after ``python -m stemfast`` of every command line in README's set-up and
    "Using it" code blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", _section("Two commands") + _section("Using it"), re.S)
    out = []
    for line in "\n".join(blocks).splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:3] == ["python", "-m", "stemfast"]:
                out.append(words[3:])
    return out


def _commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_readme_shows_every_command():
    shown = {argv[0] for argv in _readme_commands() if argv and not argv[0].startswith("-")}
    assert shown == _commands()


@pytest.mark.parametrize("argv", _readme_commands(), ids=" ".join)
def test_each_readme_command_line_parses(argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # --help prints and exits 0; a bad option exits 2
        assert e.code == 0, capsys.readouterr().err
