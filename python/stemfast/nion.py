"""Nion Swift data items: what :func:`stemfast.io.read` needs of their two file layouts.

A Nion Swift library stores each data item as

* ``.ndata``: a zip archive (entries stored, not compressed) of ``data.npy`` (the array) and
  ``metadata.json`` (the item's properties);
* ``.h5``: an HDF5 file whose dataset ``data`` carries the same JSON in its ``properties`` attribute.

Of the properties, stemfast reads Nion's data descriptor and calibration:

* ``is_sequence`` (a time series: frames first), ``collection_dimension_count`` and
  ``datum_dimension_count``: an image has datum 2 and collection 0; datum 1 over a 2-D collection is
  a spectrum image, datum 2 over a 2-D collection a 4-D STEM scan -- neither is an image;
* ``dimensional_calibrations``: one ``{"offset", "scale", "units"}`` per array axis, in the array's
  order (frames, rows, columns);
* ``title``.

This module only parses; :mod:`stemfast.io` checks and reports (its :class:`~stemfast.io.ReadError`).
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .readbase import _npy_header

__all__ = ["read_ndata", "properties", "h5_properties", "not_an_image", "image_calibration", "title"]

_DATA, _META = "data.npy", "metadata.json"


def read_ndata(path: str | Path, before_load: Callable[[tuple, np.dtype], Any] | None = None) -> tuple[np.ndarray, dict]:
    """``(array, properties)`` of a ``.ndata`` file; the array is a read-only memory map where the
    archive stores ``data.npy`` uncompressed (Nion Swift does), so a series' frames load when used.
    Where it is compressed, ``before_load(shape, dtype)`` is called with its header's shape and type
    before it is decompressed (the caller's memory check: it raises to refuse it).
    A ``ValueError`` names what is missing from a zip that is not a data item.

    Examples
    --------
    >>> import tempfile, os, io, zipfile, json
    >>> p = os.path.join(tempfile.mkdtemp(), "a.ndata")
    >>> buf = io.BytesIO(); np.save(buf, np.eye(3, dtype=np.float32))
    >>> with zipfile.ZipFile(p, "w") as z:
    ...     z.writestr("data.npy", buf.getvalue()); z.writestr("metadata.json", json.dumps({"title": "t"}))
    >>> a, props = read_ndata(p)
    >>> a.shape, props["title"]
    ((3, 3), 't')
    """
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        missing = [n for n in (_DATA, _META) if n not in names]
        if missing:
            raise ValueError(f"a zip without {' and '.join(missing)}: not a Nion Swift data item")
        props = json.loads(z.read(_META).decode("utf-8"))
        info = z.getinfo(_DATA)
        if info.compress_type == zipfile.ZIP_STORED:
            return _mapped_npy(Path(path), info), props
        with z.open(_DATA) as f:
            shape, _, dtype = _data_header(f)
        if before_load is not None:
            before_load(shape, dtype)
        with z.open(_DATA) as f:
            return np.load(f, allow_pickle=False), props


def _data_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``data.npy`` stream ``f`` from its header (left at the start
    of the data); a ``ValueError`` where it is no NumPy array, or one of Python objects."""
    head = _npy_header(f)
    if head is None:
        raise ValueError("data.npy is not a NumPy array")
    if head[2].hasobject:
        raise ValueError("data.npy holds Python objects, not numbers")
    return head


def _mapped_npy(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """The uncompressed ``.npy`` entry ``info`` of the zip at ``path``, memory-mapped."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: the entry's data follows its name and extra field
        if local[:4] != b"PK\x03\x04":
            raise ValueError("a damaged zip entry for data.npy")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        shape, fortran, dtype = _data_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def properties(path: str | Path) -> dict | None:
    """The properties of a Nion Swift data item file (``.ndata``: its ``metadata.json`` alone, the
    data not read; ``.h5``: its ``data`` dataset's), or None where it is not one or cannot be read."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".ndata":
            with zipfile.ZipFile(p) as z:
                return json.loads(z.read(_META).decode("utf-8"))
        import h5py

        with h5py.File(p, "r") as f:
            return h5_properties(f["data"]) if "data" in f else None
    except Exception:  # noqa: BLE001 - not a readable data item: no properties
        return None


def h5_properties(dataset: Any) -> dict | None:
    """The Nion Swift properties of an HDF5 dataset (its ``properties`` attribute, JSON with
    ``dimensional_calibrations``), or None where it has none."""
    raw = dataset.attrs.get("properties")
    if raw is None:
        return None
    try:
        props = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None
    return props if isinstance(props, dict) and "dimensional_calibrations" in props else None


def not_an_image(props: dict, ndim: int) -> str | None:
    """Why a data item of ``ndim`` array axes is not an image or a series of images, or None.

    >>> not_an_image({"datum_dimension_count": 2, "collection_dimension_count": 0}, 2) is None
    True
    >>> not_an_image({"datum_dimension_count": 1, "collection_dimension_count": 2}, 3)
    'a spectrum image (2 scan axes, 1 spectral), not an image'
    """
    datum = props.get("datum_dimension_count")
    collection = props.get("collection_dimension_count", 0) or 0
    if collection:
        kind = "a 4-D STEM scan" if datum == 2 else "a spectrum image" if datum == 1 else "a collection"
        return f"{kind} ({collection} scan axes, {datum} {'spectral' if datum == 1 else 'per point'}), not an image"
    if datum is not None and datum != 2:
        return f"a {datum}-D data item (a spectrum or a profile), not an image"
    if ndim == 3 and props.get("is_sequence") is False:
        return "a 3-D data item that is not a sequence of images, not an image series"
    return None


def image_calibration(props: dict) -> tuple[float | None, str | None, float | None]:
    """``(x scale, its units, y scale)`` of the image axes (the last two ``dimensional_calibrations``),
    or ``(None, None, None)``; the units as Nion writes them (``"nm"``, ``"1/nm"``, ``""``), the unit
    check is the caller's.

    >>> image_calibration({"dimensional_calibrations": [{"offset": 0, "scale": 0.02, "units": "nm"},
    ...                                                 {"offset": 0, "scale": 0.02, "units": "nm"}]})
    (0.02, 'nm', 0.02)
    """
    cal = props.get("dimensional_calibrations") or []
    if len(cal) < 2 or not all(isinstance(c, dict) for c in cal[-2:]):
        return None, None, None
    y, x = cal[-2:]
    if (y.get("units") or "") != (x.get("units") or ""):
        return None, None, None
    try:
        return float(x["scale"]), str(x.get("units") or ""), float(y["scale"])
    except (KeyError, TypeError, ValueError):
        return None, None, None


def title(props: dict) -> str:
    """The data item's title ("HAADF", "MAADF", ...), or ""."""
    t = props.get("title")
    if not t and isinstance(props.get("description"), dict):
        t = props["description"].get("title")
    return str(t or "")
