"""The batch's inputs: finding them, naming their output folders, fingerprinting and reading them."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import ReadOptions
from .common import RESERVED_NAMES
from .frames import count_frames

__all__ = ["InputEntry", "CompanionFile", "discover_inputs", "fingerprint_input", "read_input", "inputs_key", "describe_input",
           "safe_name", "unique_names", "read_failure_reason", "whole_rescale", "note_whole_read",
           "filled_by_read_options"]

log = logging.getLogger("stemfast.batch")


@dataclass
class CompanionFile:
    """A second detector's image of the same scan as an input (:mod:`stemfast.batch.companions`)."""

    path: Path
    size: int = -1
    mtime_ns: int = -1
    sha256: str | None = None
    #: how it was paired: ``"given"`` (``--companion``), ``"name rule"`` (``--companion-name``) or
    #: ``"automatic"`` (a file beside the input whose name differs in the detector's name only, or
    #: another detector's image in the input's own file)
    found: str = "given"
    #: the title of the image in a file that holds several (another detector of a Velox EMD), or None
    signal: str | None = None
    #: how its whole file's values were rescaled (:func:`whole_rescale`), noted when it was checked
    #: against the input; a chunk of a stack reads the companion's frames with it (None: not known)
    rescale: dict | bool | None = None
    #: whether it was recorded at higher angles than the input, by the detectors' names in the two
    #: file names or titles (:func:`stemfast.detectors.higher_angle`; None: the names do not tell)
    higher_angle: bool | None = None

    def fingerprint(self) -> dict:
        fp = {"path": str(self.path), "sha256": self.sha256, "size": self.size, "mtime_ns": self.mtime_ns}
        return {**fp, "signal": self.signal} if self.signal else fp

    def read_kwargs(self) -> dict:
        """The keyword arguments of :func:`stemfast.io.read` that read it (its image of the file)."""
        return {"dataset": self.signal} if self.signal else {}


@dataclass
class InputEntry:
    """One input file of a batch and its fingerprint.

    ``companion``: a second detector's image of the same scan, whose column intensity joins the
    defect scores (part of the input: its content is in the fingerprint); ``companion_missing``: the
    file the pairing rule expected but did not find (the input is analysed alone, with a warning);
    ``companion_note``: what the check of the companion against the input found (an automatic one
    that is not of the same scan is not used: ``companion_used`` False).
    """

    path: Path
    name: str  # output folder name (unique within the batch)
    rel: str  # path relative to the input root (for display)
    size: int = -1
    mtime_ns: int = -1
    sha256: str | None = None
    n_frames: int | None = None  # known once the file has been opened
    companion: CompanionFile | None = None
    companion_missing: str | None = None
    companion_note: str | None = None
    companion_used: bool = True
    #: what the reader told of the whole file (:func:`describe_input`), noted where it was read whole
    #: (:func:`note_whole_read`: for the training, by the Dask planner). A chunk of a stack reads its frames
    #: in the same units (``described["rescaled"]``, :func:`whole_rescale`) and its outputs describe the
    #: whole input, not the chunk (the pixels filled in all its frames). None: not known.
    described: dict | None = None

    def fingerprint(self) -> dict:
        fp = {"path": str(self.path), "rel": self.rel, "sha256": self.sha256, "size": self.size,
              "mtime_ns": self.mtime_ns}
        if self.companion is not None:
            fp["companion"] = self.companion.fingerprint()
        elif self.companion_missing is not None:
            fp["companion_missing"] = self.companion_missing
        return fp

    def same_content(self, fp: dict | None) -> bool:
        """Whether a recorded :meth:`fingerprint` is of this content: the file's, and its companion's
        (none, a missing one, or one of the same content)."""
        fp = fp or {}
        comp = (fp.get("companion") or {}).get("sha256")
        return (fp.get("sha256") == self.sha256 and comp == (self.companion.sha256 if self.companion else None)
                and fp.get("companion_missing") == (None if self.companion else self.companion_missing))


#: what a folder name may not hold: anything but letters and digits (any script), ``_ . + -``
_NAME_BAD = re.compile(r"[^\w.+-]+")


def safe_name(s: str) -> str:
    """``s`` as a folder name: odd characters replaced (letters and digits of any script kept, in
    Unicode's composed form), reserved names and dot-names changed.

    >>> safe_name("état 2.dm4"), safe_name("試料:1"), safe_name("Model.pt")
    ('état_2.dm4', '試料_1', 'Model.pt_')
    """
    s = _NAME_BAD.sub("_", unicodedata.normalize("NFC", s)).strip("._") or "input"
    return s + "_" if s.lower() in RESERVED_NAMES or s.startswith(".") else s


