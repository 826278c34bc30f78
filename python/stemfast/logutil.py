"""Logging and progress-bar helpers: logging to stderr, tqdm bars only on a terminal."""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "progress", "show_progress"]


def setup_logging(verbosity: int = 0) -> None:
    """Configure the ``stemfast`` logger: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("stemfast")
    logger.setLevel(level)
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to the current ``sys.stderr`` (not the one at set-up: a command run
    twice in one process, e.g. under a test runner that swaps stderr, must not log into a closed stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; always sys.stderr
        pass


def show_progress() -> bool:
    """Progress bars are shown on an interactive terminal unless ``STEMFAST_PROGRESS=0``."""
    env = os.environ.get("STEMFAST_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def progress(iterable=None, **kwargs):
    """A tqdm bar that is disabled when not on a terminal."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not show_progress())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
