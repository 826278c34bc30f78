"""Logging and progress-bar helpers: logging to stderr, tqdm bars only on a terminal."""
from __future__ import annotations

import functools
import logging
import os
import sys

__all__ = ["setup_logging", "progress", "show_progress", "tqdm_class", "StageTimings"]


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
    kwargs.setdefault("disable", not show_progress())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm_class()(iterable, **kwargs)


@functools.lru_cache(maxsize=None)
def tqdm_class():
    """tqdm's bar class (``tqdm.auto``) with its monitor thread off: a subclass, so bars made elsewhere in
    the process keep tqdm's defaults. tqdm starts that thread with the first bar, shown or not, and keeps
    it while a bar is open; a batch's per-file bar is open while each input's figures are drawn, and with
    a thread running forking is unsafe (:func:`stemfast.forking.fork_hazard`), so the two figures were
    drawn one after the other. The monitor only forces a refresh of a bar whose iterations slow down
    after fast ones."""
    from tqdm.auto import tqdm

    return type("StemfastBar", (tqdm,), {"monitor_interval": 0})


class StageTimings(dict):
    """An image's stage timings (stage name -> seconds, a plain ``dict`` to everything that reads it)
    that also moves a progress bar: one step per stage of ``stages`` as its time is recorded, the
    stage now running named beside it. For a single large image, where the per-file bar of a batch
    would stand still for minutes. The bar closes when the last stage is recorded (or on
    :meth:`close`); pickled, it is a plain dict.

    >>> t = StageTimings(("peaks", "lattice"), desc="demo", show=False)
    >>> t["peaks"] = 0.5; t["lattice"] = 1.5; t["other"] = 0.1
    >>> dict(t), t.done
    ({'peaks': 0.5, 'lattice': 1.5, 'other': 0.1}, 2)
    """

    def __init__(self, stages, *, desc: str, show: bool | None = None) -> None:
        super().__init__()
        self._stages = tuple(stages)
        self._bar = None
        if show if show is not None else show_progress():
            self._bar = progress(total=len(self._stages), desc=desc, unit="stage", leave=False, mininterval=0,
                                 postfix=self._stages[0] if self._stages else None)

    @property
    def done(self) -> int:
        """How many of the stages have a time."""
        return sum(s in self for s in self._stages)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        bar = self._bar
        if bar is not None and key in self._stages:
            done = self.done
            if done >= len(self._stages):
                bar.update(done - bar.n)
                self.close()
            else:
                bar.set_postfix_str(next(s for s in self._stages if s not in self), refresh=False)
                bar.update(done - bar.n)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __reduce__(self):
        return (dict, (dict(self),))