def unique_names(rels: Sequence[Path]) -> list[str]:
    """File stem; duplicates get their relative path (``a/b/img`` -> ``a__b__img``), then the suffix,
    then a number. Names are told apart without regard to case (case-insensitive file systems), and a
    number never gives an input another input's name (``A``, ``a``, ``a_1`` -> ``A``, ``a_2``, ``a_1``).
    """
    stems = [safe_name(r.stem) for r in rels]
    counts = Counter(stems)
    names = [safe_name("__".join(r.with_suffix("").parts)) if counts[s] > 1 else s for r, s in zip(rels, stems)]
    counts = Counter(names)
    out = [safe_name("__".join(r.parts).replace(".", "_")) if counts[s] > 1 else s for r, s in zip(rels, names)]
    # last resort (names that differ in case only, sanitised clashes): the first keeps its name, the
    # others are numbered past every name in use
    used = {s.lower() for s in out}
    kept: set[str] = set()
    final = []
    for s in out:
        if s.lower() in kept:
            n = 1
            while f"{s}_{n}".lower() in used:
                n += 1
            s = f"{s}_{n}"
            used.add(s.lower())
        kept.add(s.lower())
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
    from .. import io

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
    names = unique_names(rels)
    return [InputEntry(path=f, name=n, rel=r.as_posix()) for (f, _), n, r in zip(uniq, names, rels)]


def fingerprint_input(entry: InputEntry) -> None:
    """Fill size / mtime (stat) and the content fingerprint (:func:`stemfast.fingerprint.content_fingerprint`)
    of the input and of its companion.

    The content is always read (a full SHA-256 up to 256 MiB, sampled blocks beyond), never taken
    from size and mtime: ``cp -p`` / ``rsync -a`` keep those for new content.
    """
    from ..fingerprint import content_fingerprint

    st = entry.path.stat()
    entry.size, entry.mtime_ns = int(st.st_size), int(st.st_mtime_ns)
    if entry.sha256 is None:
        entry.sha256 = content_fingerprint(entry.path)
    c = entry.companion
    if c is not None:
        try:
            st = c.path.stat()
            c.size, c.mtime_ns = int(st.st_size), int(st.st_mtime_ns)
            if c.sha256 is None:
                c.sha256 = content_fingerprint(c.path)
        except OSError as exc:
            raise OSError(f"companion {c.path}: {exc}") from exc


def read_input(path, read_options: ReadOptions | None = None, **kwargs):
    """``io.read`` with the batch's read options (``--fill-nonfinite``); warnings go to the log."""
    from .. import io

    opts = read_options or ReadOptions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mg = io.read(path, **opts.as_read_kwargs(), **kwargs)
    for w in caught:
        log.warning("%s", w.message)
    if mg.metadata.get("exported_picture") or mg.metadata.get("converted_from_rgb"):
        from ..heap import hand_back_freed

        if hand_back_freed():
            log.debug("heap: freed memory handed back after a picture")
    return mg


def inputs_key(entries: Sequence[InputEntry]) -> str:
    """A short hash of the batch's input set (names and content fingerprints): the trained model's key."""
    import hashlib

    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.name):
        h.update(f"{e.name}\0{e.sha256}\n".encode())
    return h.hexdigest()[:16]


