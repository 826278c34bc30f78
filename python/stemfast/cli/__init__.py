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
from ..heap import reuse_freed_memory
from ..logutil import setup_logging
from .options import EXIT_OK

__all__ = ["build_parser", "main", "run"]

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
    reuse_freed_memory()  # large arrays reused, not faulted in afresh from the kernel (stemfast.heap)
    return int(args.func(args) or 0)


def run(argv: list[str] | None = None) -> None:
    """The ``stemfast`` program: :func:`main`, then the end of the process with its exit status.

    When the command has finished and no other thread is still running, the process ends with
    ``os._exit`` after the ``atexit`` handlers (log handlers flushed, temporary folders removed,
    ...) and a flush of stdout / stderr: the interpreter's own teardown -- freeing every object
    of torch, scikit-learn and matplotlib one by one -- took 1.5-2 s of wall time after an
    ``analyze`` that had written all its files (measured: 12.5 s vs 10.4 s for the 1024^2 image).
    Every output file is closed by then. An exception, or a thread still at work, takes the normal
    way out. In-process callers use :func:`main`, which returns.
    """
    code = main(argv)
    _exit(code)


def _exit(code: int) -> None:
    import atexit
    import os
    import sys
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if others:  # e.g. an executor's worker: the normal exit joins it
        raise SystemExit(code)
    atexit._run_exitfuncs()  # what the normal exit would run first (logging.shutdown, tempfile, ...)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(code)
