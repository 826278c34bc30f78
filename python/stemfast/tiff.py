"""TIFF files: :func:`stemfast.io.read`'s TIFF reader (:func:`_read_tiff`) and what the batch asks of a
TIFF's channels (:func:`tiff_channels`, :func:`tiff_channel_info`, re-exported by :mod:`stemfast.io`).

The reader takes the largest series (not a thumbnail), one channel of a hyperstack (the dark-field
detector's by default, :func:`stemfast.signals.pick_signal`), colour or planar samples that are frames,
and refuses truncated files; the calibration comes from ImageJ, OME, FEI, a JSON description,
resolution tags in cm or RosettaSciIO's TIFF reader; where tifffile lacks a codec (imagecodecs), Pillow
decodes the pages. :func:`stemfast.io.write_tiff` writes the TIFFs this reads.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .pictures import _pillow_open
from .readbase import (_NO_UNIT, ReadError, ReadWarning, _calibration_dropped, _check_memory, _check_whole_stack,
                       _frame_index, _missing_package, _note_pixel_size_y, _select_frames, log, unit_to_nm)
from .signals import pick_signal


# ---------------------------------------------------------------------------------------------
# channels, series, colour
# ---------------------------------------------------------------------------------------------
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
    pixels = _ome_pixels(xml)
    if pixels is None:
        return []
    return [c.get("Name", "") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]


def _ome_pixels(xml: str | None):
    """The first ``Pixels`` element of an OME-XML header (any namespace), None without one or for text
    that is no XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None
    return next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)


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
    msg = f"{path}: {channel_note(meta)}"
    if warn:
        warnings.warn(msg, ReadWarning, stacklevel=5)
    log.info("%s", msg)
    return n


def channel_note(meta: Mapping) -> str:
    """What was read of a TIFF with channels, in words (its reader's ``meta``: ``channels``, ``channel``,
    ``channel_titles``); the reader's warning and the batch's input note.

    >>> channel_note({"channels": 2, "channel": 1, "channel_titles": ["BF", "HAADF"]})
    'the TIFF holds 2 channels (BF, HAADF) (its C axis: detectors or colours of one scan, not frames of a series); channel 1 (HAADF) was read'
    """
    titles, channel = meta.get("channel_titles") or [], int(meta.get("channel", 0))
    held = f" ({', '.join(titles)})" if titles else ""
    name = f" ({titles[channel]})" if titles else ""
    return (f"the TIFF holds {meta['channels']} channels{held} (its C axis: detectors or colours of one scan, not "
            f"frames of a series); channel {channel}{name} was read")


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


def _note_series(path: Path, series_list, pick: int, meta: dict) -> None:
    """Say which of several TIFF series was read (a ReadWarning; ``meta["series"]``)."""
    if len(series_list) > 1:
        meta["series"] = pick
        shapes = ", ".join("x".join(map(str, sr.shape)) for sr in series_list)
        msg = f"{path}: the TIFF holds {len(series_list)} image series ({shapes}); series {pick}, the largest, was read"
        warnings.warn(msg, ReadWarning, stacklevel=5)
        log.info("%s", msg)


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


# ---------------------------------------------------------------------------------------------
# the reader: returns (array-like, pixel_size, unit, metadata), as stemfast.io's readers do
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
        # the calibration of the series read (its first page's tags), not of page 0: a thumbnail may come first
        pixel_size, unit = _tiff_calibration(tif, series.keyframe, meta)
        if pixel_size is None:
            pixel_size, unit = _tiff_calibration_rsciio(path, meta, pick)
        if pixel_size is None:
            _imagej_unit_without_resolution(path, tif, series.keyframe, meta)
        rgb = meta["_rgb"] = _tiff_is_colour(path, series, meta)
        n_pages = len(series.pages)
        core = [s for s, a in zip(series.shape, axes) if s != 1 and (a != "S" or not rgb)]
        data = None
        titles = _channel_titles(tif, series)
        channel = _tiff_channel_index(path, dataset, titles)
        channels = _tiff_channels(path, series, meta, channel, warn=frames is None, titles=titles)
        if len(core) == 3 and not rgb and not channels:
            try:  # uncompressed contiguous stacks: memory-map (read-only), frames load lazily
                if series.dataoffset is not None:  # in the file's byte order (tifffile gives the native one)
                    data = np.memmap(path, dtype=np.dtype(series.dtype).newbyteorder(tif.byteorder), mode="r",
                                     offset=series.dataoffset, shape=tuple(series.shape))
            except (ValueError, OSError, TypeError):  # not contiguous: read normally
                data = None
            if data is None and frames is not None and n_pages == core[0]:
                return _tiff_frames(path, tif, pick, frames), pixel_size, unit, meta
        if data is None:
            _check_memory(path, series.shape, series.dtype)
            data, by_pillow = _decode_tiff(path, tif, pick)
            if channels:  # one channel of every frame: the channel's view of the whole series
                data = data[(slice(None),) * axes.index("C") + (channel,)]
            elif rgb and axes.index("S") != len(axes) - 1 and not by_pillow:  # planar RGB: samples last
                data = np.moveaxis(data, axes.index("S"), -1)
    return _select_frames(path, data, frames), pixel_size, unit, meta


def _tiff_frames(path: Path, tif, pick: int, frames: Any) -> np.ndarray:
    """The ``frames`` of TIFF series ``pick``, a stack of one frame a page, decoded page by page (only the
    pages selected); the whole series' shape gets :func:`stemfast.io.read`'s verdict first (a
    [y, x, channels] array is refused, narrow frames are said), as :func:`_select_frames` gives it."""
    series = tif.series[pick]
    n_pages = len(series.pages)
    _check_whole_stack(path, series.shape)
    idx = _frame_index(path, frames, n_pages)
    key = (list(range(*idx.indices(n_pages))) if isinstance(idx, slice)
           else idx.tolist() if isinstance(idx, np.ndarray) else int(idx))
    _check_memory(path, [len(key) if isinstance(key, list) else 1, *series.shape[-2:]], series.dtype)
    arr, _ = _decode_tiff(path, tif, pick, key)
    if isinstance(idx, (int, np.integer)):
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
    return arr


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
    xres, yres = _resolution(tags, "XResolution"), _resolution(tags, "YResolution")
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