def describe_input(mg) -> dict:
    """What the reader tells about an opened input: shape, frames, calibration, dose, notes (rescaled
    values, replaced non-finite pixels, an exported picture, colour converted to grey, planar TIFF samples read as frames,
    which of several TIFF series was read, a calibration not used: also ``calibration_ignored``,
    :func:`_calibration_ignored`). ``read_warnings``: the notes that qualify the results (the input's
    warnings, :func:`stemfast.batch.outputs.input_warnings`); the others (a pixel size from a sidecar,
    the TIFF series or channel read, ...) are facts, shown as notes."""
    shape = None
    with contextlib.suppress(Exception):
        shape = list(np.shape(mg.data))
    from ..colour import colour_note
    from ..io import picture_note
    from ..tracking import dose_from_metadata

    info = {"shape": shape, "n_frames": count_frames(mg), "is_stack": bool(getattr(mg, "is_stack", False)),
            "pixel_size": getattr(mg, "pixel_size", None), "unit": getattr(mg, "unit", None),
            "dose": dose_from_metadata(getattr(mg, "metadata", None))}
    meta = getattr(mg, "metadata", None) or {}
    notes: list[str] = []
    warns: list[str] = []

    def warn(text: str) -> None:
        notes.append(text)
        warns.append(text)

    if meta.get("rescaled"):
        info["rescaled"] = meta["rescaled"]
        r = meta["rescaled"]
        notes.append(f"pixel values rescaled to (x - {r.get('offset')}) / {r.get('scale')} (beyond what float32 "
                     "carries safely); intensities are in these units")
    if meta.get("nonfinite_replaced"):
        info["nonfinite_replaced"] = meta["nonfinite_replaced"]
        if meta.get("nonfinite_in_regions"):  # filled whatever the read options
            info["nonfinite_in_regions"] = True
        how = "all in regions without data: an aligned frame's padding" if meta.get("nonfinite_in_regions") \
            else "--fill-nonfinite"
        warn(f"{meta['nonfinite_replaced']} NaN/infinite pixels replaced by the frame median ({how}); "
             "sites there are not measured")
    if meta.get("exported_picture"):
        warn(picture_note(meta))
    if meta.get("converted_from_rgb"):
        how = meta["converted_from_rgb"]
        note = "an RGB(A) image, " + (colour_note(how) if isinstance(how, dict) else "converted to grey")
        if (how.get("kind") if isinstance(how, dict) else None) in (None, "luminance"):
            warn(note + ": the intensities are not the detector's")
        else:
            notes.append(note)
    if meta.get("planar_samples_as_frames"):
        notes.append(f"the TIFF's {info['n_frames']} planar samples were read as {info['n_frames']} frames (tifffile's "
                     "layout for a [frames, H, W] array), not as one colour image")
    if meta.get("narrow_frames"):
        from ..io import narrow_frames_note

        warn(narrow_frames_note(meta["narrow_frames"]))
    if meta.get("channels"):
        from ..tiff import channel_note

        notes.append(channel_note(meta))
    if meta.get("series") is not None and (meta.get("n_series") or 0) > 1:
        notes.append(f"the TIFF holds {meta['n_series']} image series; series {meta['series']}, the largest, was read")
    ignored = _calibration_ignored(meta, info)
    if ignored:
        info["calibration_ignored"] = ignored
        warn(ignored)
    side = meta.get("sidecar") or {}
    if side.get("used"):
        notes.append(f"pixel size from the sidecar {side['file']} ({side['from']}; the file itself has none)")
    elif side.get("error"):
        warn(f"the sidecar {side['file']} was {side['error']}")
    if notes:
        info["notes"] = notes
    if warns:
        info["read_warnings"] = warns
    return info


def _calibration_ignored(meta: dict, info: dict) -> str | None:
    """Why the input's calibration is not used (``summary.json``'s ``input.calibration_ignored``), or
    None: a pixel size the reader found implausible (``meta["calibration_ignored"]``), or one in a unit
    that is not a length (:func:`stemfast.io.unit_not_a_length`, find_sites' CalibrationWarning)."""
    from ..io import unit_not_a_length

    if meta.get("calibration_ignored"):
        return (f"the file's calibration ({meta['calibration_ignored'].get('pixel_size_nm'):.4g} nm per pixel) "
                "is no micrograph's and was not used: a diffraction pattern's or a broken tag")
    return unit_not_a_length(info.get("pixel_size"), info.get("unit"))


def whole_rescale(mg) -> dict | bool:
    """How the values of a file read whole (``mg``) were rescaled (``metadata["rescaled"]``), False where
    they were not: :func:`stemfast.io.read`'s ``rescale`` that reads some of its frames in the same units."""
    return (getattr(mg, "metadata", None) or {}).get("rescaled") or False


def note_whole_read(entry: InputEntry, mg) -> None:
    """Note on ``entry`` what its file read whole (``mg``) tells: the frame count and
    :attr:`InputEntry.described`."""
    entry.n_frames = count_frames(mg)
    entry.described = describe_input(mg)


def filled_by_read_options(meta: dict) -> bool:
    """Whether a read (its metadata, or the ``input`` record of an input's summary, which copies these
    keys) filled scattered non-finite pixels -- what ``--fill-nonfinite`` decides -- rather than none,
    or only regions without data (filled whatever the read options are)."""
    return bool(meta.get("nonfinite_replaced")) and not meta.get("nonfinite_in_regions")


def read_failure_reason(exc: BaseException) -> str:
    """Why an input could not be read: the reader's own message (:class:`stemfast.io.ReadError`), else
    the exception's type and message."""
    from ..io import ReadError

    return str(exc) if isinstance(exc, ReadError) else f"cannot read: {type(exc).__name__}: {exc}"
