"""The images of a file RosettaSciIO reads (DM3/DM4, EMD, SER/EMI, HyperSpy's HSPY, MRC without mrcfile) and
the choice of one of several by its title.

:func:`stemfast.io.read` reads them through :func:`_read_rsciio` (a Velox EMD that RosettaSciIO cannot read
is read directly: :mod:`stemfast.velox`); :func:`pick_signal` also picks a TIFF's channel
(:mod:`stemfast.tiff`) and the batch's companion image (:mod:`stemfast.batch.companions`), which lists a
file's images with :func:`signal_titles`. Both are re-exported by :mod:`stemfast.io`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .readbase import _NO_UNIT, ReadError, _attr, _check_memory, _image_like, _select_frames, log


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
    _check_memory(path, np.shape(data), getattr(data, "dtype", None))  # before a lazy (dask) array is computed
    return np.asarray(data), ps, unit, meta
