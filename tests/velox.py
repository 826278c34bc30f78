"""A minimal Thermo Fisher Velox EMD writer, for tests of the Velox read path only.

Velox stores every detector's image of a scan in one HDF5 file; RosettaSciIO's reader (the one
stemfast reads ``.emd`` with) takes from it:

* ``Version``: a JSON string, ``{"version": "9", "format": "Velox"}`` (before v11: the titles come
  from the operations, below);
* ``Data/Image/<uuid>/Data``: the image, [H, W, frames], stored in chunks (Velox chunks its data;
  the lazy reader needs the chunk shape);
* ``Data/Image/<uuid>/Metadata``: the image's metadata as JSON in a zero-padded uint8 column --
  ``BinaryResult`` (``PixelSize`` in ``PixelUnitX``, ``Offset``, ``DetectorIndex``), ``Detectors``,
  ``Scan`` (``FrameTime``), ``Acquisition`` (``AcquisitionStartDatetime``), ``CustomProperties``;
* ``Operations/StemInputOperation/<uuid>``: JSON with the image's ``dataPath`` and its ``detector``,
  which the reader gives as the image's title ("HAADF", "DF2", "DF4", "BF", a Spectra's "DF-I",
  "DF-O", "DF-S", a segment's "DF4-A").

The display, experiment and feature groups Velox also writes are left out: the reader does not need them.
Checked against the layout of RosettaSciIO's own Velox test files (``fei_example_dpc_titles.emd``).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

_PAD = 60000  # Velox's metadata column length


def write_velox(path: Path, images: dict, pixel_m: float = 2e-11, chunked: bool = True,
                spectrum_image: bool = False) -> Path:
    """Write ``images`` {detector title: [H, W] or [frames, H, W] array} as one Velox EMD file of
    pixel size ``pixel_m`` (metres); ``chunked=False`` stores the data unchunked (as some converters do);
    ``spectrum_image``: with a ``Data/SpectrumImage`` group, as an EDS acquisition has (a stand-in: its
    spectrum stream is not written, so RosettaSciIO cannot read the file, as without ``sparse`` it
    cannot read a real one)."""
    import h5py

    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=[json.dumps({"version": "9", "format": "Velox"})], dtype=text)
        ops = f.create_group("Operations/StemInputOperation")
        for i, (title, img) in enumerate(images.items()):
            arr = np.asarray(img)
            data = np.moveaxis(arr, 0, -1) if arr.ndim == 3 else arr[:, :, None]
            key = uuid.uuid4().hex
            g = f.create_group(f"Data/Image/{key}")
            g.create_dataset("Data", data=data,
                             chunks=(min(data.shape[0], 512), min(data.shape[1], 512), 1) if chunked else None)
            g.create_dataset("Metadata", data=_metadata_column(title, i, pixel_m))
            g.create_dataset("FrameLookupTable", data=np.arange(data.shape[2], dtype=np.uint32))
            ops.create_dataset(uuid.uuid4().hex, dtype=text,
                               data=[json.dumps({"dataPath": f"/Data/Image/{key}", "detector": title})])
        if spectrum_image:
            f.create_group(f"Data/SpectrumImage/{uuid.uuid4().hex}").create_dataset("Data", data=np.zeros(16))
    return path


def _metadata_column(title: str, index: int, pixel_m: float) -> np.ndarray:
    md = {"BinaryResult": {"PixelSize": {"width": repr(pixel_m), "height": repr(pixel_m)}, "PixelUnitX": "m",
                           "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"}, "DetectorIndex": str(index),
                           "Detector": title},
          "Detectors": {f"Detector-{index}": {"DetectorName": title, "DetectorType": "ScanningDetector"}},
          "Scan": {"FrameTime": "2.5"}, "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
          "CustomProperties": {}, "Optics": {"AccelerationVoltage": "80000"},
          "Instrument": {"Manufacturer": "FEI Company"}}
    raw = np.frombuffer(json.dumps(md).encode(), dtype=np.uint8)
    column = np.zeros((max(_PAD, raw.size + 1), 1), np.uint8)
    column[:raw.size, 0] = raw
    return column
