"""The batch runner: every micrograph of a folder through the whole pipeline with one model.

``python -m stemfast batch DIR/ -o OUT/`` (see ``--help``) or :func:`run_batch`.

Steps
-----
1. **Find** every micrograph under the inputs (recursively, by extension,
   :func:`stemfast.io.find_micrographs`). Each input gets a folder ``OUT/<name>/`` (``name`` = file
   stem; duplicate stems are told apart by their relative path).
2. **Fingerprint** every input by its content (:mod:`stemfast.fingerprint`: a full SHA-256 up to
   256 MiB, a sampled one beyond), so a file whose content changed is redone even when its size
   and modification time did not change.
3. **Model.** ``--model FILE`` is used as given. Otherwise ``OUT/model.pt`` is reused when it is
   current (``OUT/model.json``: same settings hash, same input set, same stemfast version, same
   file hash); else one model is trained on patches sampled from the whole batch (at most
   ``max_train_inputs`` inputs, evenly spread over the sorted list, and ``train_frames`` frames
   of each stack) and saved atomically to ``OUT/model.pt``. One model serves every input and
   every frame, so class ids mean the same thing across the batch.
4. **Analyse** every input that is not current: read, for every frame ``prepare`` (sites +
   patches) -> ``analyze`` (encode, classes, defect scores), and write
   ``OUT/<name>/sites.csv, classes.png, defects.png, summary.json`` and, **last**,
   ``OUT/<name>/done.json`` (input SHA-256, size, mtime, settings hash, model hash, stemfast
   version, output files and sizes). Stacks (3-D time series) are read frame by frame from the
   reader's lazy frames and the site table is streamed to disk, so memory does not grow with the
   number of frames; the drift between consecutive frames is measured by phase correlation.
5. **Report**: ``OUT/stemfast.toml`` (resolved settings + version + input checksums),
   ``OUT/batch_summary.json`` (statuses, skipped inputs with reasons, the stage table) and
   ``OUT/report.html`` (everything, images embedded; opens offline).

Reliability
-----------
One run at a time writes into an output folder (``OUT/.stemfast.lock``, :mod:`stemfast.outlock`;
a second run is refused with exit status 75, a lock left by a dead process is taken over). The
outputs of one input are written into a staging folder that replaces ``OUT/<name>/`` as a whole
(:func:`stemfast.atomic.staged_dir`), so a rerun that fails (disk full, Ctrl-C) leaves the previous
complete set, and the report keeps showing it. Settings are checked before any work (exit
status 2), and against each image (a ``--spacing`` that does not fit it is an error, one that
disagrees with the image's own estimate a warning in the summary). Entries of the input folders
that cannot be looked at (unreadable sub-folders, dangling links) are listed as skipped.
Every file is written atomically (:mod:`stemfast.atomic`), and an input counts as finished only
when its ``done.json`` exists and matches the input, the settings and the model. Rerunning the
same command therefore skips finished inputs without reading them (and without training), and a
run that was interrupted resumes where it stopped. An input that cannot be read (corrupt,
truncated, unsupported) is reported with the reason (console, ``batch_summary.json``, report) and
the others finish; the exit code is then 3 (:data:`EXIT_SKIPPED`). Read failures are remembered
in ``OUT/<name>/skipped.json`` (keyed by the file's fingerprint) so they are not retried until
the file changes (or ``--force``).

With ``--scheduler`` the analysis runs on a Dask cluster (:mod:`stemfast.distributed`).

Testing hooks (environment, used by the test-suite to simulate crashes):
``STEMFAST_TEST_CRASH="POINT:NAME"`` kills the process (SIGKILL) at ``POINT`` (``task_start``,
``before_done``, ``after_done``) of input ``NAME`` (``*`` = any; a Dask frame-chunk task of a stack
is ``NAME[START:STOP]``); with
``STEMFAST_TEST_CRASH_ONCE=FILE`` only the first time (the file is created as the marker);
``STEMFAST_TEST_SIGNAL=INT`` sends SIGINT (as Ctrl-C does) instead of SIGKILL.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import __version__
from .atomic import atomic_open, atomic_path, recover_staged, staged_dir, write_json
from .cli_options import ReadOptions
from .config import config_hash, config_to_dict, file_sha256, load_config, write_resolved_config
from .errors import EXIT_ERROR, EXIT_OK, EXIT_SKIPPED, ModelFileError, describe_os_error
from .logutil import progress
from .tracking import TRACK_FILES

__all__ = [
    "InputEntry",
    "InputResult",
    "BatchReport",
    "run_batch",
    "run_batch_cli",
    "add_batch_arguments",
    "run_batch_from_args",
    "discover_inputs",
    "process_input",
    "process_chunk",
    "assemble_parts",
    "train_batch_model",
    "load_model",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_SKIPPED",
    "OUTPUT_FILES",
    "STACK_OUTPUT_FILES",
    "ReadOptions",
]

log = logging.getLogger(__name__)

#: Files written per input (``done.json`` comes last and lists them with their sizes).
OUTPUT_FILES = ("sites.csv", "classes.png", "defects.png", "summary.json")
#: Files a stack (time series) adds: its defect tracks (:mod:`stemfast.tracking`).
STACK_OUTPUT_FILES = TRACK_FILES
DONE_FILE = "done.json"
SKIPPED_FILE = "skipped.json"
MODEL_FILE = "model.pt"
MODEL_INFO_FILE = "model.json"
CONFIG_FILE = "stemfast.toml"
BATCH_SUMMARY_FILE = "batch_summary.json"
REPORT_FILE = "report.html"
PARTS_DIR = ".parts"
_RESERVED = {MODEL_FILE, MODEL_INFO_FILE, CONFIG_FILE, BATCH_SUMMARY_FILE, REPORT_FILE, PARTS_DIR}

#: Columns that come first in ``sites.csv`` (then ``x_nm, y_nm`` when calibrated, then the rest).
LEADING_COLUMNS = ("frame", "x", "y", "source", "intensity", "class_id", "recon_error", "anomaly_score",
                   "is_defect", "defect_kind", "angle")
_CALIBRATED_COLUMNS = ("x_nm", "y_nm")
_COORD_COLUMNS = {"x", "y", "x_nm", "y_nm"}
_STAGES = ("read", "spacing", "bandpass", "peaks", "lattice", "describe", "patches", "encode", "analysis")

_DRIFT_MAX_PX = 512  # frames are block-averaged to at most this size for the drift estimate
DRIFT_RESOLUTION_PX = 0.02  # step of the sub-pixel drift search, in full-resolution px


def _io():
    from . import io as _stemfast_io

    return _stemfast_io


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _peak_memory_mib() -> float:
    """Peak resident memory of this process so far (``getrusage`` maxrss), MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r) / (1024.0 * 1024.0) if sys.platform == "darwin" else float(r) / 1024.0


def _bar(iterable, show: bool, **kwargs):
    """A progress bar (stemfast.logutil.progress: only on a terminal), or none when ``show`` is False."""
    if not show:
        kwargs["disable"] = True
    return progress(iterable, **kwargs)


def _test_hook(point: str, name: str) -> None:
    """Crash injection for the tests (see the module docstring); a no-op unless configured."""
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


# ----------------------------------------------------------------------------- inputs


@dataclass
class InputEntry:
    """One input file of a batch and its fingerprint."""

    path: Path
    name: str  # output folder name (unique within the batch)
    rel: str  # path relative to the input root (for display)
    size: int = -1
    mtime_ns: int = -1
    sha256: str | None = None
    n_frames: int | None = None  # known once the file has been opened

    def fingerprint(self) -> dict:
        return {"path": str(self.path), "rel": self.rel, "sha256": self.sha256, "size": self.size,
                "mtime_ns": self.mtime_ns}


_NAME_BAD = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe_name(s: str) -> str:
    s = _NAME_BAD.sub("_", s).strip("._") or "input"
    return s + "_" if s in _RESERVED or s.startswith(".") else s


def _unique_names(rels: Sequence[Path]) -> list[str]:
    """File stem; duplicates get their relative path (``a/b/img`` -> ``a__b__img``), then the suffix."""
    stems = [_safe_name(r.stem) for r in rels]
    counts = {s: stems.count(s) for s in stems}
    names = []
    for r, s in zip(rels, stems):
        if counts[s] > 1:
            s = _safe_name("__".join(r.with_suffix("").parts))
        names.append(s)
    counts = {s: names.count(s) for s in names}
    out = []
    for r, s in zip(rels, names):
        if counts[s] > 1:
            s = _safe_name("__".join(r.parts).replace(".", "_"))
        out.append(s)
    # last resort (case-insensitive file systems, sanitised clashes): number them
    seen: dict[str, int] = {}
    final = []
    for s in out:
        k = s.lower()
        if k in seen:
            seen[k] += 1
            s = f"{s}_{seen[k]}"
        else:
            seen[k] = 0
        final.append(s)
    return final


