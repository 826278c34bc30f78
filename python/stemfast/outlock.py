"""One writer per output folder: ``OUT/.stemfast.lock`` (pid, host, start time) while a run writes.

A second run into the same folder is refused with a message that names the running process; a
lock left by a process that no longer runs on this host (killed, crashed) is taken over with a
warning. A lock of another host is never taken over automatically (its process cannot be
checked from here): the message says which file to remove once that run is known to be gone.

The output folder itself is checked on the way (a file, under a file, read-only, full): the
errors are :class:`stemfast.errors.OutputError` with the path and the cause.

Examples
--------
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with OutputLock(d) as lock:
...     lock.path.name
'.stemfast.lock'
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import OutputError, OutputLocked, describe_os_error

__all__ = ["OutputLock", "LOCK_FILE", "prepare_output_dir", "read_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = ".stemfast.lock"


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """Create the output folder (and parents); raise :class:`OutputError` with the path and cause."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"the output folder {out} cannot be created: a path component is a file") from None
    except OSError as exc:
        raise OutputError(f"the output folder {out} cannot be created: {describe_os_error(exc)}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {out} is not writable (permission denied or read-only)")
    return out


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (Linux ``/proc/PID/stat`` field 22), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs on this host (and, when known, is the same process: same start time)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The content of a lock file (``None`` when missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class OutputLock:
    """Context manager holding ``OUT/.stemfast.lock`` for the lifetime of a run.

    Parameters
    ----------
    out : the output folder (created).
    command : what runs (shown to a second run that is refused).
    """

    def __init__(self, out: str | os.PathLike, *, command: str = "stemfast") -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.command = command
        self.held = False
        self.took_over: dict | None = None

    def _content(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _proc_start(pid),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}

    def acquire(self) -> "OutputLock":
        prepare_output_dir(self.out)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except OSError as exc:
                raise OutputError(f"cannot write in the output folder: {describe_os_error(exc, self.path)}") \
                    from None
            try:
                os.write(fd, (json.dumps(self._content()) + "\n").encode())
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise OutputError(f"cannot write in the output folder: {describe_os_error(exc, self.path)}") \
                    from None
            os.close(fd)
            self.held = True
            return self
        raise OutputLocked(f"could not take the lock {self.path}: other runs keep taking it")

    def _handle_existing(self) -> None:
        info = read_lock(self.path)
        if info is None:  # removed meanwhile: try again
            return
        host = socket.gethostname()
        pid = int(info.get("pid") or -1) if str(info.get("pid", "")).lstrip("-").isdigit() else -1
        if not info:
            # unreadable / half-written lock: a writer died between open and write, or it is being written
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            if age < 10.0:
                time.sleep(0.2)
                info = read_lock(self.path)
                if info:
                    return self._handle_existing()
            stale = True
        else:
            stale = info.get("host") == host and not _alive(pid, info.get("start"))
        if stale:
            log.warning("%s: taking over the lock of a run that is no longer running (pid %s on %s, since %s)",
                        self.out, info.get("pid", "?") if info else "?", info.get("host", "?") if info else "?",
                        info.get("since", "?") if info else "?")
            self.took_over = info or {}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        where = "this host" if info.get("host") == host else f"host {info.get('host')}"
        raise OutputLocked(
            f"the output folder {self.out} is in use by another stemfast run (pid {info.get('pid')} on {where}, "
            f"since {info.get('since', '?')}: {info.get('command', '?')}); wait for it to finish or choose another "
            f"folder with -o" + ("" if info.get("host") == host else
                                 f" (if that run is gone, remove {self.path})"))

    def release(self) -> None:
        if not self.held:
            return
        info = read_lock(self.path)
        if info and info.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
