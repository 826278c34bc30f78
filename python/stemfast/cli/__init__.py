"""Command line: ``python -m stemfast {sites,demo,train,analyze,batch,bench,diagnose} ...``.

One module per command (:mod:`~stemfast.cli.sites`, :mod:`~stemfast.cli.demo`,
:mod:`~stemfast.cli.train`, :mod:`~stemfast.cli.analyze`, :mod:`~stemfast.cli.batch`,
:mod:`~stemfast.cli.bench`, :mod:`~stemfast.cli.diagnose`), each a thin layer over the Python API with an ``add(subparsers)``
that registers it; everything they share -- options, exit codes, the ``error: ...`` print -- is
in :mod:`stemfast.cli.options`. Heavy imports (torch) happen only in the handlers, so ``--help``
is instant.
"""
from __future__ import annotations

import argparse
import logging

from .. import __version__
from ..logutil import setup_logging
from .options import EXIT_OK

__all__ = ["build_parser", "main"]

log = logging.getLogger("stemfast.cli")


def build_parser() -> argparse.ArgumentParser:
    """The ``stemfast`` parser with every subcommand."""
    from . import analyze, batch, bench, demo, diagnose, sites, train

    ap = argparse.ArgumentParser(
        prog="stemfast",
        description="Fast unsupervised atomic-lattice analysis and defect detection for atomic-resolution "
                    "STEM images (HAADF of 2-D materials such as monolayer MoS2).",
    )
    ap.add_argument("--version", action="version", version=f"stemfast {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for command in (sites, demo, train, analyze, batch, bench, diagnose):
        command.add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """``stemfast ...``: parse ``argv``, run the subcommand, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_OK
    setup_logging(getattr(args, "verbose", 0))
    return int(args.func(args) or 0)
