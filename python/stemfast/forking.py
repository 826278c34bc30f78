"""When this process may be forked to run work beside it (the encode worker, figures side by side)."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading

__all__ = ["fork_hazard", "switched_off", "ctrl_c_held", "ctrl_c_released"]


def switched_off(var: str) -> str | None:
    """``"VAR=value"`` when the environment variable ``var`` turns a forked helper off (``0``,
    ``false``, ``no``, ``off``; unset means on), else None.

    >>> switched_off("STEMFAST_NO_SUCH_SWITCH") is None
    True
    """
    value = os.environ.get(var, "1")
    return f"{var}={value}" if value.strip().lower() in ("0", "false", "no", "off") else None


def fork_hazard() -> str | None:
    """Why forking this process now is unavailable or unsafe, or None: no ``fork`` start method
    (Windows; macOS' default is kept), torch imported (its thread pools do not survive a fork), or
    other threads running (a lock one of them holds at the fork could block the child for good).

    Examples
    --------
    >>> fork_hazard() in (None, "no 'fork' start method on this platform",
    ...                   "torch is already imported in this process", "other threads run in this process")
    True
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return "no 'fork' start method on this platform"
    if "torch" in sys.modules:
        return "torch is already imported in this process"
    import threading

    if threading.active_count() > 1:
        return "other threads run in this process"
    return None


@contextlib.contextmanager
def ctrl_c_held():
    """Hold Ctrl-C (SIGINT) back while processes are forked, and deliver it after: a SIGINT that arrived
    during ``os.fork`` ran its handler inside the at-fork hooks (logging's lock release), where the
    KeyboardInterrupt was printed as "Exception ignored" and lost -- the run went on to the end. The
    children start with SIGINT held too (:func:`ctrl_c_released` in them). Outside the main thread, or
    where signal masks do not exist, nothing is held.

    >>> with ctrl_c_held():
    ...     pass
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # one held back is delivered here


def ctrl_c_released() -> None:
    """In a child forked under :func:`ctrl_c_held`: ignore Ctrl-C (the parent's to handle: it ends the
    children) and let the signal through again, so one held back at the fork is dropped, not kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
