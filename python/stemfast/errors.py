"""Exit codes, error types and the wording of system errors, defined once for every command.

The command line (``stemfast batch``, ``analyze``, ``train``, ``sites``, ...) returns one of the
exit codes below and prints errors as ``error: <message>`` (never a traceback for a problem of
the input, the settings or the machine). Library code raises the exception types below; the
command line maps them to exit codes in one place (:func:`exit_code_for`).

Examples
--------
>>> exit_code_for(SettingsError("analysis.n_classes must be <= 64"))
2
>>> print(describe_os_error(OSError(28, "No space left on device", "/data/out/a/sites.csv")))
/data/out/a/sites.csv: no space left on device (the disk is full; free some space and run again)
"""
from __future__ import annotations

import errno
import os

__all__ = [
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_SETTINGS",
    "EXIT_SKIPPED",
    "EXIT_BUSY",
    "EXIT_INTERRUPTED",
    "EXIT_CODES",
    "StemfastError",
    "SettingsError",
    "OutputError",
    "OutputLocked",
    "ModelFileError",
    "SchedulerError",
    "describe_os_error",
    "exit_code_for",
    "report_cli_error",
]

#: Every input analysed (or current).
EXIT_OK = 0
#: An error that stopped the run (message on stderr): no inputs, unusable output folder, model, scheduler.
EXIT_ERROR = 1
#: A settings / command-line error, found before any work was done.
EXIT_SETTINGS = 2
#: The batch finished, but some inputs were skipped or failed (listed on stderr, in the summary and report).
EXIT_SKIPPED = 3
#: The output folder is in use by another stemfast run (its lock file names the process); try again later.
EXIT_BUSY = 75  # EX_TEMPFAIL of sysexits.h
#: Interrupted (Ctrl-C / SIGINT): finished inputs are kept, nothing half-written is left.
EXIT_INTERRUPTED = 130

#: Exit status -> meaning (the ``--help`` epilog of the commands is built from this).
EXIT_CODES = {
    EXIT_OK: "all inputs analysed",
    EXIT_ERROR: "error (message on stderr)",
    EXIT_SETTINGS: "invalid settings or options (nothing was done)",
    EXIT_SKIPPED: "some inputs skipped or failed (listed)",
    EXIT_BUSY: "the output folder is in use by another stemfast run",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); finished inputs are kept",
}


class StemfastError(Exception):
    """Base of the errors the command line reports as a message (no traceback)."""

    exit_code = EXIT_ERROR


class SettingsError(StemfastError, ValueError):
    """A setting or option is invalid (unknown key, wrong type, not finite, out of range)."""

    exit_code = EXIT_SETTINGS


class OutputError(StemfastError, OSError):
    """The output folder cannot be used (read-only, a file, under a file, disk full)."""

    exit_code = EXIT_ERROR


class OutputLocked(StemfastError):
    """Another stemfast run writes into the same output folder."""

    exit_code = EXIT_BUSY


class ModelFileError(StemfastError, ValueError):
    """A ``--model`` file is missing or is not a stemfast model."""

    exit_code = EXIT_ERROR


class SchedulerError(StemfastError, RuntimeError):
    """The ``--scheduler`` address is not usable (nothing listening, not a Dask scheduler, ...)."""

    exit_code = EXIT_ERROR


_ERRNO_TEXT = {
    errno.ENOSPC: "no space left on device (the disk is full; free some space and run again)",
    errno.EDQUOT: "disk quota exceeded (free some space and run again)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EEXIST: "exists already",
    errno.EISDIR: "is a folder",
    errno.ENOENT: "no such file or folder",
}


def describe_os_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """``"<path>: <cause>"`` for an ``OSError`` (the path from the error, else ``path``)."""
    if not isinstance(exc, OSError):
        return f"{path}: {exc}" if path is not None else str(exc)
    where = exc.filename if exc.filename is not None else path
    cause = _ERRNO_TEXT.get(exc.errno) or (exc.strerror.lower() if exc.strerror else str(exc))
    return f"{where}: {cause}" if where is not None else cause


def exit_code_for(exc: BaseException) -> int:
    """The exit status of the command line for an error that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return int(getattr(exc, "exit_code", EXIT_ERROR))


def report_cli_error(exc: BaseException, *, stream=None) -> int | None:
    """Print the message of an error that ended a command (``error: ...`` on stderr) and return its
    exit status; ``None`` for an unexpected error (a bug: the caller re-raises it, traceback shown).
    """
    import sys

    stream = stream if stream is not None else sys.stderr
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted: finished inputs are kept, nothing half-written is left; run the same command "
              "again to go on", file=stream)
        return EXIT_INTERRUPTED
    if isinstance(exc, StemfastError):
        msg = str(exc)
    elif isinstance(exc, OSError):
        msg = describe_os_error(exc)
    elif isinstance(exc, MemoryError):
        msg = f"not enough memory ({exc})"
    elif isinstance(exc, (ImportError, ValueError, RuntimeError)):
        msg = str(exc)
    else:
        return None
    print(f"error: {msg}", file=stream)
    return exit_code_for(exc)
