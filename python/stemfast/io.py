"""Reading micrographs (single images and time series) with their pixel calibration.

:func:`read` opens TIFF (tifffile), NumPy ``.npy`` / ``.npz``, HDF5 (h5py), Nion Swift data items
(``.ndata``, and ``.h5`` with their calibration: :mod:`stemfast.nion`) and, through the
optional extra ``stemfast[io]`` (RosettaSciIO, h5py, mrcfile), Gatan ``.dm3`` / ``.dm4``,
``.emd`` (Velox, NCEM), FEI/TIA ``.ser`` / ``.emi``, ``.mrc`` and HyperSpy's ``.hspy``; and, named as files, exported
pictures (``.png``, ``.jpg``, ``.bmp``: Pillow) with a warning that they are no data. Every problem with a file -- it
is missing, corrupt, truncated, of an unsupported kind, empty, too small, 1-D, complex or has
non-finite pixels -- raises one error type, :class:`ReadError`, whose message names the file and
the reason.

The result is a :class:`Micrograph`: float32 data ``[H, W]`` or ``[frames, H, W]``, the pixel size
(converted to nm whenever the unit is a known length unit) and the source metadata. Stacks of
uncompressed float32 TIFF or ``.npy`` files are memory-mapped, and :meth:`Micrograph.frames`
reads them one frame at a time.

:func:`write_tiff` writes float32 ImageJ-style TIFF files with a calibration that :func:`read`
recovers; :func:`find_micrographs` lists the readable files of a folder.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import os
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ReadError",
    "ReadWarning",
    "Micrograph",
    "read",
    "pick_signal",
    "signal_titles",
    "tiff_channels",
    "tiff_channel_info",
    "sidecar",
    "write_tiff",
    "find_micrographs",
    "find_pictures",
    "scan_micrographs",
    "available_memory_bytes",
    "SUPPORTED_EXTENSIONS",
    "PICTURE_EXTENSIONS",
    "MIN_SIDE",
    "unit_to_nm",
]

log = logging.getLogger(__name__)

#: File extensions :func:`read` understands (lower case).
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".tif", ".tiff", ".npy", ".npz", ".h5", ".hdf5",
    ".dm3", ".dm4", ".emd", ".ser", ".emi", ".mrc", ".ndata", ".hspy",
)
#: Exported pictures :func:`read` opens when they are named (Pillow), with a :class:`ReadWarning`: display grey
#: levels (8-bit, a contrast stretch), no calibration, often a burnt-in scale bar
#: (:func:`stemfast.nodata.overlay_pixels`), and for JPEG lossy compression. A folder search
#: (:func:`find_micrographs`) never picks them: a folder holds figures and earlier results' overlays too.
PICTURE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
# every extension read() opens
_READABLE = SUPPORTED_EXTENSIONS + PICTURE_EXTENSIONS
#: Smallest accepted image side in px.
MIN_SIDE = 16

_RSCIIO_PLUGIN = {
    ".dm3": "rsciio.digitalmicrograph",
    ".dm4": "rsciio.digitalmicrograph",
    ".emd": "rsciio.emd",
    ".ser": "rsciio.tia",
    ".emi": "rsciio.tia",
    ".mrc": "rsciio.mrc",
    ".hspy": "rsciio.hspy",
}
#: the formats whose file can hold several signals (detectors), chosen by title (``read(dataset=)``)
_SIGNAL_FORMATS = (".dm3", ".dm4", ".emd", ".ser", ".emi")

# length units -> nm
_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0, "nanometres": 1.0,
    "a": 0.1, "å": 0.1, "\u212b": 0.1, "angstrom": 0.1, "angstroms": 0.1, "ångström": 0.1,
    "ångstrom": 0.1, "\\u00c5": 0.1, "\\u212b": 0.1,
    "pm": 1e-3, "picometer": 1e-3, "picometre": 1e-3,
    "um": 1e3, "µm": 1e3, "\u03bcm": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3,
    "micrometre": 1e3, "\\u00b5m": 1e3, "\\u03bcm": 1e3,
    "mm": 1e6, "cm": 1e7, "m": 1e9, "meter": 1e9, "metre": 1e9,
}
_NO_UNIT = {"", "pixel", "pixels", "px", "none", "<undefined>", "undefined", "t.b.d."}


class ReadError(ValueError):
    """A micrograph file cannot be read; the message names the file and the reason.

    Attributes
    ----------
    path : the file.
    reason : what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read {self.path!r}: {self.reason}" if self.path is not None
                         else self.reason)

    def __reduce__(self):  # picklable across processes (batch workers)
        return (type(self), (self.path, self.reason))


class ReadWarning(UserWarning):
    """A micrograph was read but changed on the way (RGB to grey, non-finite pixels replaced)."""


def unit_to_nm(unit: str | None) -> float | None:
    """Factor from ``unit`` to nm (``"A"`` -> 0.1, ``"um"`` -> 1000), ``None`` if not a length.

    Examples
    --------
    >>> unit_to_nm("Å"), unit_to_nm("nm"), unit_to_nm("1/nm")
    (0.1, 1.0, None)
    """
    if unit is None:
        return None
    return _UNIT_NM.get(str(unit).strip().lower())


def _normalise_calibration(pixel_size: Any, unit: Any) -> tuple[float | None, str | None]:
    """Positive finite pixel size; known length units converted to nm; no unit -> ``None``."""
    try:
        ps = float(pixel_size)
    except (TypeError, ValueError):
        return None, None
    if not (math.isfinite(ps) and ps > 0):
        return None, None
    u = None if unit is None else str(unit).strip()
    if u is not None and u.lower() in _NO_UNIT:
        return None, None
    f = unit_to_nm(u)
    if f is not None:
        return ps * f, "nm"
    return ps, u


#: pixel sizes (nm) no micrograph has: a calibration outside is not a real-space one (RosettaSciIO gives a
#: TIA diffraction pattern's reciprocal calibration in "nm", 1e16-1e17 per pixel) and is not used
PLAUSIBLE_PIXEL_NM = (1e-4, 1e6)


def _plausible_calibration(path: Path, pixel_size: float | None, unit: str | None,
                           meta: dict) -> tuple[float | None, str | None]:
    """``(pixel_size, unit)``, or ``(None, None)`` with a :class:`ReadWarning` and
    ``meta["calibration_ignored"]`` where a length calibration lies outside :data:`PLAUSIBLE_PIXEL_NM`."""
    lo, hi = PLAUSIBLE_PIXEL_NM
    if pixel_size is None or unit != "nm" or lo <= pixel_size <= hi:
        return pixel_size, unit
    meta["calibration_ignored"] = {"pixel_size_nm": pixel_size}
    warnings.warn(f"{path}: the file's calibration, {pixel_size:.4g} nm per pixel, is no micrograph's (outside "
                  f"{lo:g}-{hi:g} nm): not used", ReadWarning, stacklevel=3)
    return None, None


