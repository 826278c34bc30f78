"""A minimal Gatan DigitalMicrograph (DM3 / DM4) writer, for tests of the DM read path only.

Writes the tag structure a DM file carries for one image or stack (``ImageList`` ->
``ImageData`` with ``Calibrations``, ``Data``, ``DataType``, ``Dimensions``), following the
published layout of the format: a big-endian header (version, file size, byte order), then tag
groups and data tags; data tags carry the ``%%%%`` delimiter and an info array of type codes;
DM4 widens lengths and counts to 8 bytes and stores each tag's size. Data are little-endian.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_LONG, _FLOAT, _USHORT, _ARRAY = 3, 6, 4, 20
_DTYPE_CODES = {np.dtype(np.float32): (2, _FLOAT), np.dtype(np.int16): (1, 2), np.dtype(np.uint16): (10, 4)}


class _Writer:
    def __init__(self, version: int) -> None:
        self.v = version
        self.q = ">Q" if version == 4 else ">L"  # lengths / counts

    def n(self, x: int) -> bytes:
        return struct.pack(self.q, x)

    def data_tag(self, name: str, info: list[int], payload: bytes) -> bytes:
        body = b"%%%%" + self.n(len(info)) + b"".join(self.n(i) for i in info) + payload
        head = b"\x15" + struct.pack(">H", len(name)) + name.encode("latin-1")
        return head + (struct.pack(">Q", len(body)) if self.v == 4 else b"") + body

    def group(self, name: str, tags: list[bytes]) -> bytes:
        body = b"\x00\x01" + self.n(len(tags)) + b"".join(tags)
        head = b"\x14" + struct.pack(">H", len(name)) + name.encode("latin-1")
        return head + (struct.pack(">Q", len(body) - 2) if self.v == 4 else b"") + body

    def long(self, name: str, value: int) -> bytes:
        return self.data_tag(name, [_LONG], struct.pack("<l", value))

    def float(self, name: str, value: float) -> bytes:
        return self.data_tag(name, [_FLOAT], struct.pack("<f", value))

    def text(self, name: str, value: str) -> bytes:
        codes = [ord(c) for c in value]
        return self.data_tag(name, [_ARRAY, _USHORT, len(codes)], struct.pack(f"<{len(codes)}H", *codes))

    def calibration(self, name: str, scale: float, unit: str, origin: float = 0.0) -> bytes:
        return self.group(name, [self.float("Origin", origin), self.float("Scale", scale), self.text("Units", unit)])


def write_dm(path: str | Path, data: np.ndarray, *, pixel_size: float, unit: str, version: int = 3,
             title: str = "HAADF") -> Path:
    """Write ``data`` (2-D image or [frames, H, W] stack) as a DM3 (``version=3``) or DM4 file."""
    arr = np.ascontiguousarray(data)
    if arr.dtype not in _DTYPE_CODES:
        arr = arr.astype(np.float32)
    dm_type, el_type = _DTYPE_CODES[arr.dtype]
    w = _Writer(version)
    dims = arr.shape[::-1]  # DM lists X, Y, Z
    cals = [w.calibration("", pixel_size, unit), w.calibration("", pixel_size, unit)]
    if arr.ndim == 3:
        cals.append(w.calibration("", 1.0, "s"))
    image_data = w.group("ImageData", [
        w.group("Calibrations", [w.calibration("Brightness", 1.0, "counts"), w.group("Dimension", cals)]),
        w.data_tag("Data", [_ARRAY, el_type, arr.size], arr.astype(arr.dtype.newbyteorder("<")).tobytes()),
        w.long("DataType", dm_type),
        w.group("Dimensions", [w.long("", int(d)) for d in dims]),
    ])
    image = w.group("", [image_data, w.group("ImageTags", []), w.text("Name", title)])
    root = b"\x00\x01" + w.n(2) + w.group("ImageList", [image]) + w.group("DocumentObjectList", [])
    body = root + b"\x00" * 8
    header = struct.pack(">L", version) + w.n(len(body) + 4) + struct.pack(">L", 1)
    p = Path(path)
    p.write_bytes(header + body)
    return p
