"""A second detector of the same scan per input (``--companion``, ``--companion-name``).

A STEM scan is often recorded by two detectors at once (HAADF and MAADF: ``X_ADF1.dm4`` and
``X_ADF2.dm4``). The second image of an input, its *companion*, is read at the input's sites
(:func:`stemfast.sites.companion_intensity`) and the defect scores weigh the two images' local z together
(:func:`stemfast.analysis.analyze_sites`; docs/RESULTS.md, "Two detectors of the same scan").

The companion is part of the input, not a setting: its content is in the input's fingerprint
(a changed, added or removed companion redoes the input), ``OUT/stemfast.toml`` lists it under
``[companions]`` next to the input checksums, and it does not change the settings hash.

Pairing
-------
- Explicitly, file by file: :class:`CompanionRule` ``explicit={input: companion}``
  (``stemfast analyze HAADF.dm4 --companion MAADF.dm4``).
- By the file name, ``MAIN=COMPANION`` (``--companion-name ADF1=ADF2``): the companion of an input
  whose name (without its last extension) contains ``MAIN`` is the file of the same folder, with
  the same extension, whose name has the last ``MAIN`` replaced by ``COMPANION`` (``X_ADF1.dm4`` ->
  ``X_ADF2.dm4``, ``1028_ADF1_11.dm4`` -> ``1028_ADF2_11.dm4``, ``s_haadf.tif`` -> ``s_maadf.tif`` with
  ``haadf=maadf``; case-sensitive). Files whose name contains ``COMPANION`` are companions, never
  inputs of their own; one whose input is not among the inputs is listed as skipped. An input
  containing ``MAIN`` whose companion does not exist is analysed alone, with a warning
  (``summary.json``: ``detectors`` 1). Files containing neither are analysed alone, without one.
  An empty ``MAIN`` (``=_maadf``) appends ``COMPANION`` to every input's name (``X`` -> ``X_maadf``).

- Automatically (the default, without either of the above; ``--no-companion`` turns it off): the
  companion of an input is the file beside it (same folder, same extension) whose name differs from
  the input's in the detector's name alone -- one whole word of the name (between non-alphanumeric
  characters), any case, among :data:`DETECTOR_NAMES`: ``s_haadf.dm4`` and ``s_maadf.dm4``,
  ``1028_ADF1_11.dm4`` and ``1028_ADF2_11.dm4``, ``area 3 HAADF.tif`` and ``area 3 DF4.tif``. Both files
  stay inputs, each with the other as its companion. Of several, the first in :data:`DETECTOR_NAMES`'
  order (the annular dark-field detectors first). Without such a file, a Velox EMD's own image of
  another detector (:func:`signal_companion`: the file holds HAADF, DF4, DF2, BF; the HAADF is read,
  the DF2 is its companion; the BF is not; a Spectra's "DF-I", "DF-O", "DF-S" are its ``dfi``, ``dfo``,
  ``dfs``); or, for Nion Swift data items (a library names its files by date and id), the item beside
  it whose *title* differs in the detector's name alone (:func:`title_companion`: "SuperScan (HAADF) 12"
  and "SuperScan (MAADF) 12"); or, for a TIFF holding the detectors as channels (an ImageJ hyperstack,
  an OME-TIFF), another detector's channel by the channels' titles as in a Velox file, and without
  titles its channel 1 (channel 0 is read). It is used only where it is of the same scan
  (:func:`same_scan_refusal`: the input's shape and calibration, the same DigitalMicrograph exposure
  where both files carry one, and its columns on the input's pixels); otherwise the input is analysed
  alone and the summary says why.

A 2-D input's companion is a 2-D image of its shape; a stack's (a series recorded by two detectors) a
stack of as many frames of its frame shape, read frame by frame with it (in process and in the Dask
chunks alike; the same-scan test reads the first frames). A given companion of another shape or
kind is refused: the input is skipped with the reason; an automatic one is not used, and the input
is analysed alone.

Where the two names rank the detectors' angles (:func:`stemfast.detectors.higher_angle`: HAADF above
any other, MAADF above LAADF, a JEOL's ADF1 above its ADF2), the companion also tells the sublattice
names when the input's own brightness got them the wrong way round (:mod:`stemfast.pairnaming`: a
WSe2 MAADF shows the Se2 pairs brighter than the W).

The labelled WSe2 scans, defect AP of the first detector alone / with the other as companion (HAADF;
MAADF): ti2 0.813 / 0.913, 0.927 / 0.925; ti11 0.779 / 0.810, 0.812 / 0.821; ti25 0.749 / 0.940, 0.921 /
0.920 (docs/RESULTS.md, round 36).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import ReadOptions
from ..detectors import DETECTOR_NAMES, NAME_WORDS, detector_key, higher_angle
from ..errors import SettingsError
from .inputs import CompanionFile, InputEntry, read_failure_reason, read_input, whole_rescale

__all__ = ["CompanionRule", "CompanionError", "parse_companion_name", "pair_companions", "read_companion",
           "companion_notes", "companion_higher", "same_scan_refusal", "automatic_companion", "signal_companion",
           "title_companion",
           "DETECTOR_NAMES", "TITLED_FORMATS", "ALIGNED_MIN"]

log = logging.getLogger("stemfast.batch")

#: the formats whose files carry the detector in their title (Nion Swift data items: :func:`title_companion`)
TITLED_FORMATS = (".ndata", ".h5")
#: two images of one scan: the normalised cross-correlation of their columns (each band-passed) is
#: largest at no shift and at least this (0.88-0.90 on the three labelled WSe2 scans' HAADF and MAADF;
#: at most 0.02 at no shift between different scans)
ALIGNED_MIN = 0.3
#: side (px) of the central crop the alignment is read on
_ALIGN_CROP = 1024


class CompanionError(ValueError):
    """An input's companion cannot be used (unreadable, a stack, another shape): the input is skipped."""


