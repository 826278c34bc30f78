"""A JSON file beside an array (``x.npy`` -> ``x.json``: its authors' metadata, for formats that carry none):
the pixel size and the material it names (:func:`sidecar`).

:func:`stemfast.io.read` takes its pixel size where the file has none and keeps what it found in
``metadata["sidecar"]``, which the batch reports (:mod:`stemfast.batch.inputs`, :mod:`stemfast.batch.tasks`).
Re-exported by :mod:`stemfast.io`; it imports no other module of stemfast.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    if ps is not None:  # (a unit of null is none: read() then says that the pixel size has no unit)
        unit = "nm" if ps[0] == "pixel_size_nm" else _unit(flat, _SIDECAR_UNIT_KEYS)
        out.update(pixel_size=float(ps[1]), unit=unit, **{"from": f"{ps[0]} {ps[1]:g} {unit}"})
    else:
        fov = next(((k, flat[k]) for k in _SIDECAR_FOV_KEYS if _positive(flat.get(k))), None)
        # its own unit key first, else a plain "unit" / "units" (the README's "its units")
        unit = _unit(flat, _SIDECAR_FOV_UNIT_KEYS + _SIDECAR_UNIT_KEYS)
        if fov is not None and width > 0:
            out.update(pixel_size=float(fov[1]) / width, unit=unit,
                       **{"from": f"{fov[0]} {fov[1]:g} {unit} / {width} px"})
    text = next((str(flat[k]) for k in _SIDECAR_MATERIAL_KEYS if isinstance(flat.get(k), str)), None)
    if text is not None:
        out["material_text"] = text[:200]
        hit = re.search(r"(?<![A-Za-z])(MoSe2|WSe2|MoS2|WS2)(?![a-z])", text, flags=re.IGNORECASE)
        if hit:
            out["material"] = hit.group(1).lower()
    return out


def _unit(flat: Mapping, keys: tuple[str, ...]) -> str | None:
    """The text of the first of ``keys`` in ``flat`` that is not null, or None."""
    return next((str(flat[k]) for k in keys if flat.get(k) is not None), None)


def _flat_items(d: Mapping, depth: int = 0):
    """``(key, value)`` of a nested mapping's leaves, depth first (the first of a repeated key wins)."""
    for k, v in d.items():
        if isinstance(v, Mapping) and depth < 8:
            yield from _flat_items(v, depth + 1)
        else:
            yield str(k).lower(), v


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