def discover_inputs(inputs, *, exclude: Path | None = None,
                    problems: list[tuple[Path, str]] | None = None) -> list[InputEntry]:
    """The batch's input files: folders are searched recursively by extension; files are taken as given.

    ``exclude`` (the output folder) is never searched. Entries are sorted by relative path.
    Entries that cannot be looked at (an unreadable sub-folder, a dangling symbolic link) are
    appended to ``problems`` as ``(path, reason)`` when it is given (else logged).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    io = _io()
    found: list[tuple[Path, Path]] = []  # (path, root)
    excl = exclude.resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files, probs = io.scan_micrographs(p, recursive=True)
            for q, reason in probs:
                if excl is not None and (q.absolute() == excl or excl in q.absolute().parents):
                    continue
                if problems is not None:
                    problems.append((q, reason))
                else:
                    log.warning("%s: %s", q, reason)
            for f in files:
                f = Path(f)
                if excl is not None and (f.resolve() == excl or excl in f.resolve().parents):
                    continue
                found.append((f, p))
        elif p.exists():
            found.append((p, p.parent))
        elif p.is_symlink():
            if problems is None:
                raise FileNotFoundError(f"input not found: {p} (a dangling symbolic link)")
            problems.append((p, f"dangling symbolic link (points to {os.readlink(p)}, which does not exist)"))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    seen = set()
    uniq = []
    for f, root in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            uniq.append((f, root))
    rels = []
    for f, root in uniq:
        try:
            rels.append(f.resolve().relative_to(root.resolve()))
        except ValueError:
            rels.append(Path(f.name))
    order = sorted(range(len(uniq)), key=lambda i: (rels[i].as_posix(), str(uniq[i][0])))
    uniq = [uniq[i] for i in order]
    rels = [rels[i] for i in order]
    names = _unique_names(rels)
    return [InputEntry(path=f, name=n, rel=r.as_posix()) for (f, _), n, r in zip(uniq, names, rels)]


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _fingerprint(entry: InputEntry, out_dir: Path) -> None:
    """Fill size / mtime (stat) and the content fingerprint (:func:`stemfast.fingerprint.content_fingerprint`).

    The content is always read (a full SHA-256 up to 256 MiB, sampled blocks beyond), never taken
    from size and mtime: ``cp -p`` / ``rsync -a`` keep those for new content.
    """
    from .fingerprint import content_fingerprint

    st = entry.path.stat()
    entry.size, entry.mtime_ns = int(st.st_size), int(st.st_mtime_ns)
    if entry.sha256 is not None:
        return
    entry.sha256 = content_fingerprint(entry.path)


def _read(path, read_options: ReadOptions | None = None, **kwargs):
    """``io.read`` with the batch's read options (``--fill-nonfinite``); warnings go to the log."""
    opts = read_options or ReadOptions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mg = _io().read(path, **opts.as_read_kwargs(), **kwargs)
    for w in caught:
        log.warning("%s", w.message)
    return mg


def _inputs_key(entries: Sequence[InputEntry]) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.name):
        h.update(f"{e.name}\0{e.sha256}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- results


@dataclass
class InputResult:
    """What happened to one input in a batch run.

    ``status``: ``done`` (processed now), ``current`` (finished by an earlier run, not touched),
    ``partial`` (processed, but some frames failed), ``skipped`` (could not be read), ``failed``
    (an error while processing).
    """

    name: str
    path: str
    status: str
    reason: str | None = None
    n_sites: int = 0
    n_defects: int = 0
    seconds: float = 0.0
    frames: int | None = None
    warnings: list = field(default_factory=list)  # results that cannot be fully trusted, and why

    @property
    def ok(self) -> bool:
        return self.status in ("done", "current")


@dataclass
class BatchReport:
    """Result of :func:`run_batch`."""

    out_dir: Path
    results: list[InputResult]
    config_hash: str
    model_path: Path | None = None
    model_sha256: str | None = None
    model_trained: bool = False
    model_source: str | None = None
    train_seconds: float = 0.0
    stage_table: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: str | None = None
    #: entries of the input folders that could not be looked at (also in ``results``, as skipped)
    problems: list[InputResult] = field(default_factory=list)

    @property
    def skipped(self) -> list[InputResult]:
        """Inputs without full results (skipped, failed or partial), with their reasons."""
        return [r for r in self.results if not r.ok]

    @property
    def did_work(self) -> bool:
        """False when the run found everything current: nothing read, trained or written."""
        found = {id(r) for r in self.problems}  # seen again, not work
        return self.model_trained or any(r.status in ("done", "partial", "failed") for r in self.results) \
            or any(r.status == "skipped" and not (r.reason or "").startswith("(cached)") and id(r) not in found
                   for r in self.results)

    @property
    def exit_code(self) -> int:
        if not self.results:
            return EXIT_ERROR
        return EXIT_OK if all(r.ok for r in self.results) else EXIT_SKIPPED

    def by_name(self, name: str) -> InputResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)


# ----------------------------------------------------------------------------- per-frame work


@dataclass
class FrameResult:
    """One analysed frame: a JSON-able record, the site table and the top candidates' patches."""

    meta: dict
    table: object | None = None  # SiteTable
    top_patches: np.ndarray | None = None


def _get_frame(mg, i: int) -> np.ndarray:
    if getattr(mg, "is_stack", False):
        return np.asarray(mg.frame(i))
    return np.asarray(mg.data)


def _n_frames(mg) -> int:
    return int(getattr(mg, "n_frames", 1) or 1) if getattr(mg, "is_stack", False) else 1