def _resolution(tags, name: str) -> float | None:
    """A resolution tag's pixels per unit (positive, finite), None without one."""
    t = tags.get(name)
    if t is None:
        return None
    v = t.value
    try:
        v = v[0] / v[1] if isinstance(v, tuple) else float(v)
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _imagej_unit_without_resolution(path: Path, tif, page, meta: dict) -> None:
    """Say (:func:`_calibration_dropped`) that an ImageJ TIFF left uncalibrated names a length unit while its
    XResolution (pixels per that unit) is 0, missing or not finite: a calibration the file meant to have."""
    unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    unit = None if unit is None else _decode_ij_unit(str(unit))
    if not unit or unit.strip().lower() in _NO_UNIT or _resolution(page.tags, "XResolution") is not None:
        return
    tag = page.tags.get("XResolution")
    value = "missing" if tag is None else "/".join(map(str, tag.value)) if isinstance(tag.value, tuple) else tag.value
    _calibration_dropped(path, meta, f"its ImageJ unit is {unit!r} but its XResolution ({value}) gives no pixels "
                                     "per unit")


def _ome_calibration(xml: str | None) -> tuple[float | None, str | None]:
    """``(PhysicalSizeX, its unit)`` of the first ``Pixels`` of an OME-XML header (OME's default unit is
    the micrometre), or ``(None, None)``.

    >>> _ome_calibration('<OME><Image><Pixels PhysicalSizeX="0.02" PhysicalSizeXUnit="nm"/></Image></OME>')
    (0.02, 'nm')
    >>> _ome_calibration('<OME><Image><Pixels PhysicalSizeX="0.5"/></Image></OME>')
    (0.5, 'µm')
    """
    pixels = _ome_pixels(xml)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None, None
    try:
        return float(pixels.get("PhysicalSizeX")), pixels.get("PhysicalSizeXUnit", "µm")
    except ValueError:
        return None, None


def _tiff_calibration_rsciio(path: Path, meta: dict, pick: int = 0) -> tuple[float | None, str | None]:
    """Pixel size of a TIFF whose calibration :func:`_tiff_calibration` does not read (DigitalMicrograph's
    private tags, JEOL SightX, Zeiss SEM, ...) from RosettaSciIO's TIFF reader, where it is installed:
    the x axis' scale of series ``pick`` (the one read) where both image axes are in length units; else
    ``(None, None)``."""
    st = path.stat()
    ps, unit = _rsciio_tiff_scale(str(path), st.st_size, st.st_mtime_ns, pick)
    if ps is not None:
        meta["calibration_from"] = "RosettaSciIO's TIFF reader"
    return ps, unit


@functools.lru_cache(maxsize=64)
def _rsciio_tiff_scale(path: str, size: int, mtime_ns: int, pick: int = 0) -> tuple[float | None, str | None]:
    """:func:`_tiff_calibration_rsciio`'s reading, once per file version (a series is read frame by
    frame: ``size`` and ``mtime_ns`` key the cache)."""
    try:
        from rsciio.tiff import file_reader
    except ImportError:
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = _rsciio_axes(path, pick)
            if axes is None:  # its parser is not as this version knows it: its (lazy) reader, one signal a series
                axes = file_reader(path, lazy=True)[pick].get("axes")
    except Exception:  # noqa: BLE001 - its reader failing leaves the file uncalibrated, as without it
        return None, None
    axes = sorted(axes or [], key=lambda a: int(a.get("index_in_array", 0)))[-2:]
    if len(axes) < 2 or any(unit_to_nm(a.get("units")) is None for a in axes):
        return None, None
    return float(axes[-1].get("scale")), str(axes[-1].get("units"))


def _rsciio_axes(path: str, pick: int = 0) -> list[dict] | None:
    """The axes RosettaSciIO's TIFF reader gives series ``pick`` of ``path``, from its own parser of the
    vendors' tags (``rsciio.tiff._api._parse_scale_unit``, called as its reader calls it) on a file opened
    and closed here. Its public reader, even lazy, leaves the file open until a garbage collection (a
    reference cycle through its dask graph) and imports dask (0.25 s). ``None`` where that private
    function is not there or not of the signature this was written for (another RosettaSciIO version):
    the caller then takes the public reader."""
    import inspect

    import tifffile
    from rsciio.tiff import _api

    parse, codes = getattr(_api, "_parse_scale_unit", None), getattr(_api, "axes_label_codes", None)
    if parse is None or codes is None or list(inspect.signature(parse).parameters) != [
            "tiff", "page", "op", "shape", "force_read_resolution", "names", "hamamatsu_streak_axis_type"]:
        return None
    with tifffile.TiffFile(path) as tif:
        series = tif.series[pick]
        page = series.pages[0]
        axes, shape = series.axes, series.shape
        if page.photometric == tifffile.PHOTOMETRIC.RGB:  # as its reader: the colour axis is no axis
            axes, shape = axes[:-1], shape[:-1]
        op = {tag.name: tag.value for tag in page.tags}
        return parse(tif, page, op, shape, False, [codes[a] for a in axes], None)


def _decode_ij_unit(unit: str) -> str:
    if "\\u" in unit:
        try:
            return unit.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except (UnicodeError, ValueError):
            return unit
    return unit
