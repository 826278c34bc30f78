"""When this process may be forked to run work beside it (the encode worker, figures side by side)."""
from __future__ import annotations

import multiprocessing
import os
import sys

__all__ = ["fork_hazard", "switched_off"]


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
