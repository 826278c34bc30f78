"""Reading micrographs (single images and time series) with their pixel calibration.

:func:`read` opens TIFF (tifffile), NumPy ``.npy`` / ``.npz``, Nion Swift ``.ndata`` data items
(with their calibration: :mod:`stemfast.nion`) and, through the optional extra ``stemfast[io]``
(RosettaSciIO, h5py, mrcfile), HDF5 (h5py; Nion's ``.h5`` data items too), Gatan ``.dm3`` / ``.dm4``,
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

The readers live in modules of their own, below this one: :mod:`stemfast.tiff` (TIFF, and a TIFF's
channels), :mod:`stemfast.signals` (what RosettaSciIO reads: DM3/DM4, EMD, SER/EMI, HSPY; the choice of a
signal by title), :mod:`stemfast.pictures` (exported pictures, Pillow), :mod:`stemfast.sidecar` (the JSON
file beside an array) and :mod:`stemfast.readbase` (what they share: :class:`ReadError`, the unit table,
the memory check, the ``frames=`` selection). This module keeps the public entry points, the checks and
float32 conversion every reader's data goes through (:func:`_prepare`), the small formats (``.npy``,
``.npz``, HDF5, ``.ndata``, ``.mrc``) and the folder listing, and re-exports the public names of the others.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .pictures import _read_picture, picture_note  # noqa: F401  (re-exported: stemfast.io.picture_note)
from .readbase import (  # noqa: F401  (re-exported: stemfast.io.PLAUSIBLE_PIXEL_NM, available_memory_bytes)
    MIN_SIDE,
    PLAUSIBLE_PIXEL_NM,
    ReadError,
    ReadWarning,
    _attr,
    _calibration_dropped,
    _channels_last,
    _check_memory,
    _check_whole_stack,
    _checked_calibration,
    _frame_index,
    _image_like,
    _is_rgb_shape,
    _missing_package,
    _narrow_frames,
    _normalise_calibration,
    _note_pixel_size_y,
    _npy_header,
    _plausible_calibration,
    _release_pages,
    _select_frames,
    available_memory_bytes,
    channels_last_error,
    narrow_frames_note,
    unit_not_a_length,
    unit_to_nm,
)
from .sidecar import sidecar
from .signals import _SIGNAL_FORMATS, _is_image, _read_rsciio, pick_signal, signal_titles  # noqa: F401  (re-exported)
from .tiff import _read_tiff, tiff_channel_info, tiff_channels

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
    "unit_not_a_length",
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


@dataclass(frozen=True, eq=False)
class Micrograph:
    """A micrograph: a 2-D image or a time series of frames, with its calibration.

    Attributes
    ----------
    data : float32 ``[H, W]`` image or ``[frames, H, W]`` stack; an uncompressed stack in the machine's
        byte order is the file's read-only memory map, in the file's number type (a detector's
        ``uint16`` stays ``uint16``, half the memory of float32): take its frames with :meth:`frame` /
        :meth:`frames`, which give float32 one frame at a time.
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
         max_nonfinite_fraction: float = 1.0, rescale: dict | bool | None = None) -> Micrograph:
    """Read a micrograph file.

    Parameters
    ----------
    path : file; the reader is chosen by the extension (case-insensitive), see
        :data:`SUPPORTED_EXTENSIONS`.
    frames : for stacks, the frames to read: an index (gives a 2-D micrograph), a slice or a
        sequence of indices. ``None`` reads all. Booleans (``True``, a mask) and text are refused with a
        :class:`ReadError`: for a mask pass ``numpy.flatnonzero(mask)``.
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
    rescale : how values float32 cannot carry safely are rescaled (see Notes): None decides from the
        values read; ``False`` never rescales; a mapping with ``offset`` and ``scale`` (a file's
        ``metadata["rescaled"]``) rescales to ``(x - offset) / scale``. Reading some frames of a stack
        (``frames=``) in the units of the whole stack: pass the whole stack's ``metadata.get("rescaled")
        or False`` (decided from the frames read, each chunk of a stack would have units of its own).

    Returns
    -------
    :class:`Micrograph` with float32 data, except an uncompressed stack (``.npy``, TIFF, ``.ndata``) of
    any integer or float type in the machine's byte order: the file's read-only memory map in its own
    type, whose frames :meth:`Micrograph.frame` gives as float32 one at a time (the memory check then
    charges one frame, not the stack).

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
    array) and are read as frames, with a :class:`ReadWarning`; integer data become float32 (a
    memory-mapped stack's frame by frame).
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
    data = _prepare(p, data, meta, allow_nonfinite=allow_nonfinite, max_nonfinite_fraction=max_nonfinite_fraction,
                    read_frames=frames, rescale=rescale)
    pixel_size, unit = _checked_calibration(p, pixel_size, unit, meta)
    side = sidecar(p, data.shape[-1])
    if side:
        meta["sidecar"] = side
        if pixel_size is None and side.get("pixel_size"):  # the file's own calibration comes first
            pixel_size, unit = _checked_calibration(p.parent / side["file"], side["pixel_size"], side["unit"], side)
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
# validation
# ---------------------------------------------------------------------------------------------
def _prepare(path: Path, data: Any, meta: dict, *, allow_nonfinite: bool,
             max_nonfinite_fraction: float = 1.0, read_frames: Any = None,
             rescale: dict | bool | None = None) -> np.ndarray:
    """Shape/dtype/value checks and the float32 conversion shared by all readers (``read_frames``: the
    frames read, :func:`read`'s ``frames``, for the frame numbers of the messages; ``rescale``:
    :func:`read`'s)."""
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
    if _channels_last(data.shape):
        raise channels_last_error(path, src)
    if _narrow_frames(data.shape):
        meta["narrow_frames"] = [int(v) for v in data.shape]
        warnings.warn(f"{path}: {narrow_frames_note(data.shape)}", ReadWarning, stacklevel=3)
    h, w = data.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ReadError(path, f"image too small ({h} x {w} px; at least {MIN_SIDE} px a side)")
    keep_map = _streamable(data, rescale)
    _check_memory(path, data.shape, data.dtype, lazy_frames=keep_map)
    if data.dtype.kind in "iuf" and rescale is not False and not (keep_map and _is_float32(data.dtype)):
        data = _safe_range(path, data, meta) if rescale is None else _rescaled(path, data, meta, rescale)
        keep_map = keep_map and isinstance(data, np.memmap)  # rescaled: an in-memory float32 copy
    if keep_map:
        bad = _count_nonfinite_frames(data)
    elif isinstance(data, np.memmap) or not data.flags.owndata or not data.flags.writeable:
        data = np.array(data, dtype=np.float32, order="C")  # into memory, never alias a file
        bad = int(np.count_nonzero(~np.isfinite(data)))
    else:
        data = np.ascontiguousarray(data, dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        data = _fill_nonfinite(path, data, meta, bad, allow_nonfinite, max_nonfinite_fraction,
                               read_frames=read_frames)
    return data


def _streamable(data: Any, rescale: dict | bool | None) -> bool:
    """Whether ``data`` is kept as the file's read-only memory map and converted to float32 one frame at a
    time (:meth:`Micrograph.frame`): a stack of any integer or float type, of either byte order (a
    big-endian TIFF or .npy is swapped frame by frame as it is converted), mapped, not read with a
    rescale mapping (that rescales the whole of it in memory)."""
    return (isinstance(data, np.memmap) and data.ndim == 3 and data.dtype.kind in "iuf"
            and (rescale is None or rescale is False))


def _is_float32(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is float32 in either byte order (its values need no range check)."""
    return np.dtype(dtype).newbyteorder("=") == np.float32


def _count_nonfinite_frames(data: np.memmap) -> int:
    """NaN / infinite values of a memory-mapped stack as float32 holds them (a float64 value beyond
    float32's range is one), counted frame by frame, each frame's pages released after it; none for
    integers (float32 holds every integer type's range), whose file is not read."""
    if data.dtype.kind != "f":
        return 0
    bad = 0
    for i in range(data.shape[0]):
        bad += int(np.count_nonzero(~np.isfinite(np.asarray(data[i], dtype=np.float32))))
        _release_pages(data)
    return bad


#: float32 carries an image safely when its values stay within this magnitude ...
_SAFE_MAX = 1e9
#: ... its range is at least this ...
_SAFE_MIN_RANGE = 1e-6
#: ... and its offset is at most this many times its range (float32 keeps 24 bits).
_SAFE_OFFSET = 4096.0


def _finite_min_max(data: np.ndarray) -> tuple[float, float] | None:
    """Smallest and largest finite value (float64), frame by frame in row blocks (a memory map's pages
    dropped after each); None if none."""
    lo, hi = math.inf, -math.inf
    step = max(1, (1 << 22) // max(1, data.shape[-1]))
    for fr in (data if data.ndim == 3 else [data]):
        for a in range(0, fr.shape[0], step):
            b = np.asarray(fr[a:a + step])
            if b.dtype.kind == "f":
                b = b[np.isfinite(b)]
            if b.size:
                lo = min(lo, float(np.min(b)))
                hi = max(hi, float(np.max(b)))
            if isinstance(data, np.memmap):
                _release_pages(data)
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
    msg = (f"{path}: pixel values from {lo:.6g} to {hi:.6g} do not fit float32 safely; rescaled to "
           "(x - min) / (max - min) in float64")
    if isinstance(data, np.memmap):  # (a stack read one frame at a time was checked for one frame)
        _check_memory(path, data.shape, data.dtype)
    warnings.warn(msg, ReadWarning, stacklevel=4)
    log.info("%s", msg)
    return _rescaled(path, data, meta, {"offset": lo, "scale": rng})


def _rescaled(path: Path, data: np.ndarray, meta: dict, rescale) -> np.ndarray:
    """``data`` as float32 ``(x - offset) / scale``, computed in float64 (``rescale``: a mapping with
    ``offset`` and ``scale``, :func:`read`'s), in row blocks; recorded in ``meta["rescaled"]``."""
    try:
        lo, rng = float(rescale["offset"]), float(rescale["scale"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"rescale must be None, False or a mapping with offset and scale, got {rescale!r}") from None
    if not (math.isfinite(lo) and math.isfinite(rng) and rng > 0):
        raise ValueError(f"rescale needs a finite offset and a finite scale > 0, got {rescale!r}")
    out = np.empty(data.shape, dtype=np.float32)
    flat_in = data.reshape(-1, data.shape[-1])
    flat_out = out.reshape(-1, data.shape[-1])
    step = max(1, (1 << 22) // max(1, data.shape[-1]))
    scale = 1.0 / rng
    for a in range(0, flat_in.shape[0], step):
        flat_out[a:a + step] = (np.asarray(flat_in[a:a + step], dtype=np.float64) - lo) * scale
    log.debug("%s: rescaled to (x - %r) / %r", path, lo, rng)
    meta["rescaled"] = {"offset": lo, "scale": rng, "note": "data = (source - offset) / scale"}
    return out


def _fill_nonfinite(path: Path, data: np.ndarray, meta: dict, bad: int, allow_nonfinite: bool,
                    max_nonfinite_fraction: float, *, read_frames: Any = None) -> np.ndarray:
    """``data`` (``bad`` of its values NaN or infinite) with them replaced by the frame median, or a
    ReadError: when all are; without ``allow_nonfinite``, when any of them is a scattered one (outside
    a region without data, :func:`stemfast.nodata.regions_of`: an aligned frame's NaN padding, which
    is filled either way); with it, when more than ``max_nonfinite_fraction`` of a frame's pixels are
    scattered ones (the whole read fails: the message names the frame by its number in the file,
    ``read_frames`` being :func:`read`'s ``frames``, :func:`_frame_number`). Records ``meta["nonfinite_replaced"]`` (and
    ``meta["nonfinite_in_regions"]`` when all of them formed regions without data)."""
    from .nodata import regions_of

    n = int(np.prod(data.shape))
    if bad == n:
        raise ReadError(path, "all values are NaN or infinite")
    frames = data if data.ndim == 3 else data[None]
    # per frame, how many of its non-finite pixels form regions without data (the regions lie within them)
    margins = []
    for fr in frames:
        margins.append(int(regions_of(~np.isfinite(np.asarray(fr, dtype=np.float32))).sum()))  # as float32 holds it
        if isinstance(data, np.memmap):  # its pages dropped after each frame, as _prepare's count does
            _release_pages(data)
    margin = sum(margins)
    if not allow_nonfinite and margin < bad:  # scattered ones: filling them invents pixels, the user says so
        why = (f"; {margin} of them form regions without data (an aligned frame's padding?), where no site "
               "is placed once they are filled" if margin else "")
        raise ReadError(path, f"{bad} of {n} values are NaN or infinite (--fill-nonfinite, or "
                              f"read(..., allow_nonfinite=True), replaces them by the frame median{why})")
    # (all of them regions without data -- an aligned or drift-corrected frame's NaN padding -- are
    # filled whatever the option: one value there is a region without data, where no site is placed)
    if isinstance(data, np.memmap):  # the memory was checked for one frame at a time: the fill copies them all
        _check_fill_memory(path, data, bad)
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
            where = _frame_number(read_frames, i, data.ndim == 3)
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


def _check_fill_memory(path: Path, data: np.ndarray, bad: int) -> None:
    """A :class:`ReadError` saying why where a memory-mapped stack (whose memory was checked for one frame
    at a time) would not fit in memory as the whole float32 copy its ``bad`` non-finite values are filled
    in."""
    try:
        _check_memory(path, data.shape, data.dtype)
    except ReadError as exc:
        raise ReadError(path, f"its {bad} NaN or infinite values are filled in a copy of the whole stack in "
                              f"memory, not one frame at a time as a stack without them is read: {exc.reason}; "
                              "or read fewer frames (frames=)") from None


def _frame_number(frames: Any, i: int, stack: bool) -> str:
    """``"frame N: "`` for the ``i``-th frame read with :func:`read`'s ``frames`` (``stack``: the data read
    are a stack), ``N`` its number in the file; where that needs the file's length (a negative index) the
    frame is named by its place among those read.

    Examples
    --------
    >>> _frame_number(slice(2, 4), 1, True), _frame_number([7, 3], 1, True), _frame_number(5, 0, False)
    ('frame 3: ', 'frame 3: ', 'frame 5: ')
    """
    if isinstance(frames, (int, np.integer)):
        return f"frame {int(frames)}: " if frames >= 0 else f"frame {int(frames)} (from the end): "
    if not stack:
        return ""
    if frames is None:
        return f"frame {i}: "
    if isinstance(frames, slice):
        start, step = frames.start or 0, frames.step or 1
        if start >= 0 and step > 0:
            return f"frame {start + i * step}: "
    else:
        n = int(np.asarray(list(frames), dtype=np.int64)[i])
        if n >= 0:
            return f"frame {n}: "
    return f"frame {i} of the frames read (frames={frames!r}): "


# ---------------------------------------------------------------------------------------------
# readers: each returns (array-like, pixel_size, unit, metadata)
# ---------------------------------------------------------------------------------------------
def _read_npy(path: Path, frames: Any):
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":  # numpy's own message would suggest unpickling it
            raise ReadError(path, "not a .npy file (no NumPy array header)")
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
        heads = {k: _npz_header(z, k) for k in names}  # (shape, dtype) of each, none of them decompressed
        key = next((k for k in ("image", "data") if k in names), None)
        if key is None:
            key = next((k for k in names if heads[k] is not None and len(heads[k][0]) >= 2), names[0])
        if heads[key] is not None:  # the whole array is decompressed, whatever frames= then takes of it
            _check_memory(path, *heads[key])
        data = z[key]
        meta: dict[str, Any] = {"format": "npz", "array": key, "arrays": names}
        ps, unit = _npz_calibration(path, z, heads, meta)
        if "meta" in names and heads["meta"] is not None and heads["meta"][1].kind in "US":
            try:
                meta["meta"] = json.loads(str(z["meta"]))
            except ValueError:
                pass
    return _select_frames(path, data, frames), ps, unit, meta


def _npz_header(z, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of the array ``name`` of the open ``.npz`` ``z`` from its header, the array not
    decompressed; None for an entry that is no ``.npy`` array."""
    member = name + ".npy" if name + ".npy" in z.zip.namelist() else name
    with z.zip.open(member) as f:
        head = _npy_header(f)
    return None if head is None else (tuple(head[0]), head[2])


def _npz_calibration(path: Path, z, heads: dict, meta: dict) -> tuple[float | None, str | None]:
    """``(pixel_size, unit)`` of an open ``.npz`` from its entries ``pixel_size`` (``pixel_size_nm``,
    ``pixel_size_A``) and ``unit`` (nm without one), each one value: a number or a 1-element array, text or
    bytes. One that is not (several values, no number) calibrates nothing, and is said
    (:func:`_calibration_dropped`)."""
    keys = [k for k in ("pixel_size", "pixel_size_nm", "pixel_size_A") if heads.get(k) is not None]
    k = next((k for k in keys if math.prod(heads[k][0]) == 1), keys[0] if keys else None)
    if k is None:
        return None, None
    value = _npz_scalar(z, heads, k)
    try:
        ps = float(value)
    except (TypeError, ValueError):
        _calibration_dropped(path, meta, f"its {k} entry, {_npz_shown(z, heads, k)}, is not one number")
        return None, None
    unit = {"pixel_size_nm": "nm", "pixel_size_A": "A"}.get(k, "nm")
    if "unit" in heads:
        unit = _npz_scalar(z, heads, "unit")
        if unit is None:
            _calibration_dropped(path, meta, f"its unit entry, {_npz_shown(z, heads, 'unit')}, is not one unit")
            return None, None
    return ps, str(unit)


def _npz_scalar(z, heads: dict, name: str) -> Any:
    """The one value of the entry ``name`` of an open ``.npz`` (a 0-d or 1-element array; bytes decoded),
    None for an entry of another size or no array."""
    if heads.get(name) is None or math.prod(heads[name][0]) != 1 or heads[name][1].kind not in "biufUS":
        return None
    return _attr(z[name].reshape(-1)[0])


def _npz_shown(z, heads: dict, name: str) -> str:
    """An ``.npz`` entry as a message shows it: its value where small, else its shape and type."""
    head = heads.get(name)
    if head is not None and math.prod(head[0]) <= 8:
        return repr(_attr(z[name]))
    return "no array" if head is None else f"an array of shape {head[0]} ({head[1]})"


def _read_ndata(path: Path, frames: Any):
    """A Nion Swift ``.ndata`` data item (:mod:`stemfast.nion`)."""
    import zipfile

    from . import nion

    try:  # a compressed data.npy: its memory checked from its header, before it is decompressed
        data, props = nion.read_ndata(path, before_load=lambda shape, dtype: _check_memory(path, shape, dtype))
    except zipfile.BadZipFile as exc:
        raise ReadError(path, f"not a valid .ndata file: not a zip archive ({exc})") from exc
    except ReadError:  # (a ValueError too) its memory check
        raise
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
            channels: list = []  # [y, x, channels] datasets: read (and refused, saying why) when no image is

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and not found and _image_like(obj.shape, obj.dtype):
                    found.append(name)
                elif isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and _channels_last(obj.shape):
                    channels.append(name)

            f.visititems(visit)
            if not found and not channels:
                raise ReadError(path, "no 2-D or 3-D numeric dataset in the file")
            ds = f[(found or channels)[0]]
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
            data = _hdf5_frames(path, ds, frames)
        else:
            _check_memory(path, ds.shape, ds.dtype)
            data = _select_frames(path, ds[()], frames)
    return data, ps, unit, meta


def _hdf5_frames(path: Path, ds, frames: Any) -> np.ndarray:
    """The ``frames`` of a 3-D HDF5 dataset, only they read, once the whole dataset's shape is judged
    (:func:`_check_whole_stack`) and the selection's memory checked. h5py reads ascending slices only: a
    descending one (``slice(None, None, -1)``) is read ascending and reversed."""
    _check_whole_stack(path, ds.shape)
    n = ds.shape[0]
    idx = _frame_index(path, frames, n)
    if isinstance(idx, (int, np.integer)):
        return ds[idx]
    chosen = range(*idx.indices(n)) if isinstance(idx, slice) else idx
    _check_memory(path, [len(chosen), *ds.shape[1:]], ds.dtype)
    if isinstance(idx, np.ndarray):
        return np.stack([ds[int(i)] for i in idx])
    if chosen.step > 0:
        return ds[chosen.start:chosen.stop:chosen.step]
    return ds[chosen[-1]:chosen[0] + 1:-chosen.step][::-1]


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
        if not isinstance(m.data, np.memmap):  # (mrcfile maps every mode it reads: should it not, read whole)
            sel = _select_frames(path, m.data, frames)
            _check_memory(path, sel.shape, sel.dtype)
            return np.array(sel), ps, ("A" if ps else None), meta
        dtype, shape, offset = m.data.dtype, m.data.shape, int(m.data.offset)
    # mapped again once mrcfile has closed the file: a stack is then read a frame at a time, as a .npy
    # one (:func:`_prepare`, :meth:`Micrograph.frame`), not whole into memory
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return _select_frames(path, data, frames), ps, ("A" if ps else None), meta


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
