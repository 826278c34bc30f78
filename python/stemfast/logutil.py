"""Logging and progress helpers: logging to stderr; progress as tqdm bars on a terminal, as log lines
(:class:`LogProgress`) where stderr is a file or a pipe (a cluster job, ``nohup``), none with
``STEMFAST_PROGRESS=0``."""
from __future__ import annotations

import functools
import logging
import os
import sys
import time

__all__ = ["setup_logging", "progress", "show_progress", "progress_mode", "tqdm_class", "StageTimings",
           "LogProgress", "PROGRESS_LOGGER", "LOG_INTERVAL_S"]

#: the logger of the progress lines written off a terminal (INFO; shown at the default verbosity)
PROGRESS_LOGGER = "stemfast.progress"
#: seconds between two progress lines of one bar in a log (besides its first and last)
LOG_INTERVAL_S = 20.0


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
    # progress off a terminal is INFO lines (LogProgress), shown without -v: a long run in a log is not silent
    logging.getLogger(PROGRESS_LOGGER).setLevel(min(level, logging.INFO))


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


def progress_mode() -> str:
    """How progress is shown: ``"bar"`` (tqdm) on an interactive terminal, ``"log"`` (progress lines in
    the log, :class:`LogProgress`) where stderr is not one, ``"off"`` with ``STEMFAST_PROGRESS=0``
    (``false``, ``no``, ``off``, any case, or empty: :func:`stemfast.forking.switched_off`); any other
    value of ``STEMFAST_PROGRESS`` forces the bars."""
    from .forking import switched_off

    env = os.environ.get("STEMFAST_PROGRESS")
    if env is not None:  # the switches' one reading (any case, "off" too), or empty
        return "off" if switched_off("STEMFAST_PROGRESS") or not env.strip() else "bar"
    return "bar" if sys.stderr.isatty() else "log"


def show_progress() -> bool:
    """Progress bars are shown on an interactive terminal unless ``STEMFAST_PROGRESS=0``
    (:func:`progress_mode` is ``"bar"``)."""
    return progress_mode() == "bar"


def progress(iterable=None, **kwargs):
    """Progress over ``iterable`` (tqdm's arguments): a tqdm bar on a terminal, a :class:`LogProgress`
    where stderr is not one, nothing with ``STEMFAST_PROGRESS=0`` or ``disable=True``. An explicit
    ``disable=False`` keeps tqdm's bar wherever stderr goes (a caller that asked for it)."""
    disable = kwargs.get("disable")
    if disable is None:
        mode = progress_mode()
        if mode == "log":
            return LogProgress(iterable, **kwargs)
        kwargs["disable"] = mode == "off"
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
    would stand still for minutes (off a terminal: :class:`LogProgress` lines while it runs long).
    The bar closes when the last stage is recorded (or on :meth:`close`); pickled, it is a plain dict.

    >>> t = StageTimings(("peaks", "lattice"), desc="demo", show=False)
    >>> t["peaks"] = 0.5; t["lattice"] = 1.5; t["other"] = 0.1
    >>> dict(t), t.done
    ({'peaks': 0.5, 'lattice': 1.5, 'other': 0.1}, 2)
    """

    def __init__(self, stages, *, desc: str, show: bool | None = None) -> None:
        super().__init__()
        self._stages = tuple(stages)
        self._bar = None
        if show if show is not None else progress_mode() != "off":
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


def _clock() -> float:
    """The clock of :class:`LogProgress` (a test replaces it)."""
    return time.monotonic()


class LogProgress:
    """Progress as INFO lines on the :data:`PROGRESS_LOGGER` logger, for a run whose stderr is not a
    terminal (a log file: a tqdm bar there is silent or a flood of carriage returns): the part of
    tqdm's interface the package uses (iteration, :meth:`update`, :meth:`set_postfix`,
    :meth:`set_postfix_str`, :meth:`close`, ``n``). A line at the start and at the end, and between
    them at most one every ``interval`` s (:data:`LOG_INTERVAL_S`), e.g.
    ``analyse: 12/40 file (30%), 01:05 elapsed, ~02:31 left``. A bar that does not stay (tqdm's
    ``leave=False``: the frames of each stack, the stages of each image, the training epochs) says
    nothing until it has run ``interval`` s, so a batch of many short stacks adds no lines of its own;
    a long one says where it is every ``interval`` s. Other tqdm arguments are ignored.

    >>> bar = LogProgress(range(3), desc="demo", unit="frame")
    >>> sum(bar), bar.n
    (3, 3)
    """

    def __init__(self, iterable=None, *, desc: str | None = None, total: float | None = None, unit: str = "it",
                 leave: bool | None = True, postfix=None, initial: float = 0, interval: float | None = None,
                 **_ignored) -> None:
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, initial, None if postfix is None else str(postfix)
        self.interval = LOG_INTERVAL_S if interval is None else float(interval)
        self._log = logging.getLogger(PROGRESS_LOGGER)
        self._start = self._last = _clock()
        self._said, self._said_n = False, None  # whether a line was written; the count it gave
        self._closed = False
        if leave is not False:
            self._say()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """``n`` more done; a line when ``interval`` s passed since the last one."""
        self.n += n
        if _clock() - self._last >= self.interval:
            self._say()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """What is shown after the counts (e.g. the stage now running)."""
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """``key=value`` pairs shown after the counts."""
        items = {**dict(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        """The last line, unless the last one said the same count or a bar that does not stay finished
        within ``interval`` s; idempotent."""
        if not self._closed:
            self._closed = True
            said, long = self._said, _clock() - self._start >= self.interval
            if (said and self.n != self._said_n) or (not said and long):
                self._say()

    def _say(self) -> None:
        self._log.info("%s", self.line())
        self._last, self._said, self._said_n = _clock(), True, self.n

    def line(self) -> str:
        """The progress line now: ``DESC: N/TOTAL UNIT (P%), MM:SS elapsed, ~MM:SS left, POSTFIX``."""
        from tqdm import tqdm

        elapsed = _clock() - self._start
        n = int(self.n) if float(self.n).is_integer() else round(float(self.n), 2)
        parts = [f"{self.desc}: {n} {self.unit}"]
        if self.total:
            parts = [f"{self.desc}: {n}/{int(self.total)} {self.unit} ({100.0 * self.n / self.total:.0f}%)"]
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"~{tqdm.format_interval(elapsed * (self.total - self.n) / self.n)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)