@dataclass(frozen=True, eq=False)
class Micrograph:
    """A micrograph: a 2-D image or a time series of frames, with its calibration.

    Attributes
    ----------
    data : float32 ``[H, W]`` image or ``[frames, H, W]`` stack (a read-only memory map for
        large uncompressed stacks).
    pixel_size : size of one pixel in ``unit`` (``None`` when the file has no calibration).
    unit : length unit of ``pixel_size``; known length units are converted to ``"nm"``.
    path : file the data came from.
    metadata : source metadata (JSON-serialisable where possible).

    Examples
    --------
    >>> mg = Micrograph(np.zeros((3, 32, 32), np.float32), pixel_size=0.012, unit="nm")
    >>> mg.is_stack, mg.n_frames, mg.shape2d
    (True, 3, (32, 32))
    >>> [f.shape for f in mg.frames()][0]
    (32, 32)
    """

    data: np.ndarray
    pixel_size: float | None = None
    unit: str | None = None
    path: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def is_stack(self) -> bool:
        """``True`` for a ``[frames, H, W]`` time series."""
        return self.data.ndim == 3

    @property
    def n_frames(self) -> int:
        """Number of frames (1 for a single image)."""
        return int(self.data.shape[0]) if self.is_stack else 1

    @property
    def shape2d(self) -> tuple[int, int]:
        """``(H, W)`` of one frame."""
        return tuple(int(s) for s in self.data.shape[-2:])

    @property
    def pixel_size_nm(self) -> float | None:
        """Pixel size in nm, or ``None`` when uncalibrated or not a length unit."""
        if self.pixel_size is None:
            return None
        f = unit_to_nm(self.unit)
        return None if f is None else self.pixel_size * f

    def frame(self, i: int = 0) -> np.ndarray:
        """Frame ``i`` as a float32 ``[H, W]`` array (``0`` / ``-1`` for a single image).

        From a memory-mapped stack the frame is read into memory; otherwise it may share memory
        with :attr:`data`.
        """
        n = self.n_frames
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} frame(s)")
        if not self.is_stack:
            return np.asarray(self.data, dtype=np.float32)
        f = self.data[i]
        if isinstance(self.data, np.memmap):
            out = np.array(f, dtype=np.float32)
            _release_pages(self.data)
            return out
        return np.asarray(f, dtype=np.float32)

    def frames(self) -> Iterator[np.ndarray]:
        """Yield every frame as a float32 ``[H, W]`` array, one at a time."""
        for i in range(self.n_frames):
            yield self.frame(i)

    def __len__(self) -> int:
        return self.n_frames

    def __repr__(self) -> str:
        cal = f"{self.pixel_size:.5g} {self.unit}" if self.pixel_size is not None else "uncalibrated"
        return (f"Micrograph(shape={tuple(self.data.shape)}, pixel_size={cal}, "
                f"path={self.path!r})")


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def read(path: str | os.PathLike, *, frames: int | slice | Sequence[int] | None = None,
         dataset: str | None = None, allow_nonfinite: bool = False,
         max_nonfinite_fraction: float = 1.0) -> Micrograph:
    """Read a micrograph file.

    Parameters
    ----------
    path : file; the reader is chosen by the extension (case-insensitive), see
        :data:`SUPPORTED_EXTENSIONS`.
    frames : for stacks, the frames to read: an index (gives a 2-D micrograph), a slice or a
        sequence of indices. ``None`` reads all.
    dataset : which image of a file that holds several: for HDF5 the path of the dataset inside the
        file (default: the first 2-D/3-D one); for EMD, DM3/DM4 and SER/EMI the title of the signal,
        any case (a Velox EMD names each detector's image: ``"DF4"``; default: the one titled HAADF, else
        the first image; the titles are in ``metadata["signals"]``); for a TIFF with a channel axis
        (an ImageJ hyperstack's C, an OME-TIFF's) ``"channel N"`` or the channel's title, any case
        (ImageJ slice labels, OME channel names; default: the one :func:`pick_signal` picks of the
        titles, a dark-field detector's, else channel 0; the titles are in
        ``metadata["channel_titles"]``).
    allow_nonfinite : replace scattered NaN/inf pixels by the median of the frame (with a warning)
        instead of raising (command line: ``--fill-nonfinite``). NaN/inf pixels that all form regions
        without data (an aligned or drift-corrected frame's NaN padding) are filled either way, with
        a warning: there no site is placed.
    max_nonfinite_fraction : with ``allow_nonfinite``, raise all the same when more than this
        fraction of the pixels of a frame are not finite outside regions without data (the fill
        would invent the image). A region of them -- an aligned frame's NaN padding, runs of whole
        8 px blocks (:func:`stemfast.nodata.regions_of`) -- does not count: filled with one value it
        stays a region without data, where no site is placed.

    Returns
    -------
    :class:`Micrograph` with float32 data.

    Raises
    ------
    ReadError
        The file is missing, unreadable, corrupt or truncated, of an unsupported type, or holds
        no usable image (empty, 1-D, more than 3 dimensions, complex, smaller than
        :data:`MIN_SIDE` px a side, non-finite values); when the image it declares would not fit
        in the available memory (checked from the header, before the data are loaded; see
        :func:`available_memory_bytes`); also when an optional reader is not installed.

    Notes
    -----
    Pixel sizes come from ImageJ metadata (``unit`` + X/YResolution), TIFF resolution tags in
    cm (not inch/print resolutions), FEI/TFS TIFF tags, a JSON ImageDescription with
    ``pixel_size`` (+ ``unit``), HDF5 attributes ``pixel_size``/``unit``, ``.npz`` entries
    ``pixel_size``/``unit``, and the calibration of the last two axes of RosettaSciIO and MRC
    files. Known length units are converted to nm. RGB(A) images become grey
    (``0.299 R + 0.587 G + 0.114 B``) with a :class:`ReadWarning`, except a TIFF's planar samples
    that are not 8-bit: those are the frames of a short series (tifffile's default for a [3, H, W]
    array) and are read as frames, with a :class:`ReadWarning`; integer data become float32.
    Values float32 cannot carry safely (beyond 1e9 in magnitude, a range below 1e-6, or an
    offset more than 4096 times the range, e.g. an int64 image scaled by 1e16) are rescaled in
    float64 to ``(x - min) / (max - min)`` first, with a :class:`ReadWarning`; ``metadata["rescaled"]``
    records the offset and scale.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = write_tiff(os.path.join(d, "a.tif"), np.ones((32, 32)), pixel_size=0.0125)
    >>> mg = read(os.path.join(d, "a.tif"))
    >>> mg.data.shape, mg.data.dtype, round(mg.pixel_size, 6), mg.unit
    ((32, 32), dtype('float32'), 0.0125, 'nm')
    """
    p = Path(path)
    ext = _check_file(p, dataset)
    raw = _read_raw(p, ext, frames, dataset)
    data, pixel_size, unit, meta = raw
    data = _prepare(p, data, meta, allow_nonfinite=allow_nonfinite, max_nonfinite_fraction=max_nonfinite_fraction)
    pixel_size, unit = _plausible_calibration(p, *_normalise_calibration(pixel_size, unit), meta)
    side = sidecar(p, data.shape[-1])
    if side:
        meta["sidecar"] = side
        if pixel_size is None and side.get("pixel_size"):  # the file's own calibration comes first
            pixel_size, unit = _normalise_calibration(side["pixel_size"], side["unit"])
            side["used"] = pixel_size is not None
    meta.setdefault("format", ext[1:])
    log.debug("read %s: shape %s, pixel size %s %s", p, data.shape, pixel_size, unit)
    return Micrograph(data=data, pixel_size=pixel_size, unit=unit, path=str(p),
                      metadata=_jsonable(meta))


def _check_file(p: Path, dataset: str | None) -> str:
    """The lower-case extension of ``p`` once it is a readable, non-empty file of a supported type;
    a :class:`ReadError` saying what is wrong otherwise."""
    if not p.exists():
        raise ReadError(p, "file not found")
    if p.is_dir():
        raise ReadError(p, "is a directory, not a file")
    ext = p.suffix.lower()
    if ext not in _READABLE:
        raise ReadError(p, f"unsupported file type {p.suffix or '(no extension)'!r} "
                           f"(supported: {', '.join(_READABLE)})")
    if not os.access(p, os.R_OK):
        raise ReadError(p, "permission denied")
    if p.stat().st_size == 0:
        raise ReadError(p, "file is empty (0 bytes)")
    if dataset is not None and ext not in (".h5", ".hdf5", ".tif", ".tiff") + _SIGNAL_FORMATS:
        raise ReadError(p, f"dataset= applies to HDF5 ({_SIGNAL_FORMATS}: the signal's title; TIFF: "
                           "'channel N' or the channel's title) files only")
    return ext


def _tiff_channel_index(p: Path, dataset: str | None, titles: Sequence[str]) -> int:
    """The channel of a TIFF that ``dataset`` names ("channel N", or a title of ``titles``, any case), by
    default the dark-field detector's of ``titles`` as :func:`pick_signal` picks it (channel 0 without
    titles); a :class:`ReadError` when it names none."""
    if dataset is None:
        return pick_signal(titles) if titles else 0
    m = re.fullmatch(r"\s*channel\s*(\d+)\s*", str(dataset), re.I)
    if m is not None:
        return int(m.group(1))
    named = pick_signal(titles, str(dataset).strip()) if titles else None
    if named is None:
        held = f"its channels are titled {', '.join(map(repr, titles))}" if titles else "its channels have no titles"
        raise ReadError(p, f"for a TIFF, dataset= names a channel ('channel 1') or a channel's title; {held}, "
                           f"not {dataset!r}")
    return named


def _read_raw(p: Path, ext: str, frames, dataset: str | None):
    """``(data, pixel_size, unit, meta)`` from the reader of ``ext``; any failure of the reader is a
    :class:`ReadError` (unreadable or corrupt file, or not enough memory)."""
    try:
        if ext in (".tif", ".tiff"):
            return _read_tiff(p, frames, dataset)
        if ext == ".npy":
            return _read_npy(p, frames)
        if ext == ".npz":
            return _read_npz(p, frames)
        if ext in (".h5", ".hdf5"):
            return _read_hdf5(p, frames, dataset)
        if ext == ".ndata":
            return _read_ndata(p, frames)
        if ext == ".mrc":
            return _read_mrc(p, frames)
        if ext in PICTURE_EXTENSIONS:
            return _read_picture(p, frames)
        return _read_rsciio(p, frames, dataset)
    except ReadError:
        raise
    except MemoryError as exc:
        raise ReadError(p, f"not enough memory to load the data ({exc})") from exc
    except Exception as exc:  # any reader failure is a corrupt / unreadable file to the caller
        kind = {".tif": "TIFF", ".tiff": "TIFF", ".h5": "HDF5"}.get(ext, ext[1:].upper())
        if (package := _missing_package(exc)) is not None:
            raise ReadError(p, f"reading this {kind} file needs the Python package {package!r}, which is not "
                               f"installed (pip install {package})") from exc
        raise ReadError(p, f"unreadable or corrupt {kind} file "
                           f"({type(exc).__name__}: {exc})") from exc


#: how a reader says that an optional package is missing: tifffile ("<COMPRESSION.JPEG: 7> requires the
#: 'imagecodecs' package"), RosettaSciIO ("The 'sparse' library was not found")
_MISSING_PACKAGE = re.compile(r"requires the '([\w.-]+)' package|the '([\w.-]+)' library was not found", re.I)


def _missing_package(exc: BaseException) -> str | None:
    """The optional package whose absence made a reader fail, or None.

    >>> _missing_package(ValueError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package"))
    'imagecodecs'
    >>> _missing_package(OSError("bad offset")) is None
    True
    """
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return exc.name.split(".")[0]
    m = _MISSING_PACKAGE.search(str(exc))
    return None if m is None else (m.group(1) or m.group(2))