def _small(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    f = max(1, int(math.ceil(max(a.shape) / _DRIFT_MAX_PX)))
    if f > 1:
        H, W = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        a = a[:H, :W].reshape(H // f, f, W // f, f).mean(axis=(1, 3))
    return a


def _drift(prev: np.ndarray, cur: np.ndarray, full_shape: tuple[int, int]) -> tuple[float, float]:
    """Displacement (dx, dy) in full-resolution px of the content of ``cur`` relative to ``prev``.

    Phase cross-correlation (scikit-image) of the block-averaged frames, Hann windowed. On a
    perfect crystal the shift is only defined modulo the lattice; non-periodic features (defects,
    holes, contamination) resolve it.
    """
    from skimage.registration import phase_cross_correlation

    win = np.outer(np.hanning(prev.shape[0]), np.hanning(prev.shape[1])).astype(np.float32)
    a = (prev - prev.mean()) * win
    b = (cur - cur.mean()) * win
    fy = full_shape[0] / prev.shape[0]
    fx = full_shape[1] / prev.shape[1]
    # sub-pixel steps of DRIFT_RESOLUTION_PX at full resolution (the frames were block-averaged)
    up = int(math.ceil(max(fx, fy) / DRIFT_RESOLUTION_PX))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shift, _err, _ph = phase_cross_correlation(a, b, upsample_factor=up, normalization=None)
    # shift registers cur onto prev, i.e. it undoes the motion: the content moved by -shift
    return float(-shift[1] * fx), float(-shift[0] * fy)


def _frame_record(frame: int) -> dict:
    return {"frame": int(frame), "status": "error", "error": None, "n_sites": 0, "n_defects": 0,
            "class_counts": {}, "defect_kinds": {}, "spacing_px": None, "angle_deg": None,
            "timings_s": {}, "drift_px": None, "top": [], "warnings": []}


def _settings_vs_image(img: np.ndarray, config, *, check_estimate: bool) -> list[str]:
    """Settings checked against the image (:mod:`stemfast.sanity`): a spacing that does not fit is a
    ValueError (the frame's error); one that disagrees with the image's estimate a warning."""
    from .sanity import check_spacing_fits, spacing_warnings

    sp = config.sites.spacing
    check_spacing_fits(sp, np.shape(img))
    return spacing_warnings(img, sp, config.sites) if (check_estimate and sp is not None) else []


def _analyze_frame(img: np.ndarray, frame: int, *, model, config, patch_size: int | None, pixel_size, unit,
                   prep=None, read_s: float = 0.0, check_settings: bool = False) -> FrameResult:
    """``prepare`` + ``analyze`` one 2-D frame; errors of the image (ValueError) become the frame's status.

    ``check_settings``: also compare a given spacing with the image's own estimate (a warning).
    """
    from .pipeline import analyze, prepare

    rec = _frame_record(frame)
    rec["timings_s"]["read"] = read_s
    try:
        for msg in _settings_vs_image(img, config, check_estimate=check_settings):
            log.warning("frame %d: %s", frame, msg)
            rec["warnings"].append(msg)
        if prep is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prep = prepare(img, config=config, pixel_size=pixel_size, unit=unit, patch_size=patch_size)
            for w in caught:
                log.info("frame %d: %s", frame, w.message)
        if len(prep.patches) and model is None:
            raise RuntimeError("no model: none could be trained (no input of the batch had a lattice)")
        table, summ = analyze(prep, model, config=config)
    except ValueError as exc:
        rec["error"] = str(exc)
        return FrameResult(rec)
    rec["timings_s"].update({k: float(v) for k, v in prep.timings.items()})
    meta = prep.sites.meta
    n = len(table)
    rec.update(status=str(meta.get("status", "ok")) if n else str(meta.get("status", "no lattice")),
               n_sites=int(n), spacing_px=meta.get("spacing_px"), angle_deg=meta.get("angle_deg"),
               lattice=meta.get("lattice"))
    table = table.with_columns({"frame": np.full(n, frame, dtype=np.int64)})
    top_patches = None
    if n and "class_id" in table:
        rec["n_defects"] = int(summ.get("n_defects", 0))
        rec["class_counts"] = {str(k): int(v) for k, v in summ.get("class_counts", {}).items()}
        rec["defect_kinds"] = {str(k): int(v) for k, v in summ.get("defect_kinds", {}).items()}
        rec["n_classes"] = int(summ.get("n_classes", 0))
        for key in ("class_sublattice_ari", "class_warning", "material", "score"):  # the analysis' own report
            if key in summ:
                rec[key] = summ[key]
        is_def = np.asarray(table["is_defect"], bool)
        top = []
        for t in summ.get("top", []):
            t = dict(t)
            t["frame"] = int(frame)
            t["is_defect"] = bool(is_def[t["index"]])
            top.append(t)
        rec["top"] = top
        idx = np.array([t["index"] for t in top], dtype=np.int64)
        top_patches = np.asarray(prep.patches[idx], dtype=np.float32) if len(idx) else \
            np.zeros((0, prep.patch_size, prep.patch_size), np.float32)
    return FrameResult(rec, table, top_patches)


def _prefetched(mg, frames: Sequence[int]) -> Iterator[tuple[int, np.ndarray | None, Exception | None, float]]:
    """Yield ``(frame, image, read_error, wait_s)`` for ``frames``, reading frame ``i + 1`` while ``i`` is analysed.

    One background thread reads ahead by one frame (so at most two frames are in memory, whatever
    the length of the stack); ``wait_s`` is the time the consumer waited for the frame, i.e. the
    part of the reading that did not overlap with the analysis. A single image is read in place.
    """
    from concurrent.futures import ThreadPoolExecutor

    frames = list(frames)
    ahead = len(frames) > 1 and getattr(mg, "is_stack", False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemfast-read") if ahead else None

    def start(f: int):
        """A call returning frame ``f``: already being read in the background, or read when called."""
        return pool.submit(_get_frame, mg, f).result if pool is not None else (lambda: _get_frame(mg, f))

    try:
        nxt = start(frames[0]) if frames else None
        for j, f in enumerate(frames):
            t0 = time.perf_counter()
            try:
                img, exc = nxt(), None
            except Exception as e:  # noqa: BLE001 - reported per frame by the caller
                img, exc = None, e
            wait = time.perf_counter() - t0
            nxt = start(frames[j + 1]) if j + 1 < len(frames) else None
            yield f, img, exc, wait
            img = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _iter_frames(mg, frames: Sequence[int], *, model, config, patch_size, cache: dict | None = None,
                 cache_key: str = "", prev_frame: int | None = None, bar: bool = False,
                 desc: str = "") -> Iterator[FrameResult]:
    """Analyse ``frames`` of ``mg`` one by one (lazy frames), measuring the drift to the previous frame."""
    prev_small = None
    if prev_frame is not None and prev_frame >= 0:
        try:
            prev_small = _small(_get_frame(mg, prev_frame))
        except Exception as exc:  # noqa: BLE001 - the previous frame is only needed for the drift
            log.info("%s: frame %d unreadable for the drift: %s", desc, prev_frame, exc)
    stack = getattr(mg, "is_stack", False)
    it = _bar(_prefetched(mg, frames), bar and len(frames) > 1, desc=desc, unit="frame", leave=False,
              total=len(frames))
    checked = False
    for f, img, exc, read_s in it:
        if exc is not None:  # a truncated stack: report the frame, go on
            rec = _frame_record(f)
            rec["error"] = f"cannot read frame {f}: {exc}"
            prev_small = None
            yield FrameResult(rec)
            continue
        prep = cache.pop((cache_key, f), None) if cache is not None else None
        fr = _analyze_frame(img, f, model=model, config=config, patch_size=patch_size,
                            pixel_size=mg.pixel_size, unit=mg.unit, prep=prep, read_s=read_s,
                            check_settings=not checked)
        checked = True
        if stack:
            small = _small(img)
            if prev_small is not None and prev_small.shape == small.shape:
                fr.meta["drift_px"] = list(_drift(prev_small, small, img.shape))
            prev_small = small
        yield fr


# ----------------------------------------------------------------------------- assembling the outputs


def _column_order(names: Sequence[str]) -> list[str]:
    lead = [c for c in LEADING_COLUMNS if c in names]
    cal = [c for c in _CALIBRATED_COLUMNS if c in names]
    return lead + cal + [c for c in names if c not in lead and c not in cal]


def _format_column(a: np.ndarray, name: str) -> list[str]:
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return np.char.mod("%.8g" if name in _COORD_COLUMNS else "%.6g", a).tolist()
    if a.dtype.kind == "b":
        return np.where(a, "1", "0").tolist()
    if a.dtype.kind in "iu":
        return a.astype(str).tolist()
    out = []
    for v in a.tolist():
        s = str(v)
        if any(ch in s for ch in ',"\n\r'):
            s = '"' + s.replace('"', '""') + '"'
        out.append(s)
    return out


class _CsvStream:
    """Writes site tables frame after frame into one CSV (header from the first non-empty table)."""

    CHUNK = 1 << 16  # rows formatted at a time

    def __init__(self, fh) -> None:
        self.fh = fh
        self.names: list[str] | None = None
        self.n_rows = 0
        self._warned = False

    def write(self, table) -> None:
        if table is None or len(table) == 0:
            return
        if self.names is None:
            self.names = _column_order(table.names)
            self.fh.write(",".join(self.names) + "\n")
        n = len(table)
        extra = [c for c in table.names if c not in self.names]
        if extra and not self._warned:
            log.warning("sites.csv: columns %s of a later frame are not in the header; left out", extra)
            self._warned = True
        # formatted CHUNK rows at a time: strings for every cell of a 1.3M-site table at once took
        # ~3 GB (the 16k x 16k image's batch peaked at 5.4 GB in this step); the bytes are the same
        arrays = [table[c] if c in table else None for c in self.names]
        for a in range(0, n, self.CHUNK):
            b = min(n, a + self.CHUNK)
            cols = [_format_column(col[a:b], c) if col is not None else [""] * (b - a)
                    for col, c in zip(arrays, self.names)]
            self.fh.write("".join(",".join(row) + "\n" for row in zip(*cols)))
        self.n_rows += n

    def finish(self) -> None:
        if self.names is None:
            self.names = list(LEADING_COLUMNS)
            self.fh.write(",".join(self.names) + "\n")


def _median(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else None


def _assemble(entry: InputEntry, d: Path, results: Iterable[FrameResult], *, n_frames: int, is_stack: bool,
              input_info: dict, get_frame: Callable[[int], np.ndarray], config, chash: str,
              model_sha: str | None, t_start: float) -> dict:
    """Stream frame results into ``d/sites.csv``, draw the figures, write ``summary.json``.

    Returns the summary. ``done.json`` is written by the caller (last).
    """
    from .report import plot_class_map, plot_defects, stage_table_rows

    top_n = int(getattr(config.analysis, "top_n", 50))
    frames_meta: list[dict] = []
    totals_cls: dict[str, int] = {}
    totals_kind: dict[str, int] = {}
    stage_s: dict[str, float] = {}
    n_sites = n_def = 0
    n_classes = 0
    cand: list[tuple[tuple, dict, np.ndarray | None]] = []
    show = None  # (frame, x, y, class_id, is_defect, spacing) of the class-map frame
    trk = _stack_tracker(d, config, input_info) if is_stack else None  # defects linked through the frames
    with atomic_open(d / "sites.csv", "w", newline="", encoding="utf-8") as fh, (trk or contextlib.nullcontext()):
        csv = _CsvStream(fh)
        for fr in results:
            m = fr.meta
            for t in (trk.push(m, fr.table) if trk else (fr.table,)):
                csv.write(t)
            for k, v in m.get("timings_s", {}).items():
                stage_s[k] = stage_s.get(k, 0.0) + float(v)
            n_sites += int(m.get("n_sites", 0))
            n_def += int(m.get("n_defects", 0))
            n_classes = max(n_classes, int(m.get("n_classes", 0) or 0))
            for k, v in m.get("class_counts", {}).items():
                totals_cls[k] = totals_cls.get(k, 0) + int(v)
            for k, v in m.get("defect_kinds", {}).items():
                totals_kind[k] = totals_kind.get(k, 0) + int(v)
            if show is None and fr.table is not None and len(fr.table) and "class_id" in fr.table:
                t = fr.table
                show = (m["frame"], np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["class_id"]),
                        np.asarray(t["is_defect"], bool), m.get("spacing_px"))
            for j, c in enumerate(m.get("top", [])):
                p = fr.top_patches[j] if fr.top_patches is not None and j < len(fr.top_patches) else None
                cand.append(((-float(c["anomaly_score"]), int(c["frame"]), int(c["index"])), c, p))
            if len(cand) > top_n:
                cand.sort(key=lambda t: t[0])
                del cand[top_n:]
            frames_meta.append({k: v for k, v in m.items() if k != "top"})
            fr.table = None  # free the frame's table before the next one is produced
        for t in (trk.finish() if trk else ()):
            csv.write(t)
        csv.finish()
    cand.sort(key=lambda t: t[0])
    top = [c for _, c, _ in cand]
    errors = {str(m["frame"]): m["error"] for m in frames_meta if m.get("error")}
    n_ok = sum(1 for m in frames_meta if not m.get("error"))
    if n_ok == 0:
        first = next(iter(errors.values()), "no frames")
        raise _InputUnreadable(first)

    # figures
    t0 = time.perf_counter()
    if show is not None:
        f0, x, y, cid, isd, sp = show
        plot_class_map(d / "classes.png", get_frame(f0), x, y, cid, is_defect=isd, spacing_px=sp,
                       title=f"{entry.name}: site classes" + (f" (frame {f0} of {n_frames})" if is_stack else ""))
    else:
        f0 = next((m["frame"] for m in frames_meta if not m.get("error")), 0)
        plot_class_map(d / "classes.png", get_frame(f0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64),
                       title=f"{entry.name}: no lattice" + (f" (frame {f0})" if is_stack else ""))
    gallery = cand[:24]
    if gallery:
        fmap = gallery[0][1]["frame"]
        cands = []
        for r, (_, c, _) in enumerate(gallery):
            cands.append({**c, "rank": r + 1, "on_map": c["frame"] == fmap, "show_frame": is_stack})
        pats = [p for _, _, p in gallery]
        patches = np.stack(pats) if all(p is not None for p in pats) else None
        sp = next((m.get("spacing_px") for m in frames_meta if m["frame"] == fmap), None)
        plot_defects(d / "defects.png", get_frame(fmap), cands, patches, spacing_px=sp,
                     title=f"{entry.name}: top defect candidates" + (f" (map: frame {fmap})" if is_stack else ""))
    else:
        f0 = next((m["frame"] for m in frames_meta if not m.get("error")), 0)
        plot_defects(d / "defects.png", get_frame(f0), [], None, title=f"{entry.name}: no candidates")
    if trk:
        trk.plot(get_frame, title=f"{entry.name}: defect tracks")
    stage_s["figures"] = time.perf_counter() - t0

    warns: list[str] = []
    for note in input_info.get("notes", []):
        warns.append(note)
    for m in frames_meta:
        for w in list(m.get("warnings") or []) + _lattice_warnings(m.get("lattice")):
            w = w if not is_stack else f"frame {m['frame']}: {w}"
            if w not in warns:
                warns.append(w)
    spacing = _median(m.get("spacing_px") for m in frames_meta)
    pixel_size = input_info.get("pixel_size")
    lattice = {"spacing_px": spacing, "rotation_deg": _median(m.get("angle_deg") for m in frames_meta)}
    # how the lattice was found and how sure it is (first frame that has one; sites.find_sites)
    found = next((m["lattice"] for m in frames_meta if m.get("lattice")), None)
    if found:
        lattice.update({k: v for k, v in found.items() if k != "spacing_px"})
    to_nm = _io().unit_to_nm(input_info.get("unit")) if pixel_size else None
    if pixel_size and spacing and to_nm:
        lattice["spacing_nm"] = spacing * float(pixel_size) * to_nm
    status = "ok" if not errors else "partial"
    if status == "ok" and n_sites == 0:
        status = "no lattice"
    summary = {
        "name": entry.name,
        "status": status,
        "input": {**entry.fingerprint(), **input_info},
        "stemfast_version": __version__,
        "config_hash": chash,
        "model_sha256": model_sha,
        "model": _model_identity(d.parent, model_sha),
        "n_frames": int(n_frames),
        "n_frames_ok": int(n_ok),
        "n_sites": int(n_sites),
        "n_defects": int(n_def),
        "n_classes": int(n_classes),
        "class_counts": dict(sorted(totals_cls.items(), key=lambda kv: int(kv[0]))),
        "defect_kinds": dict(sorted(totals_kind.items())),
        "lattice": lattice,
        # do the learned classes follow the metal / chalcogen / hollow sublattices (analysis.analyze_sites)
        "class_sublattice_ari": _median(m.get("class_sublattice_ari") for m in frames_meta),
        "timings_s": stage_s,
        "throughput": stage_table_rows({k: v for k, v in stage_s.items() if k in _STAGES}, n_sites),
        "peak_memory_mib": _peak_memory_mib(),
        "top": top,
        "frames": frames_meta,
    }
    if is_stack:
        fr_ = [m["frame"] for m in frames_meta if m.get("drift_px") is not None]
        summary["drift_px"] = {
            "note": "displacement of frame i relative to frame i-1 (x = column, y = row), full-resolution px",
            "frame": fr_,
            "dx": [m["drift_px"][0] for m in frames_meta if m.get("drift_px") is not None],
            "dy": [m["drift_px"][1] for m in frames_meta if m.get("drift_px") is not None],
        }
    if trk:
        summary["tracking"] = trk.summary()
    if errors:
        summary["frame_errors"] = errors
    class_warning = next((m["class_warning"] for m in frames_meta if m.get("class_warning")), None)
    if class_warning:
        summary["class_warning"] = class_warning
        if class_warning not in warns:
            warns.append(class_warning)
    summary["warnings"] = warns
    summary["seconds"] = time.perf_counter() - t_start
    summary["outputs"] = list(OUTPUT_FILES) + (list(trk.FILES) if trk else [])
    write_json(d / "summary.json", summary)
    return summary


def _stack_tracker(d: Path, config, input_info: dict):
    """The defect tracking of a stack (:mod:`stemfast.tracking`), or None when switched off."""
    from .tracking import StackTracker, TrackSettings

    settings = getattr(config, "tracking", None) or TrackSettings()
    if not settings.enabled:
        return None
    ps = input_info.get("pixel_size")
    to_nm = _io().unit_to_nm(input_info.get("unit")) if ps else None
    return StackTracker(d, settings=settings, nm_per_px=float(ps) * to_nm if ps and to_nm else None,
                        shape=input_info.get("shape"), dose=input_info.get("dose"),
                        cutoff=getattr(getattr(config, "analysis", None), "defect_cutoff", None))


class _InputUnreadable(Exception):
    """No frame of the input could be read."""


def _clean_dir(d: Path) -> None:
    """Remove stale temporary files of an interrupted earlier run (the outputs and markers stay: new
    outputs replace them as a whole, see :func:`stemfast.atomic.staged_dir`)."""
    for p in d.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            p.unlink()


def _write_done(entry: InputEntry, d: Path, summary: dict, *, chash: str, model_sha: str | None) -> dict:
    outputs = {}
    for f in summary.get("outputs", OUTPUT_FILES):
        outputs[f] = (d / f).stat().st_size
    done = {
        "name": entry.name,
        "status": summary["status"],
        "reason": _partial_reason(summary),
        "stemfast_version": __version__,
        "input": entry.fingerprint(),
        "config_hash": chash,
        "model_sha256": model_sha,
        "outputs": outputs,
        "n_sites": summary["n_sites"],
        "n_defects": summary["n_defects"],
        "n_frames": summary["n_frames"],
        "finished": _now(),
    }
    _test_hook("before_done", entry.name)
    write_json(d / DONE_FILE, done)
    return done


def _partial_reason(summary: dict) -> str | None:
    errs = summary.get("frame_errors") or {}
    if not errs:
        return None
    first = next(iter(errs.items()))
    return f"{len(errs)} of {summary['n_frames']} frames failed (frame {first[0]}: {first[1]})"


def _skip(entry: InputEntry, d: Path, reason: str, *, cache: bool, status: str = "skipped",
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
                                          "read": (read_options or ReadOptions()).key(), "config_hash": chash,
                                          "date": _now()})
        except OSError as exc:  # e.g. disk full: the skip is still reported, only not remembered
            log.error("%s: could not record the skip: %s", entry.rel, describe_os_error(exc))
    return InputResult(entry.name, str(entry.path), status, reason)


def _failure_reason(exc: BaseException) -> str:
    """The reason of an input that failed while being processed (OSError: path and cause)."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    return f"{type(exc).__name__}: {exc}"


def _result_from_summary(entry: InputEntry, summary: dict, seconds: float) -> InputResult:
    st = summary["status"]
    return InputResult(entry.name, str(entry.path), "partial" if st == "partial" else "done",
                       _partial_reason(summary), summary["n_sites"], summary["n_defects"], seconds,
                       summary["n_frames"], list(summary.get("warnings") or []))


def _lattice_warnings(lat) -> list[str]:
    """The warnings of a frame's ``meta["lattice"]`` (sites.find_sites): an unsure lattice, an
    anisotropic one, a calibration that does not fit the material."""
    if not lat:
        return []
    out = []
    if lat.get("unsure"):
        out.append("the site lattice is uncertain: " + "; ".join(lat["unsure"]))
    if (lat.get("distortion") or {}).get("warning"):
        out.append(lat["distortion"]["warning"])
    if lat.get("calibration_ok") is False:
        out.append(f"the pixel size and the material ({lat.get('material')}) predict a site spacing of "
                   f"{lat.get('calibration_expected_spacing_px')} px, the image shows {lat.get('spacing_px')} px: "
                   "check the calibration or the material")
    return out


def _input_info(mg) -> dict:
    shape = None
    with contextlib.suppress(Exception):
        shape = list(np.shape(mg.data))
    from .tracking import dose_from_metadata

    info = {"shape": shape, "n_frames": _n_frames(mg), "is_stack": bool(getattr(mg, "is_stack", False)),
            "pixel_size": getattr(mg, "pixel_size", None), "unit": getattr(mg, "unit", None),
            "dose": dose_from_metadata(getattr(mg, "metadata", None))}
    meta = getattr(mg, "metadata", None) or {}
    notes = []
    if meta.get("rescaled"):
        info["rescaled"] = meta["rescaled"]
        r = meta["rescaled"]
        notes.append(f"pixel values rescaled to (x - {r.get('offset')}) / {r.get('scale')} (beyond what float32 "
                     "carries safely); intensities are in these units")
    if meta.get("nonfinite_replaced"):
        info["nonfinite_replaced"] = meta["nonfinite_replaced"]
        notes.append(f"{meta['nonfinite_replaced']} NaN/infinite pixels replaced by the frame median "
                     "(--fill-nonfinite); sites there are not measured")
    if notes:
        info["notes"] = notes
    return info


def _patch_size_of(model, config) -> int | None:
    extra = getattr(model, "extra", None) or {}
    return extra.get("patch_size") or config.patch_size


def process_input(entry: InputEntry, out_dir: str | os.PathLike, *, model, model_sha: str | None, config,
                  chash: str, prepared_cache: dict | None = None, show_progress: bool = False,
                  read_options: ReadOptions | None = None) -> InputResult:
    """Analyse one input completely and write its outputs, ``done.json`` last.

    The outputs are written into a staging folder that replaces ``OUT/<name>/`` as a whole, so a
    failure (disk full, Ctrl-C) leaves the previous complete set in place. Used by the in-process
    batch and by Dask workers (one task per 2-D file). Never raises for a bad input: the problem
    becomes the result's status and reason.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    d = out_dir / entry.name
    if d.is_dir():
        _clean_dir(d)
    _test_hook("task_start", entry.name)
    io = _io()
    try:
        t0 = time.perf_counter()
        mg = _read(entry.path, read_options)
        read_open = time.perf_counter() - t0
    except io.ReadError as exc:
        return _skip(entry, d, str(exc), cache=True, read_options=read_options)
    except Exception as exc:  # noqa: BLE001 - any reader failure: report, do not stop the batch
        return _skip(entry, d, f"cannot read: {type(exc).__name__}: {exc}", cache=True, read_options=read_options)
    n = _n_frames(mg)
    entry.n_frames = n
    stack = bool(getattr(mg, "is_stack", False))
    try:
        gen = _iter_frames(mg, list(range(n)), model=model, config=config, patch_size=_patch_size_of(model, config),
                           cache=prepared_cache, cache_key=entry.name, bar=show_progress, desc=entry.name)

        def with_open_time(g):
            first = True
            for fr in g:
                if first:
                    fr.meta["timings_s"]["read"] = fr.meta["timings_s"].get("read", 0.0) + read_open
                    first = False
                yield fr

        with staged_dir(d) as stage:
            summary = _assemble(entry, stage, with_open_time(gen), n_frames=n, is_stack=stack,
                                input_info=_input_info(mg), get_frame=lambda i: _get_frame(mg, i), config=config,
                                chash=chash, model_sha=model_sha, t_start=t_start)
            _write_done(entry, stage, summary, chash=chash, model_sha=model_sha)
    except _InputUnreadable as exc:
        return _skip(entry, d, str(exc), cache=True, read_options=read_options, chash=chash)
    except Exception as exc:  # noqa: BLE001
        log.debug("%s failed", entry.rel, exc_info=True)
        return _skip(entry, d, _failure_reason(exc), cache=False, status="failed")
    finally:
        if prepared_cache is not None:
            for k in [k for k in prepared_cache if k[0] == entry.name]:
                del prepared_cache[k]
    _test_hook("after_done", entry.name)
    return _result_from_summary(entry, summary, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- frame chunks (Dask)


def _part_path(d: Path, start: int, stop: int) -> Path:
    return d / PARTS_DIR / f"frames_{start:06d}_{stop:06d}.npz"


def _part_key(entry: InputEntry, start: int, stop: int, chash: str, model_sha: str | None) -> dict:
    return {"sha256": entry.sha256, "start": start, "stop": stop, "config_hash": chash, "model_sha256": model_sha,
            "stemfast_version": __version__}


def _save_part(path: Path, results: list[FrameResult], key: dict, info: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    metas = []
    for k, r in enumerate(results):
        cols = []
        if r.table is not None:
            for c in r.table.names:
                a = np.asarray(r.table[c])
                if a.dtype.kind == "O":
                    a = a.astype(str)
                arrays[f"t{k}__{c}"] = a
                cols.append(c)
        if r.top_patches is not None:
            arrays[f"p{k}"] = np.asarray(r.top_patches)
        metas.append({"meta": r.meta, "columns": cols if r.table is not None else None,
                      "patches": r.top_patches is not None})
    arrays["__meta__"] = np.array(json.dumps({"key": key, "info": info, "frames": metas}, default=_json_default))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _part_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"]))
    except (OSError, ValueError, KeyError):
        return None


def _load_part(path: Path) -> Iterator[FrameResult]:
    from .table import SiteTable

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        for k, fm in enumerate(meta["frames"]):
            table = None
            if fm["columns"] is not None:
                table = SiteTable({c: z[f"t{k}__{c}"] for c in fm["columns"]})
            pats = z[f"p{k}"] if fm["patches"] else None
            yield FrameResult(fm["meta"], table, pats)


def process_chunk(entry: InputEntry, out_dir: str | os.PathLike, start: int, stop: int, *, model,
                  model_sha: str | None, config, chash: str, read_options: ReadOptions | None = None) -> str:
    """Analyse frames ``start:stop`` of a stack into ``OUT/<name>/.parts/frames_START_STOP.npz``.

    A part that already exists for the same input, settings and model is kept (a rerun after a
    crash does not redo it). Returns the part's path. Raises when the file cannot be opened.
    """
    d = Path(out_dir) / entry.name
    path = _part_path(d, start, stop)
    key = _part_key(entry, start, stop, chash, model_sha)
    old = _part_meta(path) if path.exists() else None
    if old is not None and old.get("key") == key:
        return str(path)
    _test_hook("task_start", f"{entry.name}[{start}:{stop}]")
    lo = max(0, start - 1)  # the frame before the chunk, for the drift
    # only the chunk's frames are read (compressed stacks are not loaded whole)
    mg = _FrameWindow(_read(entry.path, read_options, frames=slice(lo, stop)), lo)
    results = list(_iter_frames(mg, list(range(start, stop)), model=model, config=config,
                                patch_size=_patch_size_of(model, config), prev_frame=start - 1,
                                desc=f"{entry.name}[{start}:{stop}]"))
    n = entry.n_frames if entry.n_frames is not None else stop
    info = {**_input_info(mg.mg), "n_frames": int(n), "is_stack": True,
            "shape": [int(n), *[int(v) for v in np.shape(mg.mg.data)[-2:]]]}
    _save_part(path, results, key, info)
    return str(path)


class _FrameWindow:
    """Frames ``offset, offset + 1, ...`` of a stack read with ``io.read(frames=slice)``, by their
    index in the whole stack."""

    is_stack = True

    def __init__(self, mg, offset: int) -> None:
        self.mg, self.offset = mg, int(offset)
        self.pixel_size, self.unit = mg.pixel_size, mg.unit

    def frame(self, i: int) -> np.ndarray:
        j = int(i) - self.offset
        if j < 0:
            raise IndexError(f"frame {i} is before this window (starts at {self.offset})")
        if not getattr(self.mg, "is_stack", False):  # a one-frame window comes back 2-D
            if j != 0:
                raise IndexError(f"frame {i} is outside this window")
            return np.asarray(self.mg.data)
        return np.asarray(self.mg.frame(j))


def assemble_parts(entry: InputEntry, out_dir: str | os.PathLike, part_paths: Sequence[str], *, config,
                   chash: str, model_sha: str | None, t_start: float | None = None,
                   read_options: ReadOptions | None = None) -> InputResult:
    """Write the outputs of a stack from its frame-chunk parts (in order), ``done.json`` last, into a
    staging folder that replaces ``OUT/<name>/`` (parts included) as a whole."""
    t_start = time.perf_counter() if t_start is None else t_start
    d = Path(out_dir) / entry.name
    d.mkdir(parents=True, exist_ok=True)
    _clean_dir(d)
    parts = [Path(p) for p in part_paths]
    info = (_part_meta(parts[0]) or {}).get("info", {}) if parts else {}
    n = int(info.get("n_frames", sum(len((_part_meta(p) or {}).get("frames", [])) for p in parts)))
    mg_holder: list = []

    def get_frame(i: int) -> np.ndarray:
        if not mg_holder:
            mg_holder.append(_read(entry.path, read_options))
        return _get_frame(mg_holder[0], i)

    def gen():
        for p in parts:
            yield from _load_part(p)

    try:
        with staged_dir(d) as stage:  # the old folder, parts included, goes as a whole
            summary = _assemble(entry, stage, gen(), n_frames=n, is_stack=bool(info.get("is_stack", True)),
                                input_info=info, get_frame=get_frame, config=config, chash=chash,
                                model_sha=model_sha, t_start=t_start)
            _write_done(entry, stage, summary, chash=chash, model_sha=model_sha)
    except _InputUnreadable as exc:
        return _skip(entry, d, str(exc), cache=True, read_options=read_options, chash=chash)
    _test_hook("after_done", entry.name)
    return _result_from_summary(entry, summary, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- currency


def _current(entry: InputEntry, d: Path, *, chash: str, model_sha: str | None) -> dict | None:
    """``done.json`` when the outputs of ``entry`` are complete and current, else None."""
    done = _read_json(d / DONE_FILE)
    if not done:
        return None
    inp = done.get("input") or {}
    if (done.get("stemfast_version") != __version__ or done.get("config_hash") != chash
            or done.get("model_sha256") != model_sha or inp.get("sha256") != entry.sha256):
        return None
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


def _cached_skip(entry: InputEntry, d: Path, read_options: ReadOptions | None = None,
                 chash: str | None = None) -> dict | None:
    sk = _read_json(d / SKIPPED_FILE)
    if not sk or sk.get("stemfast_version") != __version__:
        return None
    if (sk.get("input") or {}).get("sha256") != entry.sha256:
        return None
    if sk.get("read", ReadOptions().key()) != (read_options or ReadOptions()).key():
        return None  # e.g. now with --fill-nonfinite: try again
    if sk.get("config_hash") is not None and sk.get("config_hash") != chash:
        return None  # failed with other settings (e.g. a --spacing that did not fit): try again
    return sk


# ----------------------------------------------------------------------------- model


@dataclass
class _ModelState:
    path: Path
    sha256: str | None
    source: str
    trained: bool = False
    info: dict = field(default_factory=dict)
    _model: object = None

    def get(self):
        if self._model is None and self.sha256 is not None:
            self._model = load_model(self.path)
        return self._model


def load_model(path: str | os.PathLike):
    """``RVAE.load(path)``, tolerating model files that store ``torch.__version__`` as a ``TorchVersion``.

    (``torch.load(weights_only=True)`` rejects that str subclass; it is harmless, so it is allowed here.)
    """
    import torch

    from .model import RVAE

    try:
        from torch.torch_version import TorchVersion

        ctx = torch.serialization.safe_globals([TorchVersion])
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        ctx = contextlib.nullcontext()
    with ctx:
        return RVAE.load(path)


@contextlib.contextmanager
def _writing(path: Path):
    """Turn an OSError while writing ``path`` (disk full, read-only, ...) into an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        from .errors import OutputError

        raise OutputError(f"cannot write {describe_os_error(exc, path)}") from None


def check_model_file(path: str | os.PathLike):
    """Load a ``--model`` file; :class:`~stemfast.errors.ModelFileError` (path and cause) when it is
    missing, unreadable or not a stemfast model. Returns the model."""
    src = Path(path)
    if not src.exists():
        raise ModelFileError(f"model not found: {src}")
    if not src.is_file():
        raise ModelFileError(f"--model {src}: not a file")
    try:
        model = load_model(src)
    except OSError as exc:
        raise ModelFileError(f"--model {describe_os_error(exc, src)}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling / format error: not a model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFileError(f"--model {src}: not a stemfast model file ({type(exc).__name__}: {first[:200]}); "
                             "write one with `stemfast train` or use OUT/model.pt of an earlier batch") from None
    if not hasattr(model, "encode") and not hasattr(model, "extra"):
        raise ModelFileError(f"--model {src}: not a stemfast model file (loaded a {type(model).__name__})")
    return model


def _sample_frames(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def train_batch_model(entries: Sequence[InputEntry], config, *, max_train_inputs: int = 16, train_frames: int = 4,
                      prepared_cache: dict | None = None, cache_budget_bytes: int = 0,
                      on_skip: Callable[[InputEntry, str], None] | None = None, show_progress: bool = True,
                      init_model=None, finetune_steps: int = 0, read_options: ReadOptions | None = None):
    """Train one model on patches sampled from ``entries``; returns ``(model, info)``.

    With ``init_model`` (the shipped model), that model is fine-tuned for ``finetune_steps`` steps
    instead (:meth:`stemfast.model.RVAE.finetune`) and patches keep their per-image size.

    At most ``max_train_inputs`` inputs (evenly spread over the list) and ``train_frames`` frames
    per stack are prepared; each contributes a random sample of its non-edge patches (about
    ``2 * max_train_patches / units``), and :func:`stemfast.pipeline.train_model` draws the final
    training set. The patch size is ``config.patch_size`` or the first prepared image's, and
    is used for every image after it (it is stored in the model, ``model.extra["patch_size"]``).
    Prepared frames are kept in ``prepared_cache`` (key ``(name, frame)``) while their total size
    stays below ``cache_budget_bytes``, so the analysis does not prepare them again.
    Returns ``(None, info)`` when no input had a lattice.
    """
    from .pipeline import Prepared, prepare, train_model
    from .table import SiteTable

    t_start = time.perf_counter()
    io = _io()
    ents = list(entries)
    if len(ents) > max_train_inputs:
        pick = _sample_frames(len(ents), max_train_inputs)
        ents = [ents[i] for i in pick]
    cap = getattr(config.model, "max_train_patches", None) or 20000
    per_unit = max(256, int(math.ceil(2.0 * cap / max(1, len(ents)))))
    patch_size = config.patch_size
    pools: list[np.ndarray] = []
    norms: dict = {}
    used: list[str] = []
    cached_bytes = 0
    stage_s: dict[str, float] = {}
    for i, e in enumerate(_bar(ents, show_progress, desc="train: prepare", unit="file")):
        try:
            mg = _read(e.path, read_options)
        except Exception as exc:  # noqa: BLE001
            reason = str(exc) if isinstance(exc, io.ReadError) else f"cannot read: {type(exc).__name__}: {exc}"
            if on_skip:
                on_skip(e, reason)
            continue
        try:
            from .sanity import check_spacing_fits

            check_spacing_fits(config.sites.spacing, np.shape(mg.data)[-2:])
        except ValueError as exc:  # the settings do not fit this image: say why, not "no lattice"
            if on_skip:
                on_skip(e, str(exc))
            continue
        n = _n_frames(mg)
        e.n_frames = n
        frames = _sample_frames(n, train_frames)
        upf = max(64, per_unit // len(frames))
        for f in frames:
            try:
                t0 = time.perf_counter()
                img = _get_frame(mg, f)
                stage_s["read"] = stage_s.get("read", 0.0) + time.perf_counter() - t0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prep = prepare(img, config=config, pixel_size=mg.pixel_size, unit=mg.unit, patch_size=patch_size)
            except Exception as exc:  # noqa: BLE001 - a bad frame: leave it out of the training set
                log.info("training: %s frame %d left out: %s", e.rel, f, exc)
                continue
            for k, v in prep.timings.items():
                stage_s[k] = stage_s.get(k, 0.0) + float(v)
            good = np.flatnonzero(~prep.edge)
            if len(good) == 0:
                continue
            if patch_size is None and init_model is None:
                patch_size = prep.patch_size
            rng = np.random.default_rng(getattr(config.model, "seed", 0) * 100003 + i * 1009 + f)
            if len(good) > upf:
                good = np.sort(rng.choice(good, upf, replace=False))
            pools.append(np.ascontiguousarray(prep.patches[good]))
            if prep.norm is not None and len(norms) < 32:
                norms[f"{e.name}[{f}]" if n > 1 else e.name] = (
                    dataclasses.asdict(prep.norm) if dataclasses.is_dataclass(prep.norm) else repr(prep.norm))
            used.append(e.name)
            if prepared_cache is not None:
                # lazily cut patches (a large image) hold no memory of their own
                nbytes = prep.image.nbytes + getattr(prep.patches, "nbytes", 0) + 200 * len(prep.sites)
                if cached_bytes + nbytes <= cache_budget_bytes:
                    prepared_cache[(e.name, f)] = prep
                    cached_bytes += nbytes
    info = {"n_inputs_sampled": len(ents), "inputs": sorted(set(used)), "patch_size": patch_size,
            "norm": {"kind": "per-image robust (median -> 0, 99.5th percentile -> 1)", "images": norms},
            "prepare_s": stage_s}
    if not pools:
        info["seconds"] = time.perf_counter() - t_start
        return None, info
    allp = np.concatenate(pools)
    pools.clear()
    slim = Prepared(image=np.zeros((0, 0), np.float32), sites=SiteTable({}), patches=allp,
                    edge=np.zeros(len(allp), bool), norm=None, patch_size=int(patch_size or 0), timings={})
    t0 = time.perf_counter()
    model = train_model([slim], config=config, init=init_model, steps=finetune_steps)
    info["train_s"] = time.perf_counter() - t0
    info["n_patches_pool"] = int(len(allp))
    info["n_patches"] = int(min(len(allp), cap))
    info["seconds"] = time.perf_counter() - t_start
    return model, info


def _resolve_model(entries: list[InputEntry], out: Path, *, config, chash: str, model_path, force: bool,
                   finetune: int = 0) -> _ModelState:
    """The model of the batch: given, current in OUT, or (to be) trained (``sha256`` None)."""
    target = out / MODEL_FILE
    if model_path is not None:
        src = Path(model_path)
        loaded = check_model_file(src)  # before anything is copied into OUT
        sha = file_sha256(src)
        if src.resolve() != target.resolve():
            if not target.exists() or file_sha256(target) != sha:
                with _writing(target), atomic_path(target) as tmp:
                    shutil.copyfile(src, tmp)
        info = {"sha256": sha, "source": str(src), "stemfast_version": __version__}
        old = _read_json(out / MODEL_INFO_FILE)
        if old != info:
            write_json(out / MODEL_INFO_FILE, info)
        return _ModelState(target, sha, f"given: {src}", info=info, _model=loaded)
    info = _read_json(out / MODEL_INFO_FILE)
    key = _inputs_key(entries)
    if (not force and info and target.exists() and info.get("config_hash") == chash
            and info.get("inputs_key") == key and info.get("stemfast_version") == __version__
            and info.get("source") == "trained" and int(info.get("finetune_steps") or 0) == finetune):
        sha = file_sha256(target)
        if sha == info.get("sha256"):
            return _ModelState(target, sha, "trained (reused, current)", info=info)
    return _ModelState(target, None, "trained", info={"inputs_key": key})


def _use_shipped(model, out: Path) -> _ModelState:
    """The shipped default model as the batch's model: copied to ``OUT/model.pt`` and named in model.json."""
    from .model.shipped import MODEL_PATH, describe_model

    target = out / MODEL_FILE
    sha = model.extra.get("sha256") or file_sha256(MODEL_PATH)
    if not target.exists() or file_sha256(target) != sha:
        with atomic_path(target) as tmp:
            shutil.copyfile(MODEL_PATH, tmp)
    info = {**describe_model(model, sha), "stemfast_version": __version__}
    if _read_json(out / MODEL_INFO_FILE) != info:
        write_json(out / MODEL_INFO_FILE, info)
    return _ModelState(target, sha, f"shipped: {info['name']} {info['version']}", info=info, _model=model)


def _model_identity(out: Path, model_sha: str | None) -> dict:
    """``{name, version, sha256, source}`` of the batch's model (from OUT/model.json) for summary.json."""
    info = _read_json(out / MODEL_INFO_FILE) or {}
    if not model_sha or info.get("sha256") != model_sha:
        return {"name": None, "version": None, "sha256": model_sha, "source": None}
    return {"name": info.get("name"), "version": info.get("version"), "sha256": model_sha,
            "source": info.get("source")}


# ----------------------------------------------------------------------------- the batch


def _summaries(out: Path, results: list[InputResult]) -> list[dict]:
    """``summary.json`` of every input with results; an input whose rerun failed keeps showing its
    previous complete results (still in place: outputs are replaced as a whole), marked as such."""
    out_s = []
    for r in results:
        if r.status in ("done", "current", "partial"):
            s = _read_json(out / r.name / "summary.json")
            if s:
                s["status"] = s.get("status", r.status)
                out_s.append(s)
        elif r.status == "failed":
            done = _read_json(out / r.name / DONE_FILE)
            s = _read_json(out / r.name / "summary.json") if done else None
            if s:
                s["status"] = "previous results (this run failed)"
                s["warnings"] = [f"this run failed ({r.reason}); shown are the complete results of the run "
                                 f"finished {done.get('finished', '?')}, still in place"] + list(s.get("warnings") or [])
                out_s.append(s)
    return out_s


def _batch_stage_table(summaries: list[dict]) -> list[dict]:
    from .report import stage_table_rows

    secs: dict[str, float] = {}
    n = 0
    for s in summaries:
        n += int(s.get("n_sites", 0))
        for k, v in (s.get("timings_s") or {}).items():
            if k in _STAGES:
                secs[k] = secs.get(k, 0.0) + float(v)
    return stage_table_rows(secs, n)


def run_batch(inputs, out_dir, *, config=None, model_path=None, scheduler: str | None = None, force: bool = False,
              max_train_inputs: int = 16, train_frames: int = 4, frames_per_task: int = 16,
              cache_mb: float | None = None, show_progress: bool = True, train: bool = False,
              finetune: int = 0, read_options: ReadOptions | None = None) -> BatchReport:
    """Run the whole pipeline on every micrograph of ``inputs`` (folders and/or files) into ``out_dir``.

    Parameters
    ----------
    inputs : a folder (searched recursively), a file, or a list of them.
    out_dir : results folder (created). See the module docstring for its layout.
    config : ``PipelineConfig`` (default: :func:`stemfast.config.load_config` defaults).
    model_path : use this model file (``RVAE.save`` format) instead of training one.
    scheduler : ``None`` (in-process), ``"local:N"`` (a local Dask cluster of N worker processes),
        a Dask scheduler address ``"tcp://host:8786"``, or a ``dask.distributed.Client``.
    force : redo every input, retrain the model, retry cached read failures.
    max_train_inputs, train_frames : how many inputs / frames per stack the training sample draws on.
    frames_per_task : frames per Dask task for stacks.
    cache_mb : memory (MiB) for keeping the images prepared for training until their analysis
        (in-process only; default ``STEMFAST_PREPARED_CACHE_MB`` or 2048).
    read_options : :class:`ReadOptions` (``--fill-nonfinite``).

    Returns
    -------
    BatchReport
        Per input its status (``done``, ``current``, ``partial``, ``skipped``, ``failed``) and
        reason; ``exit_code`` is 0 when every input has full results, 3 otherwise.

    Raises
    ------
    stemfast.errors.SettingsError
        Invalid settings (before any work).
    stemfast.errors.OutputLocked
        Another run writes into ``out_dir``.
    stemfast.errors.OutputError, ModelFileError, SchedulerError
        The output folder, the ``model_path`` or the scheduler cannot be used (message with the
        path / address and the cause).
    """
    from .config import check_limits
    from .outlock import OutputLock

    if scheduler:
        from .distributed import check_scheduler, require_dask

        require_dask()  # fail before any work when the extra is missing
        if isinstance(scheduler, str):
            check_scheduler(scheduler)
    config = config if config is not None else load_config(None)
    check_limits(config)
    out = Path(out_dir)
    with OutputLock(out, command=f"stemfast batch -> {out}"):
        for what in recover_staged(out):
            log.info("%s: %s (left by an interrupted run)", out, what)
        return _run_batch_locked(inputs, out, config=config, model_path=model_path, scheduler=scheduler,
                                 force=force, max_train_inputs=max_train_inputs, train_frames=train_frames,
                                 frames_per_task=frames_per_task, cache_mb=cache_mb, show_progress=show_progress,
                                 read_options=read_options or ReadOptions(), train=train, finetune=finetune)


def _problem_results(problems: list[tuple[Path, str]]) -> list[InputResult]:
    """Entries of the input folders that could not be looked at, as skipped results."""
    out = []
    for p, reason in problems:
        log.error("%s: skipped: %s", p, reason)
        out.append(InputResult(p.name or str(p), str(p), "skipped", reason))
    return out


def _run_batch_locked(inputs, out: Path, *, config, model_path, scheduler, force: bool, max_train_inputs: int,
                      train_frames: int, frames_per_task: int, cache_mb: float | None, show_progress: bool,
                      read_options: ReadOptions, train: bool = False, finetune: int = 0) -> BatchReport:
    """:func:`run_batch` while holding the output folder's lock."""
    t_start = time.perf_counter()
    problems: list[tuple[Path, str]] = []
    entries = discover_inputs(inputs, exclude=out, problems=problems)
    extra_results = _problem_results(problems)
    chash = config_hash(config)
    report = BatchReport(out, [], chash, scheduler=scheduler if isinstance(scheduler, str) or scheduler is None
                         else repr(scheduler), problems=extra_results)
    if not entries:
        log.error("no micrographs found in %s", inputs)
        report.results = extra_results
        return report
    log.info("%d inputs, settings %s", len(entries), chash)

    # content fingerprints (a changed file is redone even with the same size and mtime)
    unreadable: dict[str, str] = {}
    for e in entries:
        try:
            _fingerprint(e, out)
        except OSError as exc:
            unreadable[e.name] = f"cannot read: {exc}"
    good = [e for e in entries if e.name not in unreadable]

    # read failures remembered from an earlier run (same file content)
    results: dict[str, InputResult] = {}
    for e in entries:
        if e.name in unreadable:
            results[e.name] = _skip(e, out / e.name, unreadable[e.name], cache=False)
        elif not force:
            sk = _cached_skip(e, out / e.name, read_options, chash)
            if sk:
                log.error("%s: skipped: %s", e.rel, sk.get("reason"))
                results[e.name] = InputResult(e.name, str(e.path), "skipped", f"(cached) {sk.get('reason')}")

    # the model: --model FILE, else the shipped default model (fine-tuned with --finetune N), else
    # (--train, or the shipped model refused: a warning says why) one trained on the batch
    base = None
    if model_path is None and not train:
        from .model.shipped import default_model

        base = default_model(config)
    if base is not None and not finetune:
        ms = _use_shipped(base, out)
    else:
        ms = _resolve_model(good, out, config=config, chash=chash, model_path=model_path, force=force,
                            finetune=finetune if base is not None else 0)
    cache: dict | None = {} if scheduler is None else None
    budget = int((cache_mb if cache_mb is not None else float(os.environ.get("STEMFAST_PREPARED_CACHE_MB", 2048)))
                 * 2**20)
    train_info: dict | None = None
    if ms.sha256 is None:
        def on_skip(e: InputEntry, reason: str) -> None:
            results[e.name] = _skip(e, out / e.name, reason, cache=True, read_options=read_options)

        cand = [e for e in good if e.name not in results]
        log.info("training the model on a sample of %d inputs", min(len(cand), max_train_inputs))
        ft = finetune if base is not None else 0
        model, train_info = train_batch_model(cand, config, max_train_inputs=max_train_inputs,
                                              train_frames=train_frames, prepared_cache=cache,
                                              cache_budget_bytes=budget, on_skip=on_skip, show_progress=show_progress,
                                              init_model=base if ft else None, finetune_steps=ft,
                                              read_options=read_options)
        report.model_trained = True
        report.train_seconds = float(train_info.get("seconds", 0.0))
        if model is None:
            log.error("no input had a lattice: no model could be trained")
            ms = _ModelState(out / MODEL_FILE, None, "none (no lattice in the training sample)")
        else:
            extra = {"patch_size": int(train_info["patch_size"]) if not ft else None, "norm": train_info["norm"],
                     "config": json.loads(json.dumps(config_to_dict(config), default=str)),
                     "config_hash": chash, "inputs_key": ms.info["inputs_key"], "stemfast_version": __version__,
                     "n_train_patches": train_info.get("n_patches"), "train_inputs": train_info["inputs"]}
            if ft:  # fine-tuned: patches stay cut per image from its spacing, as for the shipped model
                del extra["patch_size"]
                model.extra.pop("patch_size", None)
            with _writing(out / MODEL_FILE):
                model.save(out / MODEL_FILE, extra=extra)  # atomic (temp file + os.replace)
            sha = file_sha256(out / MODEL_FILE)
            from .model.shipped import describe_model

            info = {"sha256": sha, "source": "trained", "config_hash": chash, "inputs_key": ms.info["inputs_key"],
                    "stemfast_version": __version__, "patch_size": extra.get("patch_size"),
                    "n_train_patches": extra["n_train_patches"], "train_inputs": extra["train_inputs"],
                    "train_seconds": train_info.get("seconds"), "date": _now(), "finetune_steps": ft,
                    **{k: v for k, v in describe_model(model, sha).items() if k in ("name", "version")}}
            write_json(out / MODEL_INFO_FILE, info)
            ms = _ModelState(out / MODEL_FILE, sha, "trained", trained=True, info=info, _model=model)
    report.model_path = ms.path if ms.sha256 else None
    report.model_sha256 = ms.sha256
    report.model_source = ms.source

    # which inputs are current
    todo: list[InputEntry] = []
    for e in good:
        if e.name in results:
            continue
        done = None if force else _current(e, out / e.name, chash=chash, model_sha=ms.sha256)
        if done is not None:
            st = done.get("status", "ok")
            results[e.name] = InputResult(e.name, str(e.path), "partial" if st == "partial" else "current",
                                          done.get("reason"), int(done.get("n_sites", 0)),
                                          int(done.get("n_defects", 0)), 0.0, done.get("n_frames"))
        else:
            todo.append(e)
    log.info("%d inputs to process, %d current", len(todo), sum(r.status == "current" for r in results.values()))

    # resolved settings (rewritten only when they or the inputs changed, so a no-op rerun touches nothing)
    toml_path = out / CONFIG_FILE
    old = None
    if toml_path.exists():
        import tomllib

        with contextlib.suppress(Exception):
            old = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    want_inputs = {e.name: e.sha256 for e in entries if e.sha256}
    if (old is None or (old.get("stemfast") or {}).get("config_hash") != chash
            or (old.get("stemfast") or {}).get("version") != __version__
            or sorted((old.get("inputs") or {}).values()) != sorted(want_inputs.values())):
        ents = [e for e in entries if e.sha256]
        with _writing(toml_path):
            write_resolved_config(toml_path, config, inputs=[e.path for e in ents],
                                  checksums={str(e.path): e.sha256 for e in ents})

    # analysis
    if todo:
        model = ms.get() if ms.sha256 else None
        if scheduler:
            from .distributed import run_distributed

            res = run_distributed(todo, out, scheduler=scheduler, model_path=ms.path if ms.sha256 else None,
                                  model_sha=ms.sha256, config=config, chash=chash, frames_per_task=frames_per_task,
                                  show_progress=show_progress, read_options=read_options)
            results.update({r.name: r for r in res})
        else:
            for e in _bar(todo, show_progress, desc="analyse", unit="file"):
                r = process_input(e, out, model=model, model_sha=ms.sha256, config=config, chash=chash,
                                  prepared_cache=cache, show_progress=show_progress, read_options=read_options)
                results[e.name] = r
    if cache:
        cache.clear()
    report.results = [results[e.name] for e in entries] + extra_results
    summaries = _summaries(out, report.results)
    report.stage_table = _batch_stage_table(summaries)
    report.seconds = time.perf_counter() - t_start

    old_skipped = (_read_json(out / BATCH_SUMMARY_FILE) or {}).get("skipped")
    if (report.did_work or not (out / BATCH_SUMMARY_FILE).exists() or not (out / REPORT_FILE).exists()
            or not _same_skips(old_skipped, _skipped_list(report))):
        _write_batch_outputs(report, summaries, train_info)
    return report


def _skipped_list(report: BatchReport) -> list[dict]:
    return [{"name": r.name, "path": r.path, "status": r.status, "reason": r.reason} for r in report.skipped]


def _same_skips(old: list | None, new: list[dict]) -> bool:
    """The same inputs skipped for the same reasons (a reason remembered from a run is "(cached) ...")."""
    def key(items):
        return sorted((str(d.get("name")), str(d.get("status")), str(d.get("reason") or "").removeprefix("(cached) "))
                      for d in items or [])
    return old is not None and key(old) == key(new)


def _write_batch_outputs(report: BatchReport, summaries: list[dict], train_info: dict | None) -> None:
    from .report import write_html_report

    out = report.out_dir
    model_info = _read_json(out / MODEL_INFO_FILE) or {}
    old = _read_json(out / BATCH_SUMMARY_FILE) or {}
    train = None
    if train_info is not None:
        train = {"seconds": train_info.get("seconds"), "train_s": train_info.get("train_s"),
                 "n_patches": train_info.get("n_patches"), "inputs": train_info.get("inputs"),
                 "prepare_s": train_info.get("prepare_s")}
    elif old.get("train"):
        train = old["train"]
    batch = {
        "stemfast_version": __version__,
        "date": _now(),
        "out_dir": str(out),
        "config_hash": report.config_hash,
        "scheduler": report.scheduler,
        "model": {**model_info, "source": model_info.get("source", report.model_source)},
        "model_trained_this_run": report.model_trained,
        "train": train,
        "n_inputs": len(report.results),
        "counts": {st: sum(r.status == st for r in report.results)
                   for st in ("done", "current", "partial", "skipped", "failed")},
        "inputs": [dataclasses.asdict(r) for r in report.results],
        "skipped": _skipped_list(report),
        "stage_table": report.stage_table,
        "seconds": report.seconds,
        "peak_memory_mib": _peak_memory_mib(),
        "exit_code": report.exit_code,
    }
    write_json(out / BATCH_SUMMARY_FILE, batch)
    try:
        write_html_report(out / REPORT_FILE, batch=batch, summaries=summaries, out_dir=out)
    except OSError as exc:  # disk full, ...: the previous report stays (atomic write); say so
        from .errors import OutputError

        raise OutputError(f"cannot write the report: {describe_os_error(exc, out / REPORT_FILE)} (the results "
                          f"and {BATCH_SUMMARY_FILE} are written; the previous report is unchanged)") from None
    except Exception:  # noqa: BLE001 - a report bug must not lose the results
        log.exception("could not write %s", out / REPORT_FILE)


# ----------------------------------------------------------------------------- command line

# one definition of the shared options, the settings parsing and the exit codes (stemfast.cli_options,
# stemfast.errors); these names stay importable from here
from .cli_options import config_from_args  # noqa: E402
from .cli_options import parse_set as _parse_set  # noqa: E402,F401


def add_model_choice_arguments(p: argparse.ArgumentParser) -> None:
    """``--train`` / ``--finetune N`` (which model; the default is the shipped pretrained model)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--train", action="store_true",
                   help="train a model on the inputs instead of using the shipped pretrained model")
    g.add_argument("--finetune", type=int, default=0, metavar="N",
                   help="adapt the shipped pretrained model to the inputs for N optimiser steps")


def add_batch_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``batch`` options to ``p`` (shared by ``stemfast batch`` and :func:`run_batch_cli`)."""
    from .cli_options import add_input_options, add_settings_options

    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE",
                   help="folder(s) searched recursively for micrographs (TIFF, NPY, DM3/DM4, EMD, SER, MRC, "
                        "HDF5; see stemfast.io.SUPPORTED_EXTENSIONS), and/or single files")
    p.add_argument("-o", "--output", default="stemfast-out", metavar="OUT",
                   help="results folder (default: ./stemfast-out); one sub-folder per input plus model.pt, "
                        "stemfast.toml, batch_summary.json and report.html")
    p.add_argument("--model", metavar="MODEL.pt", default=None,
                   help="use this trained model (default: the pretrained model shipped with stemfast)")
    add_model_choice_arguments(p)
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the analysis on Dask: 'local:N' starts a local cluster of N worker processes, "
                        "'tcp://host:8786' connects to a running scheduler (needs stemfast[distributed] and a "
                        "folder all workers can write)")
    p.add_argument("--force", action="store_true",
                   help="redo everything: ignore finished results, retrain the model, retry unreadable files")
    add_settings_options(p)
    add_input_options(p)
    g2 = p.add_argument_group("batch")
    g2.add_argument("--train-inputs", type=int, default=16, metavar="N",
                    help="train on patches of at most N inputs, evenly spread over the batch (default 16)")
    g2.add_argument("--train-frames", type=int, default=4, metavar="N",
                    help="frames per stack used for training (default 4)")
    g2.add_argument("--frames-per-task", type=int, default=16, metavar="N",
                    help="frames of a stack per Dask task (default 16; 2-D images are one task per file)")
    g2.add_argument("--print-config", action="store_true", help="print the resolved settings (TOML) and exit")
    return p


def _epilog() -> str:
    from .cli_options import exit_status_epilog

    return """\
outputs (OUT/):
  <name>/sites.csv     one row per site: frame, x, y, source, intensity, class_id, recon_error,
                       anomaly_score, is_defect, defect_kind, angle (+ x_nm, y_nm when calibrated, + more)
  <name>/classes.png   sites coloured by class over the image
  <name>/defects.png   top defect candidates over the image + their patches
  <name>/summary.json  counts, lattice, drift (stacks), per-stage timings and sites/s, peak memory, warnings
  <name>/tracks.csv    stacks: one row per defect track (sites.csv gets track_id); tracks.png its figure
  <name>/done.json     completion marker (written last): a rerun skips inputs whose marker is current
  model.pt, model.json the model (the shipped one unless --model/--train/--finetune) and its provenance
  stemfast.toml        resolved settings, stemfast version, input checksums
  batch_summary.json   statuses, skipped inputs with reasons, stage table
  report.html          everything in one offline HTML file
  .stemfast.lock       while a run writes into OUT (a second run into the same OUT is refused)

""" + exit_status_epilog() + "\n"


_EPILOG = _epilog()


def build_batch_parser(prog: str = "stemfast batch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Analyse every micrograph of a folder with one model: sites, classes, defect candidates, "
                    "figures and a report. Reruns skip finished inputs; an interrupted run resumes.")
    return add_batch_arguments(p)


def _print_report(report: BatchReport) -> None:
    from .report import format_stage_table

    res = report.results
    counts = {st: sum(r.status == st for r in res) for st in ("done", "current", "partial", "skipped", "failed")}
    print(f"stemfast batch: {len(res)} inputs -> {report.out_dir}: "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
          + (f"; model trained ({report.train_seconds:.1f} s)" if report.model_trained else
             f"; model {report.model_source}" if report.model_source else ""))
    if report.stage_table:
        print(format_stage_table(report.stage_table))
    for r in res:
        for w in r.warnings:
            print(f"warning: {r.path}: {w}", file=sys.stderr)
    for r in report.skipped:
        print(f"{r.status}: {r.path}: {r.reason}", file=sys.stderr)
    print(f"report: {report.out_dir / REPORT_FILE}")


def run_batch_from_args(args) -> int:
    """Run a batch from parsed arguments (see :func:`add_batch_arguments`); returns the exit status."""
    from .cli_options import read_options_from_args
    from .errors import SettingsError, report_cli_error

    try:
        config = config_from_args(args)
        read_options = read_options_from_args(args)
        if args.scheduler:
            from .distributed import parse_scheduler

            parse_scheduler(args.scheduler)
    except SettingsError as exc:
        return report_cli_error(exc)
    if getattr(args, "print_config", False):
        from .config import dump_config

        print(dump_config(config), end="")
        return EXIT_OK
    try:
        report = run_batch([Path(p) for p in args.inputs], Path(args.output), config=config, model_path=args.model,
                           scheduler=args.scheduler, force=args.force, max_train_inputs=args.train_inputs,
                           train_frames=args.train_frames, frames_per_task=args.frames_per_task,
                           read_options=read_options, train=getattr(args, "train", False),
                           finetune=getattr(args, "finetune", 0) or 0)
    except BaseException as exc:  # noqa: BLE001 - every expected failure becomes a message and an exit status
        log.debug("batch failed", exc_info=True)
        code = report_cli_error(exc)
        if code is None:
            raise
        return code
    if not report.results:
        print(f"error: no micrographs found in {' '.join(args.inputs)}", file=sys.stderr)
        return EXIT_ERROR
    _print_report(report)
    return report.exit_code


def run_batch_cli(argv: Sequence[str] | None = None) -> int:
    """``stemfast batch`` as a function: parse ``argv``, run, return the exit status."""
    from .logutil import setup_logging

    args = build_batch_parser().parse_args(list(argv) if argv is not None else None)
    setup_logging(args.verbose)
    return run_batch_from_args(args)
