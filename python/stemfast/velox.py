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
RosettaSciIO's own. Their ``data`` is read when used (:class:`VeloxImages`), as RosettaSciIO's lazy
reading would: picking the image reads none, a frame of a series reads that frame.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["is_velox", "image_signals", "VeloxImages"]


def is_velox(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file in Velox's layout (its ``Version`` says so)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return _json(f["Version"][0]).get("format") == "Velox"
    except Exception:  # noqa: BLE001 - not HDF5, no Version, not JSON: not a Velox file
        return False


def image_signals(path: str | Path) -> list[dict]:
    """The images of a Velox EMD as RosettaSciIO-like signals: ``data`` [H, W] or [frames, H, W]
    (a :class:`VeloxImages`, read when indexed),
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
            ds = group.get("Data")
            if ds is None or ds.ndim != 3:  # not an image in Velox's layout ([H, W, frames]): not offered
                continue
            out.append(_signal(VeloxImages(path, key, ds.shape, ds.dtype), md))
    return out


class VeloxImages:
    """One image group's ``Data`` ([H, W, frames] in the file) as [frames, H, W], or [H, W] for a single
    frame, read from the file only when indexed or converted (``np.asarray``): a series' frame is read
    alone, not the whole acquisition (and its element maps) with it. Indexing takes what NumPy's does;
    the first index of a stack selects frames.

    Examples
    --------
    >>> lazy = VeloxImages("scan.emd", "0123abcd", (512, 512, 40), np.float32)  # doctest: +SKIP
    >>> lazy.shape, lazy[3].shape  # doctest: +SKIP
    ((40, 512, 512), (512, 512))
    """

    def __init__(self, path: str | Path, key: str, shape: tuple[int, int, int], dtype) -> None:
        self._path, self._key = str(path), key
        h, w, n = (int(v) for v in shape)
        self.shape = (n, h, w) if n > 1 else (h, w)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)

    def _frames(self, which: np.ndarray) -> np.ndarray:
        """Frames ``which`` (file order), as [len(which), H, W]."""
        import h5py

        out = np.empty((len(which), *self.shape[-2:]), self.dtype)
        with h5py.File(self._path, "r") as f:
            ds = f["Data/Image"][self._key]["Data"]
            for j, i in enumerate(which):
                ds.read_direct(out, np.s_[:, :, int(i)], np.s_[j])
        return out

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if self.ndim == 2:
            return self._frames(np.zeros(1, np.int64))[0][index]
        first, rest = index[0], index[1:]
        if first is Ellipsis or first is None:
            return np.asarray(self)[index]
        which = np.arange(self.shape[0])[first]  # NumPy's checks and meaning of the frame index
        frames = self._frames(np.ravel(which)).reshape(*np.shape(which), *self.shape[-2:])
        return frames[(slice(None),) * np.ndim(which) + rest]

    def __array__(self, dtype=None, copy=None):
        data = self._frames(np.arange(self.shape[0] if self.ndim == 3 else 1))
        data = data if self.ndim == 3 else data[0]
        return data if dtype is None else data.astype(dtype, copy=False)

    def reshape(self, *shape):
        return np.asarray(self).reshape(*shape)


def _signal(data: VeloxImages, md: dict) -> dict:
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
