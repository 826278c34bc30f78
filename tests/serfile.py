"""A minimal FEI/Thermo TIA series (``.ser``) writer, for tests of the TIA read path only.

Writes one 2-D image or a [frames, H, W] stack as a SER file following the published layout
(all little-endian):

* header: ``ByteOrder`` 0x4949, ``SeriesID`` 0x0197, ``SeriesVersion`` (0x0210: 4-byte
  offsets, 0x0220: 8-byte offsets), ``DataTypeID`` 0x4122 (2-D data elements), ``TagTypeID``
  0x4152 (time-only tags), ``TotalNumberElements``, ``ValidNumberElements``,
  ``OffsetArrayOffset``, ``NumberDimensions`` (1);
* the dimension array: one series dimension (size = number of frames, 1 for a single image)
  with its calibration, description and units;
* the offset arrays: the file offsets of every data element, then of every tag;
* per frame, a data element -- ``CalibrationOffset/Delta/Element`` for X then Y (metres),
  ``DataType`` (7 = float32), ``ArraySizeX``, ``ArraySizeY``, then the pixels, X fastest and
  the bottom row first (TIA's origin is bottom-left) -- directly followed by its tag
  (``TagTypeID``, 2 bytes of padding, ``Time``), which is where RosettaSciIO's reader looks for it.

The ``.emi`` sidecar (XML acquisition metadata) is not written: RosettaSciIO reads a ``.ser``
alone, taking the calibration from the data elements and assuming metres.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_FLOAT32 = 7
_IMAGE_ELEMENTS, _TIME_TAG = 0x4122, 0x4152


def write_ser(path: str | Path, data: np.ndarray, *, pixel_size_m: float,
              version: int = 0x0220) -> Path:
    """Write ``data`` (2-D image or [frames, H, W] stack, as float32) as a TIA ``.ser`` file."""
    if version not in (0x0210, 0x0220):
        raise ValueError("version must be 0x0210 or 0x0220")
    arr = np.asarray(data, dtype=np.float32)
    stack = arr if arr.ndim == 3 else arr[None]
    n, h, w = stack.shape
    off = "<L" if version == 0x0210 else "<Q"
    off_size = struct.calcsize(off)

    desc, units = b"Number", b""
    dim = (struct.pack("<LddL", n, 0.0, 1.0, 0) + struct.pack("<L", len(desc)) + desc
           + struct.pack("<L", len(units)) + units)
    head_size = 22 + off_size + 4
    offset_array_at = head_size + len(dim)
    first_element_at = offset_array_at + 2 * n * off_size

    cal = struct.pack("<ddL", 0.0, pixel_size_m, 0)  # offset, delta (m/px), calibration element
    elements, data_offsets, tag_offsets = b"", [], []
    for i, frame in enumerate(stack):
        pos = first_element_at + len(elements)
        element = (cal + cal + struct.pack("<HLL", _FLOAT32, w, h)
                   + np.ascontiguousarray(frame[::-1], dtype="<f4").tobytes())
        tag = struct.pack("<HHL", _TIME_TAG, 0, i)
        data_offsets.append(pos)
        tag_offsets.append(pos + len(element))
        elements += element + tag

    header = (struct.pack("<HHHLLLL", 0x4949, 0x0197, version, _IMAGE_ELEMENTS, _TIME_TAG, n, n)
              + struct.pack(off, offset_array_at) + struct.pack("<L", 1))
    offsets = b"".join(struct.pack(off, o) for o in data_offsets + tag_offsets)
    p = Path(path)
    p.write_bytes(header + dim + offsets + elements)
    return p