def parse_companion_name(spec: str) -> tuple[str, str]:
    """``"ADF1=ADF2"`` -> ``("ADF1", "ADF2")``; :class:`~stemfast.errors.SettingsError` when it is not a
    usable rule (see the module docstring).

    Examples
    --------
    >>> parse_companion_name("_ADF1=_ADF2"), parse_companion_name("=_maadf")
    (('_ADF1', '_ADF2'), ('', '_maadf'))
    """
    main, sep, comp = str(spec).partition("=")
    if not sep or not comp:
        raise SettingsError(f"--companion-name needs MAIN=COMPANION (e.g. ADF1=ADF2 pairs X_ADF1.dm4 with "
                            f"X_ADF2.dm4), got {spec!r}")
    for part in (main, comp):
        if "/" in part or "\\" in part or "." in part:
            raise SettingsError(f"--companion-name {spec!r}: parts of a file name without its extension, "
                                "not paths or extensions")
    if main and (main in comp or comp in main):
        raise SettingsError(f"--companion-name {spec!r}: neither part may contain the other (a file name "
                            "could match both)")
    return main, comp


@dataclass(frozen=True)
class CompanionRule:
    """How the batch's inputs find their companions: ``explicit`` {input path: companion path} and/or
    ``name`` (``MAIN``, ``COMPANION``); see the module docstring."""

    name: tuple[str, str] | None = None
    explicit: Mapping = field(default_factory=dict)
    auto: bool = True

    @property
    def active(self) -> bool:
        return bool(self.name or self.explicit or self.auto)

    def describe(self) -> str:
        if self.name:
            return f"--companion-name {self.name[0]}={self.name[1]}"
        return "--companion"


def _key(p: Path) -> Path:
    return Path(p).resolve()


def _companion_of(path: Path, main: str, comp: str) -> Path | None:
    """The companion the rule names for an input (None when its name does not contain ``main``)."""
    stem = path.stem
    if not main:
        return path.with_name(stem + comp + path.suffix)
    i = stem.rfind(main)
    return None if i < 0 else path.with_name(stem[:i] + comp + stem[i + len(main):] + path.suffix)