def write_tiff(path: str | os.PathLike, data: np.ndarray, *, pixel_size: float | None = None,
               unit: str = "nm") -> Path:
    """Write a float32 ImageJ-style TIFF (2-D image or ``[frames, H, W]`` time series).

    The calibration goes into the X/YResolution tags (pixels per unit) and the ImageJ ``unit``,
    as ImageJ/Fiji write it, so :func:`read`, ImageJ and other tools recover it. Known length
    units are written as nm. The file is written to a temporary file in the same folder and
    moved into place (``os.replace``), so readers never see a half-written file.

    Parameters
    ----------
    path : output file (``.tif`` / ``.tiff``).
    data : 2-D or 3-D real array (converted to float32).
    pixel_size : pixel size in ``unit`` (``None``: no calibration).
    unit : length unit of ``pixel_size``.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "x.tif")
    >>> p = write_tiff(out, np.zeros((3, 16, 16)), pixel_size=1.2, unit="A")
    >>> mg = read(p)
    >>> mg.n_frames, round(mg.pixel_size, 6), mg.unit
    (3, 0.12, 'nm')
    """
    import tifffile

    p = Path(path)
    arr = np.asarray(data)
    if arr.ndim not in (2, 3):
        raise ValueError(f"write_tiff: data must be 2-D or 3-D, got shape {arr.shape}")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"write_tiff: data must be real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    kwargs: dict[str, Any] = {"imagej": True}
    meta: dict[str, Any] = {"axes": "YX" if arr.ndim == 2 else "TYX"}
    if pixel_size is not None:
        ps, u = _normalise_calibration(pixel_size, unit)
        if ps is None:
            raise ValueError(f"write_tiff: pixel_size must be a positive number with a unit, "
                             f"got {pixel_size!r} {unit!r}")
        kwargs["resolution"] = (1.0 / ps, 1.0 / ps)
        meta["unit"] = "".join(c if ord(c) < 128 else f"\\u{ord(c):04X}" for c in u)
    kwargs["metadata"] = meta
    from .atomic import atomic_path

    with atomic_path(p) as tmp:
        tifffile.imwrite(tmp, arr, **kwargs)
    return p


def find_micrographs(directory: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Micrograph files in a folder, by extension (:data:`SUPPORTED_EXTENSIONS`).

    Hidden files and folders (names starting with ``.``) and ground-truth files
    (``*.truth.npz``) are skipped, and so is a TIA ``.emi`` file that has its ``.ser`` data
    files next to it (they are listed instead). Sorted by path.

    Parameters
    ----------
    directory : folder to search.
    recursive : also search sub-folders.

    Raises
    ------
    ReadError
        The folder does not exist or is not a folder.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = write_tiff(os.path.join(d, "b.tif"), np.zeros((16, 16)))
    >>> np.save(os.path.join(d, "a.npy"), np.zeros((16, 16)))
    >>> [p.name for p in find_micrographs(d)]
    ['a.npy', 'b.tif']
    """
    files, problems = scan_micrographs(directory, recursive=recursive)
    for p, reason in problems:
        log.warning("%s: %s", p, reason)
    return files


def find_pictures(directory: str | os.PathLike) -> list[Path]:
    """The exported pictures (:data:`PICTURE_EXTENSIONS`) in a folder and its sub-folders, hidden ones
    skipped, sorted (the walk of :func:`scan_micrographs`) -- which :func:`find_micrographs` leaves out
    (they are read when named).

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "fig.PNG"), "wb").close()
    >>> [p.name for p in find_pictures(d)]
    ['fig.PNG']
    """
    return scan_micrographs(directory, extensions=PICTURE_EXTENSIONS)[0]


def _scandir(path):
    """``os.scandir`` (a seam for the tests)."""
    return os.scandir(path)


def scan_micrographs(directory: str | os.PathLike, *, recursive: bool = True,
                     extensions: tuple[str, ...] = SUPPORTED_EXTENSIONS) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Micrograph files of a folder and the entries that could not be looked at.

    Like :func:`find_micrographs`, plus a list of ``(path, reason)`` for what would otherwise
    vanish silently: a sub-folder that cannot be read, a dangling symbolic link with a micrograph
    extension, an entry that cannot be examined.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "a.npy"), np.zeros((16, 16)))
    >>> os.symlink(os.path.join(d, "gone.tif"), os.path.join(d, "link.tif"))
    >>> files, problems = scan_micrographs(d)
    >>> [p.name for p in files], [(p.name, r.split(" (")[0]) for p, r in problems]
    (['a.npy'], [('link.tif', 'dangling symbolic link')])
    """
    root = Path(directory)
    if not root.exists():
        raise ReadError(root, "folder not found")
    if not root.is_dir():
        raise ReadError(root, "not a folder")
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with _scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            from .errors import describe_os_error

            problems.append((folder, f"folder not readable ({describe_os_error(exc, folder).split(': ', 1)[-1]}); "
                                     "its files are not analysed"))
            continue
        for ent in entries:
            if ent.name.startswith("."):
                continue
            p = Path(ent.path)
            try:
                is_link = ent.is_symlink()
                if ent.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(p)
                    continue
            except OSError as exc:
                problems.append((p, f"cannot examine ({exc})"))
                continue
            name = ent.name.lower()
            if p.suffix.lower() not in extensions or name.endswith(".truth.npz"):
                continue
            try:
                ok = ent.is_file(follow_symlinks=True)
            except OSError as exc:
                problems.append((p, f"cannot examine ({exc})"))
                continue
            if not ok:
                if is_link and not p.exists():
                    problems.append((p, f"dangling symbolic link (points to {os.readlink(p)}, which does not exist)"))
                continue
            found.append(p)
    sers = {(p.parent, p.stem.lower()) for p in found if p.suffix.lower() == ".ser"}
    out = []
    for p in found:
        if p.suffix.lower() == ".emi":
            stem = p.stem.lower()
            if any(par == p.parent and (s == stem or s.startswith(stem + "_")) for par, s in sers):
                continue
        out.append(p)
    return sorted(out), sorted(problems)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
#: Working copies of one float32 frame the analysis holds besides the data (bandpass, refinement);
#: the 16k x 16k batch peaks at ~3 GB for a 1 GB frame.
_WORK_COPIES = 2


