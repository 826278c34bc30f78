"""What every micrograph reader shares: the errors (:class:`ReadError`, :class:`ReadWarning`), the one unit
table (:func:`unit_to_nm`) and the calibration's normalisation, the memory check from a file's header
(:func:`available_memory_bytes`), the ``frames=`` selection, and small tests of shapes and attributes.

Used by :mod:`stemfast.io` (:func:`~stemfast.io.read` and its small readers), :mod:`stemfast.tiff`,
:mod:`stemfast.signals` and :mod:`stemfast.pictures`; it imports no other module of stemfast. The errors'
public home is :mod:`stemfast.io` (they are named there, as before the readers were split up), and the
readers' log records go to its logger, ``stemfast.io``, whichever module writes them.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the readers' logger: :mod:`stemfast.io`'s, whichever of their modules logs
log = logging.getLogger("stemfast.io")

#: Smallest accepted image side in px.
MIN_SIDE = 16
#: A last axis at most this long, beside two axes at least :data:`CHANNELS_RATIO` times as long, is
#: read as channels ([y, x, channels]: detectors, colours, spectrum bins), not as the width of a
#: series' frames (:func:`_channels_last`).
MAX_CHANNELS_AXIS = 64
#: See :data:`MAX_CHANNELS_AXIS`.
CHANNELS_RATIO = 4


# length units -> nm
_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "nanometre": 1.0, "nanometres": 1.0,
    "a": 0.1, "å": 0.1, "\u212b": 0.1, "angstrom": 0.1, "angstroms": 0.1, "ångström": 0.1,
    "ångstrom": 0.1, "\\u00c5": 0.1, "\\u212b": 0.1,
    "ångströms": 0.1, "angströms": 0.1,
    "pm": 1e-3, "picometer": 1e-3, "picometre": 1e-3, "picometers": 1e-3, "picometres": 1e-3,
    "um": 1e3, "µm": 1e3, "\u03bcm": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3,
    "micrometre": 1e3, "micrometers": 1e3, "micrometres": 1e3, "\\u00b5m": 1e3, "\\u03bcm": 1e3,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6, "millimeters": 1e6, "millimetres": 1e6,
    "cm": 1e7, "centimeter": 1e7, "centimetre": 1e7, "centimeters": 1e7, "centimetres": 1e7,
    "m": 1e9, "meter": 1e9, "metre": 1e9, "meters": 1e9, "metres": 1e9,
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


# named where users meet them (tracebacks, pickles across the batch's processes, warning reports): stemfast.io
ReadError.__module__ = ReadWarning.__module__ = "stemfast.io"


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


def unit_not_a_length(pixel_size: float | None, unit: str | None) -> str | None:
    """Why a pixel size in ``unit`` is not used as a length (a ``"1/nm"`` a diffraction pattern's,
    ``"px"``, an unknown unit), or None where it is (or there is none): the text of the
    :class:`stemfast.sites.CalibrationWarning` and of ``summary.json``'s ``input.calibration_ignored``.

    >>> unit_not_a_length(0.012, "1/nm")[:44], unit_not_a_length(0.012, "nm"), unit_not_a_length(None, "1/nm")
    ("the pixel size's unit '1/nm' is not a length", None, None)
    """
    if pixel_size is None or unit is None or unit_to_nm(unit) is not None:
        return None
    return (f"the pixel size's unit {unit!r} is not a length unit (nm, Å, pm, µm, ...): the pixel size "
            f"{pixel_size:g} {unit} is not used (no x_nm / y_nm, no spacing in nm, no calibration check)")


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


def _checked_calibration(path, pixel_size: Any, unit: Any, meta: dict) -> tuple[float | None, str | None]:
    """A calibration as :func:`stemfast.io.read` takes it: normalised (:func:`_normalise_calibration`); a
    pixel size without a unit (nm? Å? µm?) is none, and is said (:func:`_calibration_dropped`); one
    outside :data:`PLAUSIBLE_PIXEL_NM` neither (:func:`_plausible_calibration`)."""
    ps, u = _normalise_calibration(pixel_size, unit)
    if ps is not None and u is None:
        _calibration_dropped(path, meta, f"a pixel size ({ps:g}) without a unit")
        return None, None
    return _plausible_calibration(path, ps, u, meta)


def _calibration_dropped(path, meta: dict, why: str) -> None:
    """Say that a file's calibration is not used (``why``: what is wrong with it): a :class:`ReadWarning`
    and ``meta["calibration_dropped"]``; the image is read without a pixel size."""
    meta["calibration_dropped"] = why
    msg = f"{path}: {why}: its calibration is not used, the image is read without a pixel size"
    warnings.warn(msg, ReadWarning, stacklevel=4)
    log.info("%s", msg)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def _image_like(shape: Sequence[int], dtype) -> bool:
    """Whether an array of ``shape`` and ``dtype`` can be a 2-D image or a 3-D stack of images: real
    numbers, two or three axes longer than 1 (none empty), the image sides at least :data:`MIN_SIDE`
    px, not [y, x, channels] (:func:`_channels_last`)."""
    core = [x for x in (int(v) for v in shape) if x != 1]
    return (np.dtype(dtype).kind in "biuf" and len(core) in (2, 3) and min(core) > 0 and min(core[-2:]) >= MIN_SIDE
            and not _channels_last(core))


def _channels_last(shape: Sequence[int]) -> bool:
    """Whether a 3-D ``shape`` [a, b, c] (RGB(A) shapes aside) is [y, x, channels] rather than
    [frames, y, x]: both first axes are image-sized (at least :data:`MIN_SIDE`), and the last is too
    short to be an image side or at most :data:`MAX_CHANNELS_AXIS` while the others are at least
    :data:`CHANNELS_RATIO` times as long (frames 4x taller than wide, and 4x more of them than their
    width, are not a STEM series; a spectrum image or a stack of detectors saved channels-last is).

    >>> _channels_last((256, 256, 16)), _channels_last((512, 512, 2)), _channels_last((20, 256, 256))
    (True, True, False)
    >>> _channels_last((100, 512, 64)), _channels_last((256, 256, 3))
    (False, False)
    """
    core = [int(s) for s in shape if s != 1]
    if len(core) != 3 or _is_rgb_shape(core):
        return False
    a, b, c = core
    if min(a, b) < MIN_SIDE:
        return False
    return c < MIN_SIDE or (c <= MAX_CHANNELS_AXIS and min(a, b) >= CHANNELS_RATIO * c)


def _narrow_frames(shape: Sequence[int]) -> bool:
    """Whether a 3-D ``shape`` read as [frames, H, W] has frames at least :data:`CHANNELS_RATIO` times
    taller than wide, and that many times more of them than their width, without being
    :func:`_channels_last`: it is read so, but it may be [y, x, frames] or [y, x, channels] with a
    longer last axis (:func:`narrow_frames_note`).

    >>> _narrow_frames((512, 512, 100)), _narrow_frames((100, 512, 512)), _narrow_frames((512, 512, 16))
    (True, False, False)
    """
    core = [int(s) for s in shape if s != 1]
    if len(core) != 3 or _is_rgb_shape(core) or _channels_last(core):
        return False
    a, b, c = core
    return CHANNELS_RATIO * c <= min(a, b)


def narrow_frames_note(shape: Sequence[int]) -> str:
    """What the reader says of a :func:`_narrow_frames` array of ``shape`` [a, b, c]."""
    a, b, c = (int(s) for s in shape if s != 1)
    return (f"the array [{a}, {b}, {c}] was read as {a} frames of {b} x {c} px, as an array without axis names "
            f"is [frames, H, W]; if it is [y, x, frames] or [y, x, channels] (a series or detectors saved "
            f"frames-last), save it frames first (numpy.moveaxis(array, -1, 0)) or one channel alone")


def channels_last_error(path, shape: Sequence[int]) -> "ReadError":
    """The :class:`ReadError` of a :func:`_channels_last` array of ``shape`` (as stored)."""
    a, b, c = (int(s) for s in shape if s != 1)
    return ReadError(path, f"shape {tuple(int(s) for s in shape)} reads as [y, x, channels] ({a} x {b} px, {c} "
                           f"channels or frames saved last: detectors, colours, spectrum bins, a series), not as "
                           f"{a} frames of {b} x {c} px; stemfast reads images [H, W] and series [frames, H, W]: "
                           "save one channel alone (array[..., k]) or a series frames first "
                           "(numpy.moveaxis(array, -1, 0))")


def _check_whole_stack(path, shape: Sequence[int]) -> None:
    """What :func:`stemfast.io.read` says of a whole array of ``shape`` before a ``frames=`` selection
    takes part of it (the selection alone would pass as an image): a :func:`_channels_last` array is
    refused, a :func:`_narrow_frames` one is warned of."""
    if _channels_last(shape):
        raise channels_last_error(path, shape)
    if _narrow_frames(shape):
        warnings.warn(f"{path}: {narrow_frames_note(shape)}", ReadWarning, stacklevel=4)


def _is_rgb_shape(shape: Sequence[int]) -> bool:
    core = [int(s) for s in shape if s != 1]
    return len(core) >= 3 and core[-1] in (3, 4) and min(core[-3:-1]) >= MIN_SIDE


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
#: Working copies of one float32 frame the analysis holds besides the data (the source array and its
#: float32 copy; the process's own ~0.2 GB not counted). Measured peak resident memory of ``analyze``
#: (synthetic MoS2, the command line's heap, which keeps freed blocks): 8192^2 uint16 1981 MiB = 7.7
#: frames of 256 MiB (the data 1.5 of them, the process ~0.7), 8192^2 float32 1862 MiB, 12288^2
#: float32 with its scan lines levelled and the lattice found again 3783 MiB = 6.6 frames: at most 5.6
#: frames beyond the data and the process. 7 is that with a margin of 25 % (the 8192^2 uint16 image:
#: 2176 MiB estimated, 1981 measured); 2 before, when a 16k float32 image estimated at 4 GiB peaked
#: at 8.5 GiB (the phase map's padded spectra, since reduced)
_WORK_COPIES = 7


#: Where the cgroup file systems are mounted: the v2 hierarchy at it, a v1 memory controller under
#: ``memory/`` (:func:`available_memory_bytes`).
CGROUP_ROOT = "/sys/fs/cgroup"
#: Where the proc file system is mounted (:func:`available_memory_bytes`).
PROC_ROOT = "/proc"
# a cgroup v1 limit at least this large is none (the kernel writes 2^63 rounded to a page)
_NO_LIMIT = 1 << 62


def available_memory_bytes(*, proc: str | os.PathLike | None = None,
                           cgroup_root: str | os.PathLike | None = None) -> int:
    """Memory the process can use: ``STEMFAST_MEMORY_LIMIT_MB`` if set, else the least of MemAvailable +
    SwapFree, the room left under the memory limit of the process's cgroup and of each cgroup above it
    (a container's ``--memory``, a SLURM job's: :func:`_cgroup_room`) and the room left under its
    address-space limit (``ulimit -v``: :func:`_address_space_room`).

    ``proc`` / ``cgroup_root``: where the proc and cgroup file systems are (default :data:`PROC_ROOT`,
    :data:`CGROUP_ROOT`; other places in tests).

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
    proc, cgroup_root = Path(proc or PROC_ROOT), Path(cgroup_root or CGROUP_ROOT)
    rooms = [_system_free(proc), _cgroup_room(proc, cgroup_root), _address_space_room(proc)]
    return int(min(r for r in rooms if r is not None))