def _input_of(path: Path, main: str, comp: str) -> Path | None:
    """The input a companion belongs to (None when its name does not contain ``comp``)."""
    stem = path.stem
    if not main:
        return path.with_name(stem[:-len(comp)] + path.suffix) if stem.endswith(comp) else None
    i = stem.rfind(comp)
    return None if i < 0 else path.with_name(stem[:i] + main + stem[i + len(comp):] + path.suffix)


def pair_companions(entries: list[InputEntry], rule: CompanionRule | None,
                    problems: list[tuple[Path, str]]) -> list[InputEntry]:
    """Give the inputs their companions (``entry.companion`` / ``entry.companion_missing``) by ``rule``;
    returns the inputs without the companion files. A companion whose main file is not an input is
    appended to ``problems`` (listed as skipped)."""
    if rule is None or not rule.active:
        return entries
    if not (rule.name or rule.explicit):
        listing = FolderListing()
        for e in entries:
            if (comp := automatic_companion(e.path, listing) or title_companion(e.path, listing)) is not None:
                e.companion = CompanionFile(comp, found="automatic", higher_angle=_higher_angle(e.path, comp, listing))
            elif (sig := signal_companion(e.path)) is not None:
                e.companion = CompanionFile(e.path, found="automatic", signal=sig)
        return entries
    explicit = {_key(k): Path(v) for k, v in (rule.explicit or {}).items()}
    taken = {_key(v) for v in explicit.values()}
    main_keys = {_key(e.path) for e in entries}
    kept: list[InputEntry] = []
    for e in entries:
        k = _key(e.path)
        own = _input_of(e.path, *rule.name) if rule.name else None
        if k in explicit:
            e.companion = CompanionFile(explicit[k], higher_angle=_higher_angle(e.path, explicit[k]))
        elif own is not None:  # a companion itself
            if _key(own) not in main_keys:
                problems.append((e.path, f"a companion file ({rule.describe()}) without its input {own.name}: "
                                         "not analysed"))
            continue
        elif k in taken:  # given as the companion of another input
            continue
        elif rule.name and (comp := _companion_of(e.path, *rule.name)) is not None:
            if comp.is_file():
                e.companion = CompanionFile(comp, found="name rule", higher_angle=_higher_angle(e.path, comp))
            else:
                e.companion_missing = str(comp)
        kept.append(e)
    return kept


def _higher_angle(path: Path, comp: Path, listing: FolderListing | None = None) -> bool | None:
    """Whether the companion ``comp`` of the input ``path`` was recorded at higher angles, by the
    detectors' names in the file names, else in the titles of Nion Swift data items
    (:func:`stemfast.detectors.higher_angle`); None where the names do not tell."""
    by_name = higher_angle(comp.stem, path.stem)
    if by_name is not None or path.suffix.lower() not in TITLED_FORMATS or comp.suffix.lower() != path.suffix.lower():
        return by_name
    titles = (listing or FolderListing()).titles(path.parent, path.suffix.lower())
    return higher_angle(titles.get(comp) or "", titles.get(path) or "") if comp.parent == path.parent else None


def automatic_companion(path, listing: FolderListing | None = None) -> Path | None:
    """The file beside ``path`` whose name differs from its name in the detector's name alone (module
    docs), or None. ``listing``: the folders' files, cached over calls.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for n in ("1028_ADF1_11.dm4", "1028_ADF2_11.dm4", "1028_ADF1_2.dm4", "s_HAADF.tif", "s_df4.TIF"):
    ...     _ = (d / n).write_bytes(b"")
    >>> [getattr(automatic_companion(d / n), "name", None)
    ...  for n in ("1028_ADF1_11.dm4", "1028_ADF1_2.dm4", "s_HAADF.tif")]
    ['1028_ADF2_11.dm4', None, 's_df4.TIF']
    """
    path = Path(path)
    names = list(_swapped_names(path.stem))
    if not names:
        return None
    files = (listing or FolderListing()).files(path.parent)
    return next((files[k] for k in ((n, path.suffix.lower()) for n in names) if k in files), None)


