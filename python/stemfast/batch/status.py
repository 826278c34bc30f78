"""Which inputs are finished: the markers ``done.json`` (written last) and ``skipped.json`` (a read
failure remembered until the file changes), and the results of inputs without outputs."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .. import __version__
from ..atomic import write_json
from ..config import ReadOptions
from ..errors import describe_os_error
from .common import DONE_FILE, OUTPUT_FILES, SKIPPED_FILE, crash_hook, now, read_json
from .inputs import InputEntry, filled_by_read_options
from .results import InputResult

__all__ = ["InputUnreadable", "clean_dir", "write_done", "partial_reason", "skip_input", "failure_reason",
           "result_from_summary", "current_done", "cached_skip", "filled_read_key"]

log = logging.getLogger("stemfast.batch")


class InputUnreadable(Exception):
    """No frame of the input could be read."""


def clean_dir(d: Path) -> None:
    """Remove stale temporary files of an interrupted earlier run (the outputs and markers stay: new
    outputs replace them as a whole, see :func:`stemfast.atomic.staged_dir`)."""
    for p in d.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()


def filled_read_key(summary: dict, read_options: ReadOptions | None) -> dict | None:
    """The read options an input's results depend on: those that filled its scattered non-finite
    pixels (``--fill-nonfinite``), None where none were filled (the options change nothing there; a
    region without data is filled whatever they are)."""
    if not filled_by_read_options(summary.get("input") or {}):
        return None
    return ReadOptions.key_of(read_options)


def write_done(entry: InputEntry, d: Path, summary: dict, *, chash: str, model_sha: str | None,
               read_options: ReadOptions | None = None) -> dict:
    """Write ``d/done.json`` (last: the input counts as finished once it exists) and return it."""
    outputs = {}
    for f in summary.get("outputs", OUTPUT_FILES):
        outputs[f] = (d / f).stat().st_size
    done = {
        "name": entry.name,
        "status": summary["status"],
        "reason": partial_reason(summary),
        "stemfast_version": __version__,
        "input": entry.fingerprint(),
        "config_hash": chash,
        "model_sha256": model_sha,
        "outputs": outputs,
        "n_sites": summary["n_sites"],
        "n_defects": summary["n_defects"],
        "n_frames": summary["n_frames"],
        "finished": now(),
    }
    read_key = filled_read_key(summary, read_options)
    if read_key is not None:
        done["read_options"] = read_key
    crash_hook("before_done", entry.name)
    write_json(d / DONE_FILE, done)
    return done


def partial_reason(summary: dict) -> str | None:
    """Why an input's results are partial (how many frames failed, the first error), or None."""
    errs = summary.get("frame_errors") or {}
    if not errs:
        return None
    first = next(iter(errs.items()))
    return f"{len(errs)} of {summary['n_frames']} frames failed (frame {first[0]}: {first[1]})"


def skip_input(entry: InputEntry, d: Path, reason: str, *, cache: bool, status: str = "skipped",
               read_options: ReadOptions | None = None, chash: str | None = None) -> InputResult:
    """Report an input without results; ``cache``: remember a read failure (``skipped.json``) until the
    file or the read options change, or -- with ``chash``, for a failure the settings may cause (no
    frame could be analysed) -- the settings (earlier results of other content lose their ``done.json``)."""
    log.error("%s: %s: %s", entry.rel, status, reason)
    if cache:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                (d / DONE_FILE).unlink()
            write_json(d / SKIPPED_FILE, {"name": entry.name, "status": status, "reason": reason,
                                          "stemfast_version": __version__, "input": entry.fingerprint(),
                                          "read": ReadOptions.key_of(read_options), "config_hash": chash,
                                          "date": now()})
        except OSError as exc:  # e.g. disk full: the skip is still reported, only not remembered
            log.error("%s: could not record the skip: %s", entry.rel, describe_os_error(exc))
    return InputResult(entry.name, str(entry.path), status, reason)


def failure_reason(exc: BaseException) -> str:
    """The reason of an input that failed while being processed (OSError: path and cause)."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return f"{type(exc).__name__}: {exc}"


def result_from_summary(entry: InputEntry, summary: dict, seconds: float) -> InputResult:
    """The :class:`InputResult` of an input just processed, from its summary."""
    st = summary["status"]
    return InputResult(entry.name, str(entry.path), "partial" if st == "partial" else "done",
                       partial_reason(summary), summary["n_sites"], summary["n_defects"], seconds,
                       summary["n_frames"], list(summary.get("warnings") or []))


def current_done(entry: InputEntry, d: Path, *, chash: str, model_sha: str | None,
                 read_options: ReadOptions | None = None) -> dict | None:
    """``done.json`` when the outputs of ``entry`` are complete and current (the same content,
    settings, model, version, and read options where they filled pixels), else None."""
    done = read_json(d / DONE_FILE)
    if not done:
        return None
    inp = done.get("input") or {}
    if (done.get("stemfast_version") != __version__ or done.get("config_hash") != chash
            or done.get("model_sha256") != model_sha or not entry.same_content(inp)):
        return None
    if "read_options" in done and done["read_options"] != ReadOptions.key_of(read_options):
        return None  # its pixels were filled under other read options (read again, it may be refused)
    for f, size in (done.get("outputs") or {}).items():
        p = d / f
        try:
            if p.stat().st_size != size:
                return None
        except OSError:
            return None
    if not set(OUTPUT_FILES) <= set(done.get("outputs") or {}):  # stacks add their tracks
        return None
    return done


def cached_skip(entry: InputEntry, d: Path, read_options: ReadOptions | None = None,
                chash: str | None = None) -> dict | None:
    """``skipped.json`` when it remembers a failure of this same content, read options and settings."""
    sk = read_json(d / SKIPPED_FILE)
    if not sk or sk.get("stemfast_version") != __version__:
        return None
    if not entry.same_content(sk.get("input")):  # the file or its companion changed
        return None
    if sk.get("read", ReadOptions.key_of(None)) != ReadOptions.key_of(read_options):
        return None  # e.g. now with --fill-nonfinite: try again
    if sk.get("config_hash") is not None and sk.get("config_hash") != chash:
        return None  # failed with other settings (e.g. a --spacing that did not fit): try again
    return sk