def _system_free(proc: Path) -> int:
    """MemAvailable + SwapFree of ``proc``/meminfo (the whole machine's), else the free pages."""
    try:
        info = {}
        with open(proc / "meminfo", encoding="ascii") as f:
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


def _cgroup_room(proc: Path, root: Path) -> int | None:
    """Room left under the memory limits of this process's cgroups (``proc``/self/cgroup), v2
    (``memory.max`` - ``memory.current``) and v1 (``memory.limit_in_bytes`` - ``memory.usage_in_bytes``
    under ``root``/memory), the least over its cgroup and those above it, the reclaimable page cache
    (``inactive_file``) counted as room; None where no limit is set (``max``) or none can be read."""
    try:
        lines = (proc / "self" / "cgroup").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            rooms += [_cgroup_dir_room(d, "memory.max", "memory.current", "inactive_file") for d in _up(root, path)]
        elif "memory" in controllers.split(","):
            rooms += [_cgroup_dir_room(d, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                      for d in _up(root / "memory", path)]
    rooms = [r for r in rooms if r is not None]
    return min(rooms) if rooms else None


def _up(base: Path, path: str) -> list[Path]:
    """The folders of cgroup ``path`` and of those above it, under the mount ``base`` (which is the
    cgroup itself where a container mounts its own cgroup: a ``path`` not found there)."""
    parts = [p for p in path.strip().split("/") if p]
    if ".." in parts:  # a cgroup outside this namespace's view: only the mount is known
        parts = []
    return [base.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]


def _cgroup_dir_room(d: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    """``limit - usage + reclaimable cache`` of the cgroup folder ``d`` (at most its limit), or None
    where it sets no limit or its files cannot be read."""
    try:
        text = (d / limit_file).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit() or int(text) >= _NO_LIMIT:  # "max": no limit
        return None
    limit = int(text)
    try:
        usage = int((d / usage_file).read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        usage = 0
    cache = 0
    try:
        for line in (d / "memory.stat").read_text(encoding="ascii").splitlines():
            k, _, v = line.partition(" ")
            if k == cache_key:
                cache = int(v)
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    return max(0, min(limit, limit - usage + cache))


def _address_space_room(proc: Path) -> int | None:
    """Room left under the process's address-space limit (RLIMIT_AS, ``ulimit -v``): the limit less its
    virtual size (``VmSize`` of ``proc``/self/status); None where no limit is set."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):  # pragma: no cover - not a POSIX system
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = 0
    try:
        for line in (proc / "self" / "status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, int(soft) - size)


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


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``(shape, fortran_order, dtype)`` from the header of the ``.npy`` stream ``f`` (a file or a zip
    member, at its start), the data not read: what a compressed array needs in memory before it is
    decompressed; ``None`` where ``f`` holds no ``.npy`` array. ``f`` is left at the start of the data."""
    fmt = np.lib.format
    if f.read(len(fmt.MAGIC_PREFIX)) != fmt.MAGIC_PREFIX:
        return None
    major, minor = (int(b) for b in f.read(2))
    header = fmt.read_array_header_1_0 if (major, minor) == (1, 0) else fmt.read_array_header_2_0
    return header(f)


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------
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
    _check_whole_stack(path, shape)
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
    """``frames`` (:func:`stemfast.io.read`'s) checked against a stack of ``n`` frames: an int (negative
    from the end), a slice, or a sequence of ints (floats of whole value pass as before). Booleans -- True,
    a mask -- and text are refused with a :class:`ReadError`: True is no frame number, and a mask would be
    taken for the frames 0 and 1 (pass ``numpy.flatnonzero(mask)``)."""
    wrong = f"frames must be an int, a slice or a sequence of ints, got {frames!r}"
    if isinstance(frames, (bool, np.bool_, str, bytes)):
        raise ReadError(path, wrong)
    if isinstance(frames, (int, np.integer)):
        i = int(frames)
        if not -n <= i < n:
            raise ReadError(path, f"frame {i} out of range (the file has {n} frame(s))")
        return i % n if n > 1 else 0
    if isinstance(frames, slice):
        try:
            chosen = range(*frames.indices(n))
        except (TypeError, ValueError) as exc:  # a step of 0, bounds that are no integers
            raise ReadError(path, f"frames={frames} is no selection of frames ({exc})") from None
        if not len(chosen):
            raise ReadError(path, f"frames={frames} selects no frame (the file has {n})")
        return frames
    idx = _frame_numbers(path, frames, wrong)
    if idx.ndim != 1 or idx.size == 0:
        raise ReadError(path, f"frames={frames!r} selects no frame")
    if (idx < -n).any() or (idx >= n).any():
        raise ReadError(path, f"frames {idx.tolist()} out of range (the file has {n} frame(s))")
    return idx % n


def _frame_numbers(path: Path, frames: Any, wrong: str) -> np.ndarray:
    """The frame numbers of a sequence ``frames`` as int64, or the :class:`ReadError` ``wrong`` (a boolean
    mask says how to pass it)."""
    try:
        items = list(frames)
        arr = np.asarray(items)
    except (TypeError, ValueError):
        raise ReadError(path, wrong) from None
    if any(isinstance(v, (bool, np.bool_)) for v in items) or arr.dtype.kind == "b":
        raise ReadError(path, f"{wrong}: booleans are no frame numbers (for a mask, numpy.flatnonzero(mask))")
    if arr.size and (arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not (
            np.isfinite(arr).all() and (arr == np.round(arr)).all()))):
        raise ReadError(path, wrong)
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# what several readers ask of their files
# ---------------------------------------------------------------------------------------------
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


def _note_pixel_size_y(path, meta: dict, ps: float, ps_y: float | None, unit: str | None) -> None:
    """A file's pixels that are not square (``ps_y``, the pixel height, differs from the width ``ps`` by
    more than a millionth): ``meta["pixel_size_y"]`` and a logged warning; the width is the pixel size."""
    if ps_y and abs(ps_y - ps) > 1e-6 * abs(ps):
        meta["pixel_size_y"] = ps_y
        log.warning("%s: anisotropic pixels (x %g, y %g %s); using x", path, ps, ps_y, unit)


def _text(raw: bytes) -> str:
    """Bytes of a file's text: UTF-8, else Latin-1 (older instruments' "\\xb5m" for µm, "\\xc5" for Å),
    which decodes any byte.

    >>> _text("µm".encode()), _text(b"\\xb5m")
    ('µm', 'µm')
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _attr(v: Any) -> Any:
    """A file's attribute as plain Python: bytes decoded (:func:`_text`; so is a text h5py decoded with its
    undecodable bytes escaped), numpy values and small arrays as Python's, large arrays described."""
    if isinstance(v, bytes):
        return _text(v)
    if isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v):  # h5py: UTF-8 it could not decode
        try:
            return _text(v.encode("utf-8", "surrogateescape"))
        except UnicodeError:
            return v
    if isinstance(v, np.ndarray) and v.ndim == 0:  # one value: itself, not a list of a text's characters
        return _attr(v[()])
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()] if v.size <= 64 else f"<array {v.shape} {v.dtype}>"
    if isinstance(v, np.generic):
        return v.item()
    return v
