"""The batch's output layout (file names) and the small helpers every batch module uses."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

from ..logutil import progress
from ..report import STAGES  # the pipeline stages of the stage tables (defined once, there)
from ..tracking import TRACK_FILES

__all__ = ["KEPT_CONFIG_PATTERN", "OUTPUT_FILES", "STACK_OUTPUT_FILES", "DONE_FILE", "SKIPPED_FILE", "MODEL_FILE", "MODEL_INFO_FILE",
           "CONFIG_FILE", "BATCH_SUMMARY_FILE", "REPORT_FILE", "PARTS_DIR", "RESERVED_NAMES", "STAGES", "now",
           "peak_memory_mib", "progress_bar", "crash_hook", "read_json"]

log = logging.getLogger("stemfast.batch")

#: Files written per input (``done.json`` comes last and lists them with their sizes).
OUTPUT_FILES = ("sites.csv", "classes.png", "defects.png", "summary.json")
#: Files a stack (time series) adds: its defect tracks (:mod:`stemfast.tracking`).
STACK_OUTPUT_FILES = TRACK_FILES
DONE_FILE = "done.json"
SKIPPED_FILE = "skipped.json"
MODEL_FILE = "model.pt"
MODEL_INFO_FILE = "model.json"
CONFIG_FILE = "stemfast.toml"
#: the settings record of an earlier configuration that results in OUT were made with, kept when a run
#: with other settings rewrote ``stemfast.toml`` (``hash12``: the first 12 digits of its config hash)
KEPT_CONFIG_PATTERN = "stemfast.{hash12}.toml"
BATCH_SUMMARY_FILE = "batch_summary.json"
REPORT_FILE = "report.html"
PARTS_DIR = ".parts"
#: Names an input's output folder must not take.
RESERVED_NAMES = {MODEL_FILE, MODEL_INFO_FILE, CONFIG_FILE, BATCH_SUMMARY_FILE, REPORT_FILE, PARTS_DIR}


def now() -> str:
    """The current UTC time, ISO 8601, whole seconds."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (``getrusage`` maxrss), MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r) / (1024.0 * 1024.0) if sys.platform == "darwin" else float(r) / 1024.0


def progress_bar(iterable, show: bool, **kwargs):
    """Progress (:func:`stemfast.logutil.progress`: a bar on a terminal, log lines elsewhere), or none
    when ``show`` is False."""
    if not show:
        kwargs["disable"] = True
    return progress(iterable, **kwargs)


def crash_hook(point: str, name: str) -> None:
    """Crash injection for the tests (see :mod:`stemfast.batch`); a no-op unless configured."""
    spec = os.environ.get("STEMFAST_TEST_CRASH")
    if not spec:
        return
    want_point, _, want_name = spec.partition(":")
    if want_point != point or want_name not in ("*", name):
        return
    once = os.environ.get("STEMFAST_TEST_CRASH_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{point}:{name} pid {os.getpid()}\n".encode())
        os.close(fd)
    sig = signal.SIGINT if os.environ.get("STEMFAST_TEST_SIGNAL", "").upper() == "INT" else signal.SIGKILL
    log.warning("test hook: sending %s to process %d at %s of %s", sig.name, os.getpid(), point, name)
    for h in logging.getLogger("stemfast").handlers:
        with contextlib.suppress(Exception):
            h.flush()
    os.kill(os.getpid(), sig)
    if sig == signal.SIGINT:
        time.sleep(5.0)  # the KeyboardInterrupt arrives here


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None
