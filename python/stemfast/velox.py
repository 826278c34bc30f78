"""Thermo Fisher Velox EMD images read directly (h5py), where RosettaSciIO will not read the file.

RosettaSciIO reads Velox files, but not a spectrum-image acquisition (HAADF and EDS maps with the
spectrum stream) without the optional package ``sparse`` -- not even its images. This module reads
only the images, from the layout Velox writes:

* ``Version``: JSON, ``{"format": "Velox", "version": ...}``;
* ``Data/Image/<uuid>/Data``: [H, W, frames];
* ``Data/Image/<uuid>/Metadata``: JSON in a zero-padded uint8 column; ``BinaryResult`` holds the
  pixel size (``PixelSize`` ``width`` / ``height`` in ``PixelUnitX``), the ``Detector`` (its name:
  "HAADF", "DF-S", an EDS detector's for an element map) and the ``DetectorIndex`` into ``Detectors``.

The images come back as RosettaSciIO signals (``data``, ``axes``, ``metadata``) for
:mod:`stemfast.signals` (the reading of :func:`stemfast.io.read`) to check and pick from as it does
RosettaSciIO's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["is_velox", "image_signals"]


def is_velox(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file in Velox's layout (its ``Version`` says so)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return _json(f["Version"][0]).get("format") == "Velox"
    except Exception:  # noqa: BLE001 - not HDF5, no Version, not JSON: not a Velox file
        return False


def image_signals(path: str | Path) -> list[dict]:
    """The images of a Velox EMD as RosettaSciIO-like signals: ``data`` [H, W] or [frames, H, W],
    ``axes`` (the pixel size in the file's unit), ``metadata`` (``General.title``: the detector).
    A ``ValueError`` where the file holds no image group."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        images = f.get("Data/Image")
        if images is None:
            raise ValueError("a Velox file without images")
        for key in images:
            group = images[key]
            md = _json(group["Metadata"][:, 0].tobytes().rstrip(b"\0")) if "Metadata" in group else {}
            data = np.moveaxis(np.asarray(group["Data"]), -1, 0)
            out.append(_signal(data[0] if data.shape[0] == 1 else data, md))
    return out


def _signal(data: np.ndarray, md: dict) -> dict:
    br = md.get("BinaryResult") or {}
    title = br.get("Detector") or ((md.get("Detectors") or {}).get(f"Detector-{br.get('DetectorIndex')}") or {}).get(
        "DetectorName", "")
    size, unit = br.get("PixelSize") or {}, br.get("PixelUnitX", "")
    axes = [{"name": "frame", "size": int(data.shape[0]), "index_in_array": 0, "scale": 1.0, "offset": 0.0,
             "units": "", "navigate": True}] if data.ndim == 3 else []
    for name, k in (("y", "height"), ("x", "width")):
        axes.append({"name": name, "size": int(data.shape[len(axes)]), "index_in_array": len(axes),
                     "scale": float(size.get(k, 1.0)), "offset": 0.0, "units": unit if k in size else "",
                     "navigate": False})
    return {"data": data, "axes": axes, "metadata": {"General": {"title": str(title)}},
            "original_metadata": {"BinaryResult": br}}


def _json(raw) -> dict:
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
