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


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_each_commands_help_names_only_its_own_options(command):
    """A command's ``--help`` is the user's reference: an option it names must be one the command takes
    (``batch --help`` said "Without this, --companion or --companion-name", and batch has no --companion)."""
    parser = _subparsers()[command]
    own = {s for a in parser._actions for s in a.option_strings}
    texts = [parser.description, parser.epilog] + [a.help for a in parser._actions] + \
        [g.description for g in parser._action_groups]  # as written (format_help wraps an option's name)
    # another command's option, named as such ("stemfast batch --model"), is no claim about this one
    text = re.sub(r"stemfast [a-z]+ --[a-z-]+", "", "\n".join(s for s in texts if isinstance(s, str)))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    assert named - own == set()