def title_companion(path, listing: FolderListing | None = None) -> Path | None:
    """The Nion Swift data item beside ``path`` (same folder, same extension: :data:`TITLED_FORMATS`)
    whose title differs from its title in the detector's name alone -- "SuperScan (HAADF) 12" and
    "SuperScan (MAADF) 12" -- or None. A Swift library names its files by date and id; the detector is
    in the title. ``listing``: as :func:`automatic_companion`'s (it caches the titles too)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in TITLED_FORMATS:
        return None
    titles = (listing or FolderListing()).titles(path.parent, ext)
    own = titles.get(path, "")
    by_title = {t.lower(): f for f, t in titles.items() if t and f != path}
    return next((by_title[n] for n in _swapped_names(own) if n in by_title), None)


def _swapped_names(name: str):
    """``name`` (lower case) with one of its whole words that is a detector's name replaced by another
    detector's name, in :data:`DETECTOR_NAMES`' order."""
    words = NAME_WORDS.split(name)
    slots = [i for i in range(0, len(words), 2) if words[i].lower() in DETECTOR_NAMES]
    for det in DETECTOR_NAMES:
        for i in slots:
            if words[i].lower() != det:
                yield "".join(det if j == i else w for j, w in enumerate(words)).lower()


class FolderListing:
    """The files of the folders that inputs lie in, and the titles of their Nion Swift data items, each
    read once for all the inputs of a batch."""

    def __init__(self) -> None:
        self._files: dict[Path, dict] = {}
        self._titles: dict[tuple[Path, str], dict] = {}

    def files(self, folder: Path) -> dict:
        """{(stem, extension), lower case: path} of the files in ``folder`` ({} where it cannot be listed)."""
        if folder not in self._files:
            try:
                self._files[folder] = {(f.stem.lower(), f.suffix.lower()): f for f in folder.iterdir() if f.is_file()}
            except OSError:
                self._files[folder] = {}
        return self._files[folder]

    def titles(self, folder: Path, ext: str) -> dict:
        """{path: title} of the Nion Swift data items of extension ``ext`` in ``folder``."""
        if (folder, ext) not in self._titles:
            from .. import nion

            items = [f for f in self.files(folder).values() if f.suffix.lower() == ext]
            self._titles[folder, ext] = {f: nion.title(nion.properties(f) or {}) for f in items}
        return self._titles[folder, ext]


def signal_companion(path) -> str | None:
    """The title of another detector's image in the input's own file (a Velox EMD holds each detector's
    image of a scan: HAADF, DF4, DF2, BF), or None: of the file's images (:func:`stemfast.io.signal_titles`)
    those titled with a name of :data:`DETECTOR_NAMES` (letters and digits of the title: "DF-I" is
    ``dfi``) other than the one read, the first in its order. A TIFF with channels (an ImageJ hyperstack
    or OME-TIFF of two detectors) is read the same way by its channels' titles
    (:func:`stemfast.io.tiff_channel_info`); without titles, channel 0 is the one read and channel 1 its
    companion.

    Examples
    --------
    >>> signal_companion("scan.tif") is None
    True
    """
    from ..io import signal_titles, tiff_channel_info

    if Path(path).suffix.lower() in (".tif", ".tiff"):
        n, titles = tiff_channel_info(path)
        if not titles:  # channel 0 is read
            return "channel 1" if n >= 2 else None
    elif Path(path).suffix.lower() == ".emd":
        titles = signal_titles(path)
    else:
        return None
    return _other_detector(titles)


def _other_detector(titles: list[str]) -> str | None:
    """Of the images ``titles`` of one file, the title of another detector's than the one read
    (:func:`stemfast.io.pick_signal`): the first of :data:`DETECTOR_NAMES` in its order, None without one."""
    from ..io import pick_signal

    if len(titles) < 2:
        return None
    read = detector_key(titles[pick_signal(titles)])
    others = {detector_key(t): t for t in titles}
    return next((others[n] for n in DETECTOR_NAMES if n in others and n != read), None)


def same_scan_refusal(img: np.ndarray, comp: np.ndarray, mg=None, cm=None) -> str | None:
    """Why ``comp`` is not a second detector's image of ``img``'s scan, or None: another shape, another
    pixel size (more than 1 %), another DigitalMicrograph exposure (``Exposure Number``, where both
    files carry one), or columns not on the same pixels -- the normalised cross-correlation of the two
    band-passed images (their central :data:`_ALIGN_CROP` px) not largest at no shift, or under
    :data:`ALIGNED_MIN` there (a bright-field image counts with its sign turned).
    ``mg``, ``cm``: the files as read (:class:`stemfast.io.Micrograph`), for the calibration and metadata.

    Examples
    --------
    >>> a = np.random.default_rng(0).normal(size=(64, 64))
    >>> same_scan_refusal(a, 2 * a + 1) is None, same_scan_refusal(a, -a) is None
    (True, True)
    >>> print(same_scan_refusal(a, np.roll(a, 5, axis=1)))
    its columns are not on the same pixels as the input's (the two images match best 5 px apart): not two detectors of the same scan
    """
    if comp.shape != img.shape:
        return (f"it has shape {comp.shape[0]} x {comp.shape[1]}, the input {img.shape[0]} x {img.shape[1]}: "
                "not two detectors of the same scan")
    p1, p2 = (getattr(m, "pixel_size_nm", None) for m in (mg, cm))
    if p1 and p2 and abs(p1 / p2 - 1.0) > 0.01:
        return f"its pixel size is {p2:.4g} nm, the input's {p1:.4g} nm: not two detectors of the same scan"
    e1, e2 = (_exposure_number(getattr(m, "metadata", None)) for m in (mg, cm))
    if e1 is not None and e2 is not None and e1 != e2:
        return f"it is exposure {e2}, the input exposure {e1} (DigitalMicrograph): not the same scan"
    r0, shift = _alignment(img, comp)
    if shift > 1.0:
        return (f"its columns are not on the same pixels as the input's (the two images match best {shift:.0f} px "
                "apart): not two detectors of the same scan")
    if abs(r0) < ALIGNED_MIN:
        return (f"its columns hardly match the input's (normalised cross-correlation {r0:.2f} at no shift, under "
                f"{ALIGNED_MIN}): not two detectors of the same scan")
    return None


def _alignment(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(r0, shift)``: the normalised cross-correlation at no shift of the two images' central crops,
    each band-passed (Gaussian 1 px minus 8 px), and how far (px) from no shift its largest magnitude lies."""
    from scipy import fft, ndimage

    H, W = a.shape
    y0, x0 = max(0, (H - _ALIGN_CROP) // 2), max(0, (W - _ALIGN_CROP) // 2)
    crops = []
    for im in (a, b):
        c = np.nan_to_num(np.asarray(im[y0:y0 + _ALIGN_CROP, x0:x0 + _ALIGN_CROP], np.float64))
        c = ndimage.gaussian_filter(c, 1.0) - ndimage.gaussian_filter(c, 8.0)
        sd = c.std()
        crops.append((c - c.mean()) / sd if sd > 0 else np.zeros_like(c))
    fa, fb = (fft.rfft2(c) for c in crops)
    xc = fft.irfft2(fa * np.conj(fb), s=crops[0].shape) / crops[0].size
    peak = np.unravel_index(int(np.argmax(np.abs(xc))), xc.shape)
    dy, dx = (((k + n // 2) % n) - n // 2 for k, n in zip(peak, xc.shape))  # the shift, wrapped to +-n/2
    return float(xc[0, 0]), float(np.hypot(dy, dx))


def _exposure_number(md) -> int | None:
    """The DigitalMicrograph ``Exposure Number`` (``ImageTags.DataBar``) in a file's metadata, or None."""
    stack = [md]
    while stack:
        d = stack.pop()
        if isinstance(d, Mapping):
            if "Exposure Number" in d and isinstance(d["Exposure Number"], (int, float)):
                return int(d["Exposure Number"])
            stack.extend(d.values())
        elif isinstance(d, (list, tuple)):
            stack.extend(d)
    return None


def read_companion(entry: InputEntry, mg, read_options: ReadOptions | None = None):
    """The companion of ``entry`` checked against the input ``mg`` (:func:`same_scan_refusal` on the
    first frames): for a 2-D input its image, for a stack a function of the frame index giving the
    companion's frame; None without one. A given companion (``--companion``, ``--companion-name``) that
    is unreadable or of another shape or frame count raises :class:`CompanionError` with the reason (the
    input is skipped); one that fails the rest of the check is used with the finding as a note; an
    automatic one that fails any of it is not used (``entry.companion_used`` False, the reason in
    ``entry.companion_note``: the input is analysed alone)."""
    from .frames import read_frame

    if entry.companion is None or not entry.companion_used:
        return None
    auto = entry.companion.found == "automatic"
    try:
        cm = _read_checked(entry, mg, read_options)
    except CompanionError as exc:
        if not auto:
            raise
        return _not_used(entry, str(exc))
    why = same_scan_refusal(read_frame(mg, 0), read_frame(cm, 0), mg, cm)
    if why is not None and auto:
        return _not_used(entry, f"{entry.companion.path.name}: {why}")
    if why is not None:
        entry.companion_note = f"the companion {entry.companion.path.name} may not be of this scan: {why}"
    if getattr(mg, "is_stack", False):
        return lambda i: read_frame(cm, i)
    return np.asarray(cm.data)


def companion_higher(entry: InputEntry) -> bool | None:
    """Whether ``entry``'s companion, where one is used, was recorded at higher angles than the input
    (:attr:`CompanionFile.higher_angle`; None: no companion used, or the names do not tell)."""
    if entry.companion is None or not entry.companion_used:
        return None
    return entry.companion.higher_angle


def _not_used(entry: InputEntry, why: str) -> None:
    entry.companion_used = False
    where = "an image in its file" if entry.companion.signal else "a file beside it"
    entry.companion_note = (f"{where} looks like a second detector's image of the same scan, but {why}; "
                            "analysed with this image alone (detectors 1)")
    log.info("%s: %s", entry.rel, entry.companion_note)
    return None


def _read_checked(entry: InputEntry, mg, read_options: ReadOptions | None):
    """The companion as read (:class:`stemfast.io.Micrograph`): readable, and of the input's kind -- one
    2-D image of its shape, or a stack of as many frames of its frame shape (else :class:`CompanionError`)."""
    from .frames import count_frames

    path = entry.companion.path
    try:
        cm = read_input(path, read_options, **entry.companion.read_kwargs())
    except Exception as exc:  # noqa: BLE001 - any reader failure is the companion's reason
        raise CompanionError(f"companion {path}: {read_failure_reason(exc)}") from None
    n, nc = count_frames(mg), count_frames(cm)
    if n != nc:
        what = f"a stack of {nc} frames" if nc > 1 else "one 2-D image"
        raise CompanionError(f"companion {path} is {what}, the input " + (f"a stack of {n} frames" if n > 1 else
                             "one 2-D image") + ": not two detectors of the same scan")
    shape, want = tuple(np.shape(cm.data))[-2:], tuple(np.shape(mg.data))[-2:]
    if shape != want:
        raise CompanionError(f"companion {path} has shape {shape[0]} x {shape[1]}, the input "
                             f"{want[0]} x {want[1]}: not two detectors of the same scan")
    entry.companion.rescale = whole_rescale(cm)  # a chunk of a stack reads its frames in these units
    return cm


def companion_notes(entry: InputEntry) -> list[str]:
    """The warning of an input whose companion the pairing rule expected but did not find, or whose
    companion's check found something (:func:`read_companion`); else none."""
    if entry.companion is None and entry.companion_missing is not None:
        return [f"no companion image: {entry.companion_missing} (the second detector the pairing rule expects) "
                "does not exist; analysed with this image alone (detectors 1)"]
    return [entry.companion_note] if entry.companion_note else []
