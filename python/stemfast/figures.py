"""Figure plumbing shared by the report and the tracking figures: matplotlib on the Agg backend, the
grey-level range of an image, atomic PNG writes, figures drawn side by side in forked processes."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from .atomic import atomic_path

__all__ = ["pyplot", "display_range", "tight_layout", "save_figure", "draw_side_by_side", "BackgroundFigures"]

log = logging.getLogger(__name__)

#: the longest a forked figure process may take before it is ended and its figure drawn here
FIGURE_TIMEOUT_S = 300.0
#: how long an ended figure process has to remove its half-written file (SIGTERM) before it is killed
FIGURE_END_GRACE_S = 2.0


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # pragma: no cover - a backend already in use by the application
            pass
    import matplotlib.pyplot as plt

    return plt


def display_range(image: np.ndarray) -> tuple[float, float]:
    """Robust grey-level range (0.5th and 99.5th percentiles) for showing ``image``."""
    a = np.asarray(image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    return float(lo), float(hi)


def tight_layout(fig) -> None:
    """Lay ``fig`` out as ``fig.tight_layout()`` does, without leaving a layout engine behind.

    ``Figure.tight_layout`` leaves a placeholder layout engine on the figure, and ``savefig`` then
    draws the whole figure once more (without rendering) before the real draw: for the class map of
    a 1024^2 image that dry run (image resampling, ~5k markers, text layout) was a third of the
    figure's time. The subplot parameters set here are the same, so are the pixels.
    """
    from matplotlib.layout_engine import TightLayoutEngine

    TightLayoutEngine().execute(fig)


#: zlib level of the PNGs: at level 1 they come out ~1.3x larger and encode ~5x faster (at the default
#: level 6 encoding was the largest single cost of the figures); the pixels are identical
PNG_COMPRESS_LEVEL = 1


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    finally:
        plt.close(fig)


def _fork_unsafe() -> str | None:
    """Why figures should not be drawn in forked processes here, or None."""
    from .forking import fork_hazard, switched_off

    off = switched_off("STEMFAST_FIGURE_FORK")
    if off:
        return off
    if (os.cpu_count() or 1) < 2:
        return "one CPU"
    return fork_hazard()


def draw_side_by_side(jobs: Sequence[Callable[[], None]]) -> None:
    """Run figure-drawing ``jobs`` (each writes its own file, atomically): all but the last in forked
    child processes, the last here, so two figures take the time of the slower one on two cores.

    A child that fails, dies or takes longer than :data:`FIGURE_TIMEOUT_S` is ended and its job run
    again here (a failure here raises as usual, the children ended). Without ``fork``, with one CPU, with torch imported
    or other threads running, or with ``STEMFAST_FIGURE_FORK=0``, all jobs run here in order.
    """
    jobs = list(jobs)
    if not jobs:
        return
    others = BackgroundFigures.start(jobs[:-1]) if len(jobs) > 1 else None
    if others is None:  # forking unsafe here (or one figure): in order
        for job in jobs[:-1]:
            job()
    try:
        jobs[-1]()
    except BaseException:
        if others is not None:
            others.cancel()
        raise
    if others is not None:
        others.wait()


class BackgroundFigures:
    """Figure-drawing ``jobs`` run in forked child processes, one per job, while this process goes on
    with other work: the last figure (:func:`draw_side_by_side`) or the next input of a batch.

    :meth:`start` forks the children, or returns None where forking is unsafe (see
    :func:`draw_side_by_side`; the caller then draws here). :meth:`wait` waits for them and returns
    the seconds the figures took (the slowest child's); a job whose child failed, died or took longer
    than :data:`FIGURE_TIMEOUT_S` is ended and run here instead (each job writes its own file
    atomically, so nothing half-written is left: an ended child removes its temporary file). The
    children ignore Ctrl-C (SIGINT reaches the whole process group): the caller decides whether to wait
    for them or :meth:`cancel` them.
    Everything a job draws (its image, its sites) must be in memory before :meth:`start`: an open
    file is not shared with a child.
    """

    def __init__(self, children: list) -> None:
        self._children = children  # (job, process, receiving end of its pipe)

    @classmethod
    def start(cls, jobs: Sequence[Callable[[], None]]) -> "BackgroundFigures | None":
        """Fork a child per job; None where forking is unsafe here."""
        if _fork_unsafe() is not None:
            return None
        import multiprocessing

        pyplot()  # imported once, before the fork: each process would import it again (~0.5 s)
        from .forking import ctrl_c_held

        ctx = multiprocessing.get_context("fork")
        children = []
        with ctrl_c_held():  # a Ctrl-C during a fork is delivered after it, not lost in the fork's hooks
            for job in jobs:
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_background_child, args=(job, send), name="stemfast-figure", daemon=True)
                proc.start()
                send.close()
                children.append((job, proc, recv))
        return cls(children)

    def wait(self) -> float:
        """Wait for the figures; the seconds they took (a job drawn here again where its child failed:
        the time waited for the child and the drawing here)."""
        seconds = 0.0
        t_wait = time.perf_counter()
        for job, p, conn in self._children:
            try:
                took = conn.recv() if conn.poll(FIGURE_TIMEOUT_S) else None
            except EOFError:  # the child ended without a word
                took = None
            p.join(FIGURE_TIMEOUT_S if took is not None else 0)
            if p.is_alive():  # silent past the timeout: ended before its figure is drawn here
                _end(p)
            if took is None or p.exitcode != 0:
                log.warning("a figure process ended with exit code %s; drawing its figure here", p.exitcode)
                job()
                took = time.perf_counter() - t_wait
            seconds = max(seconds, float(took))
        self.cancel()
        return seconds

    def cancel(self) -> None:
        """End the children that still run and close their pipes."""
        for _, p, conn in self._children:
            if p.is_alive():
                _end(p)
            conn.close()
        self._children = []


def _end(p) -> None:
    """End figure process ``p``: SIGTERM, which lets it remove its temporary file
    (:func:`_background_child`), then SIGKILL after :data:`FIGURE_END_GRACE_S`."""
    p.terminate()
    p.join(FIGURE_END_GRACE_S)
    if p.is_alive():
        p.kill()
        p.join()


def _terminated(signum, frame) -> None:  # pragma: no cover - forked process
    raise SystemExit(128 + signum)  # unwinds the job: atomic_path removes its temporary file


def _background_child(job: Callable[[], None], conn) -> None:  # pragma: no cover - forked process
    import signal

    from .forking import ctrl_c_released

    ctrl_c_released()  # a Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _terminated)
    t0 = time.perf_counter()
    job()
    conn.send(time.perf_counter() - t0)
    conn.close()
