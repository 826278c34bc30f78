"""Exported pictures (PNG, JPEG, BMP: :data:`stemfast.io.PICTURE_EXTENSIONS`) read with Pillow, with a
warning that they hold display grey levels and no calibration (:func:`picture_note`, which the batch's
input notes repeat), and Pillow's opening of a file without its decompression-bomb limit
(:func:`_pillow_open`), which the TIFF reader's Pillow decoding (:mod:`stemfast.tiff`) shares.

Used by :mod:`stemfast.io` (:func:`~stemfast.io.read`; it re-exports :func:`picture_note`).
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .readbase import ReadError, ReadWarning, _check_memory, _select_frames, log


#: Pillow modes read as they are (grey levels: 8, 16 or 32 bits); colour and palette modes become RGB,
#: then grey (:func:`stemfast.io._prepare`)
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
    :func:`stemfast.io._prepare`), with a :class:`ReadWarning` that it holds display grey levels and no calibration
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