def available_memory_bytes() -> int:
    """Memory the process can use: ``STEMFAST_MEMORY_LIMIT_MB`` if set, else MemAvailable + SwapFree.

    Examples
    --------
    >>> available_memory_bytes() > 0
    True
    """
    env = os.environ.get("STEMFAST_MEMORY_LIMIT_MB")
    if env:
        try:
            return int(float(env) * 2**20)
        except ValueError:
            log.warning("STEMFAST_MEMORY_LIMIT_MB=%r is not a number; ignored", env)
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k.strip()] = int(v.split()[0]) * 1024
        return int(info.get("MemAvailable", info.get("MemFree", 0)) + info.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to tell
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_memory(path: Path, shape: Sequence[int], dtype, *, lazy_frames: bool = False) -> None:
    """Refuse (ReadError naming the size) an image whose analysis would not fit in memory.

    ``shape`` / ``dtype`` as declared by the file header; ``lazy_frames``: a stack read one frame at
    a time (memory map), so only one frame is ever in memory.
    """
    shape = [int(s) for s in shape]
    core = [s for s in shape if s != 1]
    if len(core) < 2:
        return
    itemsize = max(1, int(np.dtype(dtype).itemsize)) if dtype is not None else 4
    rgb = _is_rgb_shape(shape)
    img = core[-3:-1] if rgb else core[-2:]
    n_px = int(np.prod(shape, dtype=np.float64))
    frame_f32 = 4.0 * float(img[0]) * float(img[1])
    data = frame_f32 if lazy_frames else n_px * (itemsize + 4.0)  # the source array + its float32 copy
    need = data + _WORK_COPIES * frame_f32
    avail = float(available_memory_bytes())
    if need > avail:
        frames = f" x {core[0]} frames" if len(core) == 3 and not rgb else ""
        raise ReadError(path, f"image too large for the memory: {img[0]} x {img[1]} px{frames} "
                              f"({np.dtype(dtype) if dtype is not None else 'unknown type'}) needs about "
                              f"{_gib(need)} to analyse, {_gib(avail)} available; crop or bin it, or use a "
                              "machine with more memory")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _prepare(path: Path, data: Any, meta: dict, *, allow_nonfinite: bool,
             max_nonfinite_fraction: float = 1.0) -> np.ndarray:
    """Shape/dtype/value checks and the float32 conversion shared by all readers."""
    if not isinstance(data, np.ndarray):
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", None)
        if shape is not None:
            _check_memory(path, shape, dtype)
        data = np.asarray(data)
    dt = data.dtype
    meta.setdefault("source_dtype", str(dt))
    meta.setdefault("source_shape", [int(s) for s in data.shape])
    if dt.fields is not None or dt.kind in "OUSVM":
        raise ReadError(path, f"data of type {dt} is not an image")
    if dt.kind == "c":
        raise ReadError(path, f"complex data ({dt}); pass the modulus or the real part "
                              "as a real-valued image")
    if data.size == 0:
        raise ReadError(path, f"empty array (shape {tuple(data.shape)})")
    rgb = bool(meta.pop("_rgb", False)) or _is_rgb_shape(data.shape)
    if rgb:
        from .colour import colour_note, grey_from_colour

        data, how = grey_from_colour(data)
        msg = f"{path}: RGB(A) image, {colour_note(how)}"
        warnings.warn(msg, ReadWarning, stacklevel=3)
        log.info("%s", msg)
        meta["converted_from_rgb"] = how
    if data.ndim > 2 and 1 in data.shape:
        data = data.reshape([s for s in data.shape if s != 1] or [1])
    src = tuple(meta["source_shape"])
    if data.ndim < 2:
        raise ReadError(path, f"{data.ndim}-D data (shape {src}); an image needs 2 dimensions")
    if data.ndim > 3:
        raise ReadError(path, f"{data.ndim}-D data (shape {src}); only images [H, W] and time "
                              "series [frames, H, W] (plus singleton or RGB axes) are supported")
    h, w = data.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ReadError(path, f"image too small ({h} x {w} px; at least {MIN_SIDE} px a side)")
    keep_map = isinstance(data, np.memmap) and data.ndim == 3 and data.dtype == np.float32 \
        and data.dtype.isnative
    _check_memory(path, data.shape, data.dtype, lazy_frames=keep_map)
    if not keep_map and data.dtype.kind in "iuf":
        data = _safe_range(path, data, meta)
    if keep_map:
        bad = 0
        for i in range(data.shape[0]):
            bad += int(np.count_nonzero(~np.isfinite(data[i])))
            _release_pages(data)
    elif isinstance(data, np.memmap) or not data.flags.owndata or not data.flags.writeable:
        data = np.array(data, dtype=np.float32, order="C")  # into memory, never alias a file
        bad = int(np.count_nonzero(~np.isfinite(data)))
    else:
        data = np.ascontiguousarray(data, dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        data = _fill_nonfinite(path, data, meta, bad, allow_nonfinite, max_nonfinite_fraction)
    return data


#: float32 carries an image safely when its values stay within this magnitude ...
_SAFE_MAX = 1e9
#: ... its range is at least this ...
_SAFE_MIN_RANGE = 1e-6
#: ... and its offset is at most this many times its range (float32 keeps 24 bits).
_SAFE_OFFSET = 4096.0


def _finite_min_max(data: np.ndarray) -> tuple[float, float] | None:
    """Smallest and largest finite value (float64), frame by frame / in row blocks; None if none."""
    lo, hi = math.inf, -math.inf
    flat = data.reshape(-1, data.shape[-1])
    step = max(1, (1 << 22) // max(1, data.shape[-1]))
    for a in range(0, flat.shape[0], step):
        b = np.asarray(flat[a:a + step])
        if b.dtype.kind == "f":
            b = b[np.isfinite(b)]
            if b.size == 0:
                continue
        lo = min(lo, float(np.min(b)))
        hi = max(hi, float(np.max(b)))
    return None if lo > hi else (lo, hi)


def _safe_range(path: Path, data: np.ndarray, meta: dict) -> np.ndarray:
    """Rescale (in float64) values float32 cannot carry safely to ``(x - min) / (max - min)``."""
    if data.dtype.itemsize < 4 and data.dtype.kind in "iu":
        return data  # 8/16-bit integers always fit
    mm = _finite_min_max(data)
    if mm is None:
        return data
    lo, hi = mm
    rng = hi - lo
    big = max(abs(lo), abs(hi))
    if rng == 0 or (big <= _SAFE_MAX and rng >= _SAFE_MIN_RANGE and big <= _SAFE_OFFSET * rng):
        return data
    out = np.empty(data.shape, dtype=np.float32)
    flat_in = data.reshape(-1, data.shape[-1])
    flat_out = out.reshape(-1, data.shape[-1])
    step = max(1, (1 << 22) // max(1, data.shape[-1]))
    scale = 1.0 / rng
    for a in range(0, flat_in.shape[0], step):
        flat_out[a:a + step] = (np.asarray(flat_in[a:a + step], dtype=np.float64) - lo) * scale
    msg = (f"{path}: pixel values from {lo:.6g} to {hi:.6g} do not fit float32 safely; rescaled to "
           "(x - min) / (max - min) in float64")
    warnings.warn(msg, ReadWarning, stacklevel=4)
    log.info("%s", msg)
    meta["rescaled"] = {"offset": lo, "scale": rng, "note": "data = (source - offset) / scale"}
    return out


def _note_series(path: Path, series_list, pick: int, meta: dict) -> None:
    """Say which of several TIFF series was read (a ReadWarning; ``meta["series"]``)."""
    if len(series_list) > 1:
        meta["series"] = pick
        shapes = ", ".join("x".join(map(str, sr.shape)) for sr in series_list)
        msg = f"{path}: the TIFF holds {len(series_list)} image series ({shapes}); series {pick}, the largest, was read"
        warnings.warn(msg, ReadWarning, stacklevel=5)
        log.info("%s", msg)


def tiff_channels(path: str | os.PathLike) -> int:
    """The number of channels (the ``C`` axis: an ImageJ hyperstack of detectors) of the series
    :func:`read` reads from a TIFF; 0 without a channel axis or for a file it cannot open.

    >>> import tempfile, os, tifffile
    >>> p = os.path.join(tempfile.mkdtemp(), "c.tif")
    >>> tifffile.imwrite(p, np.zeros((2, 32, 32), np.float32), imagej=True, metadata={"axes": "CYX"})
    >>> tiff_channels(p)
    2
    """
    return tiff_channel_info(path)[0]


def tiff_channel_info(path: str | os.PathLike) -> tuple[int, list[str]]:
    """``(channels, titles)`` of the series :func:`read` reads from a TIFF: the size of its channel axis
    (0 without one) and the channels' titles (an ImageJ hyperstack's slice labels, an OME-TIFF's
    channel names: "HAADF", "BF"; [] where the file has none, or not one distinct title per channel).
    ``(0, [])`` for a file it cannot open.

    >>> import tempfile, os, tifffile
    >>> p = os.path.join(tempfile.mkdtemp(), "c.tif")
    >>> tifffile.imwrite(p, np.zeros((2, 32, 32), np.float32), imagej=True,
    ...                  metadata={"axes": "CYX", "Labels": ["BF", "HAADF"]})
    >>> tiff_channel_info(p)
    (2, ['BF', 'HAADF'])
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[_largest_series(tif.series)]
            return _channel_count(series), _channel_titles(tif, series)
    except Exception:  # noqa: BLE001 - not readable here: read() says why when the file is read
        return 0, []


def _channel_count(series) -> int:
    """The size of a TIFF series' channel axis (``C``), 0 without one."""
    return int(series.shape[series.axes.index("C")]) if "C" in series.axes else 0


def _channel_titles(tif, series) -> list[str]:
    """The titles of a TIFF series' channels (:func:`tiff_channel_info`), [] without them. ImageJ labels
    each slice, the channels first (its planes run channel, slice, frame): the first frame's labels
    title the channels. OME-XML names them in the ``Channel`` elements of the first ``Pixels``."""
    n = _channel_count(series)
    titles: list = []
    if n >= 2 and tif.is_imagej:
        labels = (tif.imagej_metadata or {}).get("Labels")
        titles = list(labels[:n]) if isinstance(labels, (list, tuple)) and len(labels) >= n else []
    elif n >= 2 and tif.is_ome:
        titles = _ome_channel_names(tif.ome_metadata)
    titles = [str(t).strip() for t in titles]
    distinct = len(titles) == n and all(titles) and len({t.lower() for t in titles}) == n
    return titles if distinct else []


def _ome_channel_names(xml: str | None) -> list[str]:
    """The ``Name`` of each ``Channel`` of the first ``Pixels`` of an OME-XML header ("" where a channel has
    none), [] without them.

    >>> _ome_channel_names('<OME><Image><Pixels><Channel Name="HAADF"/><Channel Name="BF"/></Pixels></Image></OME>')
    ['HAADF', 'BF']
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return []
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return []
    return [c.get("Name", "") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]


def _tiff_channels(path: Path, series, meta: dict, channel: int = 0, warn: bool = True,
                   titles: Sequence[str] = ()) -> int:
    """The number of channels of a TIFF series with a channel axis (an ImageJ hyperstack's ``C``:
    detectors or colours of one scan, not frames of a series), 0 without one. Channel ``channel`` is
    read (a :class:`ReadError` where there is no such channel), with a :class:`ReadWarning` (``warn``:
    not for each frame a series is read by); ``meta["channels"]``, ``meta["channel"]``, and with the
    channels' ``titles``, ``meta["channel_titles"]``."""
    n = _channel_count(series)
    if channel >= max(n, 1):
        raise ReadError(path, f"no channel {channel}: the TIFF holds {max(n, 1)}")
    if n < 2:
        return 0
    meta["channels"], meta["channel"] = n, channel
    if titles:
        meta["channel_titles"] = list(titles)
    held = f" ({', '.join(titles)})" if titles else ""
    name = f" ({titles[channel]})" if titles else ""
    msg = (f"{path}: the TIFF holds {n} channels{held} (its C axis: detectors or colours of one scan, not frames "
           f"of a series); channel {channel}{name} was read")
    if warn:
        warnings.warn(msg, ReadWarning, stacklevel=5)
    log.info("%s", msg)
    return n


def _tiff_is_colour(path: Path, series, meta: dict) -> bool:
    """Whether a TIFF series holds RGB(A) samples to convert to grey: 3 or 4 samples per pixel,
    unless they are the frames of a short series (:func:`_planar_samples_are_frames`: then a
    ReadWarning and ``meta["planar_samples_as_frames"]``)."""
    axes, shape = series.axes, series.shape
    if not ("S" in axes and shape[axes.index("S")] in (3, 4)):
        return False
    if not _planar_samples_are_frames(axes, shape, series.dtype):
        return True
    n = shape[axes.index("S")]
    msg = (f"{path}: a TIFF of {n} planar {np.dtype(series.dtype).name} samples read as {n} frames, not as one "
           "RGB(A) image: colour images are 8-bit, and tifffile stores a [3, H, W] or [4, H, W] array so unless "
           "photometric='minisblack' is given")
    warnings.warn(msg, ReadWarning, stacklevel=5)
    log.info("%s", msg)
    meta["planar_samples_as_frames"] = True
    return False


def _fill_nonfinite(path: Path, data: np.ndarray, meta: dict, bad: int, allow_nonfinite: bool,
                    max_nonfinite_fraction: float) -> np.ndarray:
    """``data`` (``bad`` of its values NaN or infinite) with them replaced by the frame median, or a
    ReadError: when all are; without ``allow_nonfinite``, when any of them is a scattered one (outside
    a region without data, :func:`stemfast.nodata.regions_of`: an aligned frame's NaN padding, which
    is filled either way); with it, when more than ``max_nonfinite_fraction`` of a frame's pixels are
    scattered ones. Records ``meta["nonfinite_replaced"]`` (and ``meta["nonfinite_in_regions"]`` when all
    of them formed regions without data)."""
    from .nodata import regions_of

    n = int(np.prod(data.shape))
    if bad == n:
        raise ReadError(path, "all values are NaN or infinite")
    frames = data if data.ndim == 3 else data[None]
    # per frame, how many of its non-finite pixels form regions without data (the regions lie within them)
    margins = [int(regions_of(~np.isfinite(fr)).sum()) for fr in frames]
    margin = sum(margins)
    if not allow_nonfinite and margin < bad:  # scattered ones: filling them invents pixels, the user says so
        why = (f"; {margin} of them form regions without data (an aligned frame's padding?), where no site "
               "is placed once they are filled" if margin else "")
        raise ReadError(path, f"{bad} of {n} values are NaN or infinite (--fill-nonfinite, or "
                              f"read(..., allow_nonfinite=True), replaces them by the frame median{why})")
    # (all of them regions without data -- an aligned or drift-corrected frame's NaN padding -- are
    # filled whatever the option: one value there is a region without data, where no site is placed)
    data = np.array(data, dtype=np.float32, order="C")
    stack = data if data.ndim == 3 else data[None]
    for i, fr in enumerate(stack):
        m = ~np.isfinite(fr)
        if not m.any():
            continue
        # the limit is on scattered pixels: a region without data (a NaN margin) filled with one
        # value stays one (stemfast.nodata), and no site is placed there
        frac = float(np.count_nonzero(m) - margins[i]) / float(m.size)
        if frac > max_nonfinite_fraction:
            where = f"frame {i}: " if data.ndim == 3 else ""
            raise ReadError(path, f"{where}{frac:.2%} of the pixels are NaN or infinite outside regions without "
                                  f"data, more than the {max_nonfinite_fraction:.2%} that may be filled "
                                  "(--nonfinite-limit)")
        good = fr[~m]
        fr[m] = np.median(good) if good.size else np.nanmedian(data[np.isfinite(data)])
    msg = f"{path}: replaced {bad} NaN/infinite values by the frame median" + (
        " (all in regions without data: an aligned frame's padding; no site is placed there)" if margin == bad else "")
    warnings.warn(msg, ReadWarning, stacklevel=4)
    log.info("%s", msg)
    meta["nonfinite_replaced"] = bad
    if margin == bad:
        meta["nonfinite_in_regions"] = True
    return data


def _largest_series(series_list) -> int:
    """Index of the TIFF series with the most pixels (the first of equals; 0 for none): the
    micrograph, not a thumbnail or preview stored beside it, in whichever order."""
    sizes = [int(np.prod(sr.shape, dtype=np.float64)) for sr in series_list]
    return int(np.argmax(sizes)) if sizes else 0


def _planar_samples_are_frames(axes: str, shape: Sequence[int], dtype) -> bool:
    """Whether a TIFF series' 3 or 4 samples per pixel (axis ``S`` of ``axes``) are the frames of a
    series rather than colour: one image (no other axis longer than 1) stored planar (one plane per
    sample, ``S`` before ``Y`` and ``X``), not 8-bit. tifffile writes any [3, H, W] or [4, H, W]
    array as planar RGB(A) unless told otherwise (a deprecated default), which makes a short series
    of detector frames (16-bit or float) look like one colour image; colour images of micrographs
    are 8-bit.

    Examples
    --------
    >>> _planar_samples_are_frames("SYX", (3, 64, 64), np.float32)
    True
    >>> _planar_samples_are_frames("SYX", (3, 64, 64), np.uint8)
    False
    >>> _planar_samples_are_frames("YXS", (64, 64, 3), np.uint16)  # contiguous samples: colour
    False
    >>> _planar_samples_are_frames("ISYX", (5, 3, 64, 64), np.float32)  # pages of planar images: colour
    False
    """
    if not ("S" in axes and "Y" in axes and axes.index("S") < axes.index("Y")):
        return False
    single = all(n == 1 for n, a in zip(shape, axes) if a not in "SYX")
    return single and np.dtype(dtype) != np.uint8


def _is_rgb_shape(shape: Sequence[int]) -> bool:
    core = [int(s) for s in shape if s != 1]
    return len(core) >= 3 and core[-1] in (3, 4) and min(core[-3:-1]) >= MIN_SIDE


def _release_pages(mm: np.memmap) -> None:
    """Drop the pages of a read-only memory map from this process (the OS keeps them cached).

    Pages of a file mapping that were read count towards the process's resident memory until they
    are unmapped, so streaming a 3 GB stack frame by frame would look like a 3 GB process; after
    each frame is copied out (or checked) its pages are released, and the resident memory stays
    that of one frame whatever the length of the stack.
    """
    m = getattr(mm, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - closed map or unsupported platform
            pass


def _select_frames(path: Path, data: Any, frames: Any) -> Any:
    """Apply a ``frames=`` selection to an image / stack (singleton axes dropped first)."""
    if frames is None:
        return data
    shape = tuple(int(s) for s in data.shape)
    core = [s for s in shape if s != 1]
    rgb = _is_rgb_shape(shape)
    n_img_axes = 3 if rgb else 2
    if len(core) == n_img_axes:  # a single image: only frame 0 exists
        _frame_index(path, frames, 1)
        return data
    if len(core) != n_img_axes + 1:
        raise ReadError(path, f"frames= needs a 2-D image or a 3-D stack, data has shape {shape}")
    arr = data.reshape(core) if len(core) != len(shape) else data
    return arr[_frame_index(path, frames, core[0])]


def _frame_index(path: Path, frames: Any, n: int) -> int | slice | np.ndarray:
    if isinstance(frames, (int, np.integer)):
        i = int(frames)
        if not -n <= i < n:
            raise ReadError(path, f"frame {i} out of range (the file has {n} frame(s))")
        return i % n if n > 1 else 0
    if isinstance(frames, slice):
        if not len(range(*frames.indices(n))):
            raise ReadError(path, f"frames={frames} selects no frame (the file has {n})")
        return frames
    try:
        idx = np.asarray(list(frames), dtype=np.int64)
    except (TypeError, ValueError):
        raise ReadError(path, f"frames must be an int, a slice or a sequence of ints, got {frames!r}")
    if idx.ndim != 1 or idx.size == 0:
        raise ReadError(path, f"frames={frames!r} selects no frame")
    if (idx < -n).any() or (idx >= n).any():
        raise ReadError(path, f"frames {idx.tolist()} out of range (the file has {n} frame(s))")
    return idx % n


# ---------------------------------------------------------------------------------------------
# readers: each returns (array-like, pixel_size, unit, metadata)
# ---------------------------------------------------------------------------------------------
def _read_tiff(path: Path, frames: Any, dataset: str | None = None):
    """``(data, pixel_size, unit, meta)`` of a TIFF: its largest series, of a series with channels the
    one ``dataset`` names (:func:`_tiff_channel_index`)."""
    import tifffile

    size = path.stat().st_size
    with _CaptureLog("tifffile") as problems:  # tifffile logs, rather than raises, broken IFDs
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            raise ReadError(path, f"not a valid TIFF file ({exc})") from exc
        try:
            series_list = tif.series
            pick = _largest_series(series_list)
            series = series_list[pick] if series_list else None
            if series is not None:
                list(series.pages)
        except BaseException:
            tif.close()
            raise
    with tif:
        if series is None:
            raise ReadError(path, "TIFF file without image data")
        axes = series.axes
        meta: dict[str, Any] = {"format": "tiff", "axes": axes, "n_series": len(series_list)}
        _note_series(path, series_list, pick, meta)
        broken = [m for m in problems if "offset" in m.lower() or "corrupt" in m.lower()
                  or "truncat" in m.lower()]
        if broken:
            raise ReadError(path, f"truncated or corrupt TIFF file ({broken[0]})")
        if problems:
            meta["tifffile_messages"] = problems[:10]
        if tif.is_imagej:
            announced = int((tif.imagej_metadata or {}).get("images", 1) or 1)
            plane = int(np.prod([s for s, a in zip(series.shape, axes) if a in "YXS"]))
            held = int(np.prod(series.shape)) // max(plane, 1)
            if held < announced:
                raise ReadError(path, f"truncated TIFF file (the ImageJ header announces "
                                      f"{announced} images, the file holds {held})")
        # truncation check: every data segment must lie inside the file
        for page in series.pages:
            if page is None:
                continue
            offs = getattr(page, "dataoffsets", ()) or ()
            cnts = getattr(page, "databytecounts", ()) or ()
            if offs and cnts and max(o + c for o, c in zip(offs, cnts)) > size:
                raise ReadError(path, "truncated TIFF file (image data extends past the end "
                                      f"of the {size}-byte file)")
        page0 = tif.pages[0]
        pixel_size, unit = _tiff_calibration(tif, page0, meta)
        if pixel_size is None:
            pixel_size, unit = _tiff_calibration_rsciio(path, meta)
        rgb = meta["_rgb"] = _tiff_is_colour(path, series, meta)
        n_pages = len(series.pages)
        core = [s for s, a in zip(series.shape, axes) if s != 1 and (a != "S" or not rgb)]
        data = None
        titles = _channel_titles(tif, series)
        channel = _tiff_channel_index(path, dataset, titles)
        channels = _tiff_channels(path, series, meta, channel, warn=frames is None, titles=titles)
        if len(core) == 3 and not rgb and not channels:
            try:  # uncompressed contiguous stacks: memory-map (read-only), frames load lazily
                if series.dataoffset is not None and series.dtype.isnative:
                    data = np.memmap(path, dtype=series.dtype, mode="r",
                                     offset=series.dataoffset, shape=tuple(series.shape))
            except (ValueError, OSError, TypeError):  # not contiguous: read normally
                data = None
            if data is None and frames is not None and n_pages == core[0]:
                idx = _frame_index(path, frames, n_pages)
                key = (list(range(*idx.indices(n_pages))) if isinstance(idx, slice)
                       else idx.tolist() if isinstance(idx, np.ndarray) else int(idx))
                _check_memory(path, [len(key) if isinstance(key, list) else 1, *series.shape[-2:]], series.dtype)
                arr, _ = _decode_tiff(path, tif, pick, key)
                if isinstance(idx, (int, np.integer)):
                    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
                return arr, pixel_size, unit, meta
        if data is None:
            _check_memory(path, series.shape, series.dtype)
            data, by_pillow = _decode_tiff(path, tif, pick)
            if channels:  # one channel of every frame: the channel's view of the whole series
                data = data[(slice(None),) * axes.index("C") + (channel,)]
            elif rgb and axes.index("S") != len(axes) - 1 and not by_pillow:  # planar RGB: samples last
                data = np.moveaxis(data, axes.index("S"), -1)
    return _select_frames(path, data, frames), pixel_size, unit, meta


def _decode_tiff(path: Path, tif, pick: int, key: Any = None) -> tuple[np.ndarray, bool]:
    """``(pixels, by_pillow)`` of TIFF series ``pick`` (pages ``key``, a list or an int, or all) by
    tifffile; where tifffile lacks the codec (it decodes LZW, JPEG and others through the optional
    imagecodecs), Pillow decodes the pages instead (colour samples last)."""
    series = tif.series[pick]
    try:
        return (tif.asarray(series=pick, key=key) if key is not None else series.asarray()), False
    except ValueError as exc:
        if _missing_package(exc) is None:
            raise
        pages = [p.index for p in series.pages]
        chosen = pages if key is None else [pages[k] for k in (key if isinstance(key, list) else [key])]
        try:
            frames = _pillow_pages(path, chosen)
        except Exception:  # noqa: BLE001 - Pillow cannot either: tifffile's reason is the one to give
            raise exc from None
    log.info("%s: decoded by Pillow (tifffile needs imagecodecs for its %s compression)", path,
             getattr(series.pages[0], "compression", "?"))
    if key is not None:
        return (np.stack(frames) if isinstance(key, list) else frames[0]), True
    data = np.stack(frames) if len(frames) > 1 else frames[0]
    if "S" not in series.axes:  # the pages in the series' own shape (a hyperstack's T and C axes)
        data = data.reshape(series.shape)
    return data, True


def _pillow_pages(path: Path, indices: list) -> list:
    """The pixels of a TIFF's pages (their IFD indices) decoded by Pillow."""
    with _pillow_open(path) as im:
        out = []
        for i in indices:
            im.seek(i)
            out.append(np.asarray(im))
        return out


def _pillow_open(path: Path):
    """``PIL.Image.open(path)`` without Pillow's decompression-bomb limit (a 16k x 16k micrograph is
    over it): :func:`_check_memory` decides what may be read."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


class _CaptureLog(logging.Handler):
    """Collect the WARNING+ messages of one logger while the ``with`` block runs."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self._logger = logging.getLogger(name)
        self._thread = threading.get_ident()  # only this thread's messages (parallel reads)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self._thread:
            return
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a broken log call must not break reading
            self.messages.append(str(record.msg))

    def __enter__(self) -> list[str]:
        self._logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)


def _tiff_calibration(tif, page, meta: dict) -> tuple[float | None, str | None]:
    """Pixel size from ImageJ, OME, FEI, JSON-description or resolution-tag metadata."""
    tags = page.tags

    def res(name):
        t = tags.get(name)
        if t is None:
            return None
        v = t.value
        try:
            v = v[0] / v[1] if isinstance(v, tuple) else float(v)
        except (TypeError, ZeroDivisionError, IndexError):
            return None
        return v if math.isfinite(v) and v > 0 else None

    xres, yres = res("XResolution"), res("YResolution")
    ru = tags.get("ResolutionUnit")
    runit = int(ru.value) if ru is not None else 2
    if page.description:
        desc = page.description
        meta["description"] = desc if len(desc) <= 20000 else desc[:20000] + "..."
    # ImageJ: unit + pixels-per-unit in XResolution (spacing is the z step)
    if tif.is_imagej:
        ij = dict(tif.imagej_metadata or {})
        meta["imagej"] = ij
        unit = ij.get("unit")
        if unit is not None:
            unit = _decode_ij_unit(str(unit))
        if unit and unit.strip().lower() not in _NO_UNIT and xres:
            _note_pixel_size_y(tif.filename, meta, 1.0 / xres, 1.0 / yres if yres else None, unit)
            return 1.0 / xres, unit
    # OME-TIFF (Bio-Formats, Fiji's OME export): the first Pixels' PhysicalSizeX, in micrometres unless its unit says
    if getattr(tif, "is_ome", False):
        ps, unit = _ome_calibration(tif.ome_metadata)
        if ps is not None:
            return ps, unit
    # FEI / Thermo Fisher
    fei = getattr(tif, "fei_metadata", None) if getattr(tif, "is_fei", False) else None
    if fei:
        meta["fei"] = fei
        for sec in ("Scan", "EScan"):
            pw = (fei.get(sec) or {}).get("PixelWidth")
            if pw:
                return float(pw), "m"
    # JSON description (tifffile shaped / other writers)
    if page.description and page.description.lstrip().startswith("{"):
        try:
            d = json.loads(page.description)
        except ValueError:
            d = None
        if isinstance(d, dict):
            if d.get("pixel_size") is not None:
                return d["pixel_size"], d.get("unit", "nm")
            if d.get("pixel_size_A") is not None:
                return d["pixel_size_A"], "A"
            if d.get("pixel_size_nm") is not None:
                return d["pixel_size_nm"], "nm"
    # plain resolution tags: only metric units (inch resolutions are print DPI)
    if xres and runit == 3:  # CENTIMETER
        ps_nm = 1e7 / xres
        if ps_nm < 1e3:  # a print resolution would give pixels of tens of microns
            return ps_nm, "nm"
    return None, None


def _note_pixel_size_y(path, meta: dict, ps: float, ps_y: float | None, unit: str | None) -> None:
    """A file's pixels that are not square (``ps_y``, the pixel height, differs from the width ``ps`` by
    more than a millionth): ``meta["pixel_size_y"]`` and a logged warning; the width is the pixel size."""
    if ps_y and abs(ps_y - ps) > 1e-6 * abs(ps):
        meta["pixel_size_y"] = ps_y
        log.warning("%s: anisotropic pixels (x %g, y %g %s); using x", path, ps, ps_y, unit)


def _ome_calibration(xml: str | None) -> tuple[float | None, str | None]:
    """``(PhysicalSizeX, its unit)`` of the first ``Pixels`` of an OME-XML header (OME's default unit is
    the micrometre), or ``(None, None)``.

    >>> _ome_calibration('<OME><Image><Pixels PhysicalSizeX="0.02" PhysicalSizeXUnit="nm"/></Image></OME>')
    (0.02, 'nm')
    >>> _ome_calibration('<OME><Image><Pixels PhysicalSizeX="0.5"/></Image></OME>')
    (0.5, 'µm')
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None, None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None, None
    try:
        return float(pixels.get("PhysicalSizeX")), pixels.get("PhysicalSizeXUnit", "µm")
    except ValueError:
        return None, None


def _tiff_calibration_rsciio(path: Path, meta: dict) -> tuple[float | None, str | None]:
    """Pixel size of a TIFF whose calibration :func:`_tiff_calibration` does not read (DigitalMicrograph's
    private tags, JEOL SightX, Zeiss SEM, ...) from RosettaSciIO's TIFF reader, where it is installed:
    its x axis' scale where both image axes are in length units; else ``(None, None)``."""
    st = path.stat()
    ps, unit = _rsciio_tiff_scale(str(path), st.st_size, st.st_mtime_ns)
    if ps is not None:
        meta["calibration_from"] = "RosettaSciIO's TIFF reader"
    return ps, unit


@functools.lru_cache(maxsize=64)
def _rsciio_tiff_scale(path: str, size: int, mtime_ns: int) -> tuple[float | None, str | None]:
    """:func:`_tiff_calibration_rsciio`'s reading, once per file version (a series is read frame by
    frame: ``size`` and ``mtime_ns`` key the cache)."""
    try:
        from rsciio.tiff import file_reader
    except ImportError:
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signal = file_reader(path, lazy=True)[0]
    except Exception:  # noqa: BLE001 - its reader failing leaves the file uncalibrated, as without it
        return None, None
    axes = sorted(signal.get("axes") or [], key=lambda a: int(a.get("index_in_array", 0)))[-2:]
    if len(axes) < 2 or any(unit_to_nm(a.get("units")) is None for a in axes):
        return None, None
    return float(axes[-1].get("scale")), str(axes[-1].get("units"))


def _decode_ij_unit(unit: str) -> str:
    if "\\u" in unit:
        try:
            return unit.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except (UnicodeError, ValueError):
            return unit
    return unit


#: Pillow modes read as they are (grey levels: 8, 16 or 32 bits); colour and palette modes become RGB,
#: then grey (:func:`_prepare`)
_GREY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")
#: Pillow's pixel limit is one global: lifted for one Image.open at a time
_PIL_LIMIT_LOCK = threading.Lock()


def picture_note(meta: Mapping) -> str:
    """What an exported picture (the ``meta`` :func:`read` gives it: ``format``, ``picture_mode``,
    ``lossy``) is not, in words -- the warning on reading it and the note in its summary."""
    fmt = str(meta.get("format", "picture")).upper()
    mode = f" ({meta['picture_mode']})" if meta.get("picture_mode") else ""
    return (f"an exported {fmt} picture{mode}: display grey levels, not the detector's counts, and no pixel "
            "calibration; read the original data (DM3/DM4, EMD, SER, the instrument's TIFF) where you can"
            + ("; JPEG's lossy compression (8 x 8 px blocks) changes column intensities and can make or hide "
               "defects" if meta.get("lossy") else ""))


def _read_picture(path: Path, frames: Any):
    """An exported picture (:data:`PICTURE_EXTENSIONS`): its first frame, grey or colour (made grey by
    :func:`_prepare`), with a :class:`ReadWarning` that it holds display grey levels and no calibration
    (and, for JPEG, lossy compression)."""
    # Pillow refuses a picture of over 179 M pixels as a "decompression bomb" (and warns over 89 M): a
    # 16k x 16k micrograph's export is one. What it may take is this reader's own memory check instead.
    im = _pillow_open(path)
    with im:
        fmt, mode = im.format or path.suffix[1:].upper(), im.mode
        if mode == "1":
            raise ReadError(path, "a 1-bit (black and white) picture holds no intensities")
        w, h = im.size
        grey = mode in _GREY_MODES or mode == "LA"
        item = np.float32 if mode in ("I", "F") else np.uint16 if mode.startswith("I;16") else np.uint8
        _check_memory(path, (h, w) if grey else (h, w, 3), item)
        if mode == "LA":
            im = im.getchannel("L")
        elif mode not in _GREY_MODES:
            im = im.convert("RGB")
        data = np.asarray(im)
    meta = {"format": fmt.lower(), "picture_mode": mode, "exported_picture": True}
    if fmt.upper() in ("JPEG", "MPO") or path.suffix.lower() in (".jpg", ".jpeg"):
        meta["lossy"] = True
    msg = f"{path}: {picture_note(meta)}"
    warnings.warn(msg, ReadWarning, stacklevel=4)
    log.info("%s", msg)
    return _select_frames(path, data, frames), None, None, meta


def _read_npy(path: Path, frames: Any):
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ReadError(path, f"not a valid .npy file or truncated ({exc})") from exc
    if not isinstance(data, np.ndarray):
        raise ReadError(path, "not a .npy array")
    return _select_frames(path, data, frames), None, None, {"format": "npy"}


def _read_npz(path: Path, frames: Any):
    import zipfile

    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ReadError(path, f"not a valid .npz file or truncated ({exc})") from exc
    with z:
        names = list(z.files)
        if not names:
            raise ReadError(path, "the .npz archive holds no arrays")
        key = next((k for k in ("image", "data") if k in names), None)
        if key is None:
            key = next((k for k in names if z[k].ndim >= 2), names[0])
        data = z[key]
        meta: dict[str, Any] = {"format": "npz", "array": key, "arrays": names}
        ps = unit = None
        for k in ("pixel_size", "pixel_size_nm", "pixel_size_A"):
            if k in names and z[k].size == 1:
                ps = float(z[k])
                unit = {"pixel_size_nm": "nm", "pixel_size_A": "A"}.get(k)
                break
        if "unit" in names:
            unit = str(z["unit"])
        if ps is not None and unit is None:
            unit = "nm"
        if "meta" in names and z["meta"].dtype.kind in "US":
            try:
                meta["meta"] = json.loads(str(z["meta"]))
            except ValueError:
                pass
    return _select_frames(path, data, frames), ps, unit, meta


def _read_ndata(path: Path, frames: Any):
    """A Nion Swift ``.ndata`` data item (:mod:`stemfast.nion`)."""
    import zipfile

    from . import nion

    try:
        data, props = nion.read_ndata(path)
    except zipfile.BadZipFile as exc:
        raise ReadError(path, f"not a valid .ndata file: not a zip archive ({exc})") from exc
    except ValueError as exc:
        raise ReadError(path, str(exc)) from exc
    meta: dict[str, Any] = {"format": "ndata"}
    ps, unit = _nion_image(path, props, data.ndim, meta)
    if not isinstance(data, np.memmap):
        _check_memory(path, data.shape, data.dtype)
    return _select_frames(path, data, frames), ps, unit, meta


def _nion_image(path: Path, props: dict, ndim: int, meta: dict) -> tuple[float | None, str | None]:
    """Check a Nion Swift data item is an image or a series of images (a :class:`ReadError` says what
    else it is) and return its calibration; its title and properties go to ``meta``."""
    from . import nion

    why = nion.not_an_image(props, ndim)
    if why is not None:
        raise ReadError(path, f"a Nion Swift data item: {why}")
    meta.update({"reader": "nion", "title": nion.title(props), "nion": props})
    ps, unit, ps_y = nion.image_calibration(props)
    if ps is not None:
        _note_pixel_size_y(path, meta, ps, ps_y, unit)
    return ps, unit


def _read_hdf5(path: Path, frames: Any, dataset: str | None):
    from . import nion

    try:
        import h5py
    except ImportError as exc:
        raise ReadError(path, "reading .h5/.hdf5 files needs h5py: install stemfast[io] "
                              "(pip install 'stemfast[io]') or h5py") from exc
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ReadError(path, f"not a valid HDF5 file or truncated ({exc})") from exc
    with f:
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ReadError(path, f"no dataset {dataset!r} in the file")
            ds = f[dataset]
        else:
            found: list = []

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and not found and _image_like(obj.shape, obj.dtype):
                    found.append(name)

            f.visititems(visit)
            if not found:
                raise ReadError(path, "no 2-D or 3-D numeric dataset in the file")
            ds = f[found[0]]
        meta: dict[str, Any] = {"format": "hdf5", "dataset": ds.name,
                                "attrs": {k: _attr(v) for k, v in ds.attrs.items()}}
        ps = unit = None
        for holder in (ds, ds.parent, f):
            for k in ("pixel_size", "pixel_size_nm", "pixel_size_A"):
                if k in holder.attrs:
                    ps = _attr(holder.attrs[k])
                    if isinstance(ps, list):
                        ps = ps[-1]
                    unit = {"pixel_size_nm": "nm", "pixel_size_A": "A"}.get(k)
                    u = holder.attrs.get("unit", holder.attrs.get("units"))
                    if u is not None:
                        u = _attr(u)
                        unit = u[-1] if isinstance(u, list) else u
                    break
            if ps is not None:
                break
        if ps is not None and unit is None:
            unit = "nm"
        if ps is None and (props := nion.h5_properties(ds)) is not None:  # a Nion Swift data item
            ps, unit = _nion_image(path, props, ds.ndim, meta)
        if frames is not None and ds.ndim == 3 and min(ds.shape) > 1:
            idx = _frame_index(path, frames, ds.shape[0])  # read only the selected frames
            if isinstance(idx, np.ndarray):
                data = np.stack([ds[int(i)] for i in idx])
            else:
                data = ds[idx]
        else:
            _check_memory(path, ds.shape, ds.dtype)
            data = _select_frames(path, ds[()], frames)
    return data, ps, unit, meta


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()] if v.size <= 64 else f"<array {v.shape} {v.dtype}>"
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_mrc(path: Path, frames: Any):
    try:
        import mrcfile
    except ImportError:
        return _read_rsciio(path, frames)
    try:
        m = mrcfile.mmap(path, mode="r", permissive=True)
    except (ValueError, OSError) as exc:
        raise ReadError(path, f"not a valid MRC file ({exc})") from exc
    with m:
        if m.data is None:
            raise ReadError(path, "not a valid MRC file (no data block; truncated or corrupt)")
        vs = m.voxel_size
        ps = float(vs.x) if float(vs.x) > 0 else None
        meta = {"format": "mrc", "reader": "mrcfile",
                "voxel_size_A": [float(vs.x), float(vs.y), float(vs.z)]}
        sel = _select_frames(path, m.data, frames)
        _check_memory(path, sel.shape, sel.dtype)
        data = np.array(sel)
    return data, ps, ("A" if ps else None), meta


#: keys of a sidecar JSON read for the pixel size (a number, with a length unit under one of
#: :data:`_SIDECAR_UNIT_KEYS`; ``pixel_size_nm`` in nm), else the field of view along x over the image's width
_SIDECAR_PIXEL_KEYS = ("pixel_size", "pixel_size_nm", "pixelsize", "pixel_spacing")
_SIDECAR_UNIT_KEYS = ("unit", "units", "pixel_size_unit", "pixel_size_units", "pixel_unit")
_SIDECAR_FOV_KEYS = ("field_of_view_x", "fov_x", "field_of_view")
_SIDECAR_FOV_UNIT_KEYS = ("field_of_view_units", "field_of_view_unit", "fov_units", "fov_unit")
#: keys of a sidecar JSON whose text may name the material (``"1% V-doped MoS2 monolayer"``)
_SIDECAR_MATERIAL_KEYS = ("material", "material_type", "sample", "specimen", "sample_name")


def sidecar(path: str | os.PathLike, width: int) -> dict:
    """What a JSON file of the same name beside ``path`` (``x.npy`` -> ``x.json``: authors' metadata for
    arrays without any) says of the image, ``width`` px wide: ``{"file", "pixel_size", "unit", "from",
    "material", "material_text"}`` as found (a pixel size from a ``pixel_size`` key and its unit, else
    from ``field_of_view_x`` and its unit over the width; the material a known formula -- MoS2, WS2,
    MoSe2, WSe2 -- in a ``material`` / ``material_type`` / ``sample`` text); {} without one, or where it
    is no JSON object (``{"file", "error"}``). :func:`read` takes its pixel size where the file has none.

    Examples
    --------
    >>> import tempfile, json, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.json").write_text(json.dumps({"material_type": "1% V-doped MoS2 monolayer",
    ...     "experimental_details": {"spatial_info": {"field_of_view_x": 9.0, "field_of_view_units": "nm"}}}))
    >>> s = sidecar(d / "a.npy", 512)
    >>> round(s["pixel_size"], 6), s["unit"], s["from"], s["material"]
    (0.017578, 'nm', 'field_of_view_x 9 nm / 512 px', 'mos2')
    """
    p = Path(path).with_suffix(".json")
    if not p.is_file() or p == Path(path):
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return {"file": p.name, "error": f"not read: {exc}"}
    if not isinstance(doc, Mapping):
        return {"file": p.name, "error": "not a JSON object"}
    flat: dict = {}
    for k, v in _flat_items(doc):
        flat.setdefault(k, v)
    out: dict[str, Any] = {"file": p.name}
    ps = next(((k, flat[k]) for k in _SIDECAR_PIXEL_KEYS if _positive(flat.get(k))), None)
    if ps is not None:
        unit = "nm" if ps[0] == "pixel_size_nm" else next((str(flat[k]) for k in _SIDECAR_UNIT_KEYS if k in flat), None)
        out.update(pixel_size=float(ps[1]), unit=unit, **{"from": f"{ps[0]} {ps[1]:g} {unit}"})
    else:
        fov = next(((k, flat[k]) for k in _SIDECAR_FOV_KEYS if _positive(flat.get(k))), None)
        unit = next((str(flat[k]) for k in _SIDECAR_FOV_UNIT_KEYS if k in flat), None)
        if fov is not None and unit is not None and width > 0:
            out.update(pixel_size=float(fov[1]) / width, unit=unit,
                       **{"from": f"{fov[0]} {fov[1]:g} {unit} / {width} px"})
    text = next((str(flat[k]) for k in _SIDECAR_MATERIAL_KEYS if isinstance(flat.get(k), str)), None)
    if text is not None:
        out["material_text"] = text[:200]
        hit = re.search(r"(?<![A-Za-z])(MoSe2|WSe2|MoS2|WS2)(?![a-z])", text, flags=re.IGNORECASE)
        if hit:
            out["material"] = hit.group(1).lower()
    return out


def _flat_items(d: Mapping, depth: int = 0):
    """``(key, value)`` of a nested mapping's leaves, depth first (the first of a repeated key wins)."""
    for k, v in d.items():
        if isinstance(v, Mapping) and depth < 8:
            yield from _flat_items(v, depth + 1)
        else:
            yield str(k).lower(), v


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def pick_signal(titles: Sequence[str], signal: str | None = None,
                sizes: Sequence[int] | None = None) -> int | None:
    """Index of the image :func:`read` gives of a file holding the images ``titles``: the one titled
    ``signal`` (any case; None where there is none; the largest of several), or by default the one titled "HAADF", else one
    whose title holds "haadf" (a Velox file's processed "DCFI(HAADF)" after its own HAADF), else one of
    another dark-field detector (:data:`stemfast.detectors.DETECTOR_NAMES`, in its order: a Spectra's
    "DF-S" before the EDS maps of its spectrum image), else any; of several alike, the largest
    (``sizes``, pixels), then the first (a Velox file's images come in no set order).

    >>> pick_signal(["BF", "HAADF", "DF4"]), pick_signal(["BF", "HAADF", "DF4"], "df4"), pick_signal(["BF"], "DF2")
    (1, 2, None)
    >>> pick_signal(["DCFI(HAADF)", "HAADF"]), pick_signal(["DF2", "DCFI(HAADF)"])
    (1, 1)
    >>> pick_signal(["UltraX", "DF-S", "DF-S"], sizes=[320, 320, 16384])
    2
    """
    from .detectors import DETECTOR_NAMES, detector_key

    size = list(sizes) if sizes is not None else [0] * len(titles)
    if signal is not None:
        named = [i for i, t in enumerate(titles) if t.lower() == signal.lower()]
        return min(named, key=lambda i: (-size[i], i)) if named else None
    if not titles:
        return 0

    def rank(t: str) -> tuple[int, int]:
        low, key = t.lower(), detector_key(t)
        order = DETECTOR_NAMES.index(key) if key in DETECTOR_NAMES else len(DETECTOR_NAMES)
        return (0 if low == "haadf" else 1 if "haadf" in low else 2 if order < len(DETECTOR_NAMES) else 3), order

    return min(range(len(titles)), key=lambda i: (*rank(titles[i]), -size[i], i))


def signal_titles(path: str | os.PathLike) -> list[str]:
    """The titles of the 2-D images and 3-D stacks in a file of a format that can hold several
    (EMD, DM3/DM4, SER/EMI; :func:`read`'s ``dataset``), read lazily; [] for any other format or a file
    the reader cannot open."""
    p = Path(path)
    if p.suffix.lower() not in _SIGNAL_FORMATS:
        return []
    try:
        signals = _rsciio_signals(p)
    except Exception:  # noqa: BLE001 - not readable here: read() says why when the file is read
        return []
    return [_signal_title(s) for s in signals if _is_image(s)]


def _is_image(signal: Mapping) -> bool:
    """Whether a RosettaSciIO signal is a 2-D image or a 3-D stack of images of at least :data:`MIN_SIDE` px:
    real-valued (not an FFT or a DPC vector field), its last two axes not navigation axes (a line of
    spectra, [positions, channels], or a spectrum image is not an image)."""
    if not _image_like(np.shape(signal["data"]), getattr(signal["data"], "dtype", np.float32)):
        return False
    axes = sorted(signal.get("axes") or [], key=lambda a: int(a.get("index_in_array", 0)))
    return not any(a.get("navigate") is True for a in axes[-2:])


def _image_like(shape: Sequence[int], dtype) -> bool:
    """Whether an array of ``shape`` and ``dtype`` can be a 2-D image or a 3-D stack of images: real
    numbers, two or three axes longer than 1, the image sides at least :data:`MIN_SIDE` px."""
    core = [x for x in (int(v) for v in shape) if x != 1]
    return np.dtype(dtype).kind in "biuf" and len(core) in (2, 3) and min(core[-2:]) >= MIN_SIDE


def _signal_title(signal: Mapping) -> str:
    return str(((signal.get("metadata") or {}).get("General") or {}).get("title", ""))


def _rsciio_signals(path: Path) -> list:
    """The signals of a file RosettaSciIO reads (lazily where its reader can); a :class:`ReadError` when
    RosettaSciIO is not installed."""
    import importlib

    ext = path.suffix.lower()
    try:
        importlib.import_module("rsciio")
    except ImportError as exc:
        extra = " or mrcfile" if ext == ".mrc" else ""
        raise ReadError(path, f"reading {ext} files needs RosettaSciIO{extra}: install "
                              f"stemfast[io] (pip install 'stemfast[io]')") from exc
    plugin = importlib.import_module(_RSCIIO_PLUGIN[ext])
    try:
        try:
            return plugin.file_reader(str(path), lazy=True)
        except (TypeError, ValueError):  # no lazy reading in this reader, or not of this file's layout (an
            return plugin.file_reader(str(path))  # EMD dataset stored unchunked): read it whole
    except Exception as exc:
        return _velox_images(path, exc)


def _velox_images(path: Path, exc: Exception) -> list:
    """A Velox EMD's images read directly (:mod:`stemfast.velox`) where RosettaSciIO failed on the file
    (``exc``: a spectrum-image acquisition needs ``sparse`` even for its images); ``exc`` again for any
    other file, or where the direct read fails too."""
    from . import velox

    if path.suffix.lower() != ".emd" or not velox.is_velox(path):
        raise exc
    try:
        signals = velox.image_signals(path)
    except Exception:  # noqa: BLE001 - neither reader can: RosettaSciIO's reason is the one to give
        raise exc from None
    log.info("%s: images read directly from the Velox layout (RosettaSciIO: %s: %s)", path, type(exc).__name__, exc)
    for sig in signals:
        sig["metadata"]["stemfast_reader"] = "velox (h5py)"
    return signals


def _read_rsciio(path: Path, frames: Any, signal: str | None = None):
    signals = _rsciio_signals(path)
    ext = path.suffix.lower()
    images = [s for s in signals if _is_image(s)]
    if not images:
        shapes = [tuple(np.shape(s["data"])) for s in signals]
        raise ReadError(path, f"no 2-D image or 3-D image stack in the file (signals: {shapes})")
    title = _signal_title
    k = pick_signal([title(s) for s in images], signal, [int(np.prod(np.shape(s["data"])[-2:])) for s in images])
    if k is None:
        raise ReadError(path, f"no image titled {signal!r} in the file (images: {[title(s) for s in images]})")
    sig = images[k]
    axes = sorted(sig.get("axes") or [], key=lambda a: int(a.get("index_in_array", 0)))
    ps = unit = None
    if len(axes) >= 2:
        ax_x = axes[-1]
        ps, unit = ax_x.get("scale"), ax_x.get("units")
        if unit in (None, "") or str(unit).strip().lower() in _NO_UNIT:
            ps = unit = None
    meta = {"format": ext[1:], "reader": (sig.get("metadata") or {}).get("stemfast_reader", "rsciio"), "title": title(sig),
            "axes": [{k: _attr(v) for k, v in a.items()} for a in axes],
            "signals": [title(s) for s in signals],
            "images": [title(s) for s in images],
            "metadata": sig.get("metadata") or {},
            "original_metadata": sig.get("original_metadata") or {}}
    data = _select_frames(path, sig["data"], frames)
    return np.asarray(data), ps, unit, meta


# ---------------------------------------------------------------------------------------------
# metadata sanitising
# ---------------------------------------------------------------------------------------------
def _jsonable(obj: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy (numpy scalars -> Python, small arrays -> lists, else str)."""
    if depth > 12:
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), depth + 1)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, np.ndarray):
        if obj.size <= 256 and obj.dtype.kind in "biuf":
            return _jsonable(obj.tolist(), depth + 1)
        return f"<array shape={list(obj.shape)} dtype={obj.dtype}>"
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v, depth + 1) for v in obj]
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return str(obj)
