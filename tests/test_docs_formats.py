"""What the package docstring says ``stemfast.read`` reads without the optional extra
``stemfast[io]`` is read with the extra's packages (h5py, mrcfile, RosettaSciIO) absent."""
from __future__ import annotations

import io as _bio
import json
import re
import sys
import zipfile

import numpy as np
import pytest
import tifffile

import stemfast
from stemfast.io import read

EXTRA_PACKAGES = ("h5py", "mrcfile", "rsciio")


def _ndata(path, arr):
    buf = _bio.BytesIO()
    np.save(buf, arr)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.npy", buf.getvalue())
        z.writestr("metadata.json", json.dumps({"title": "HAADF", "datum_dimension_count": 2,
                                                "collection_dimension_count": 0}))


def _h5(path, arr):
    h5py = pytest.importorskip("h5py")  # to write the file; the read runs without it
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=arr)


#: a file of each format the docstrings may name (the name as they write it -> suffix, writer)
WRITERS = {
    "TIFF": (".tif", tifffile.imwrite),
    "NPY": (".npy", np.save),
    "Nion .ndata": (".ndata", _ndata),
    "HDF5": (".h5", _h5),
}


def _base_formats() -> list[str]:
    """The formats the package docstring's ``stemfast.read`` line names before ``stemfast[io]``."""
    line = next(ln for ln in stemfast.__doc__.splitlines() if ":func:`stemfast.read`" in ln)
    base = re.search(r"\(([^;]*);[^)]*stemfast\[io\]", line).group(1)
    return [f.strip() for f in base.split(",")]


@pytest.mark.parametrize("fmt", _base_formats())
def test_the_formats_named_without_the_extra_read_without_it(fmt, tmp_path, monkeypatch):
    suffix, write = WRITERS[fmt]
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    path = tmp_path / f"a{suffix}"
    write(path, img)
    for name in EXTRA_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)
    np.testing.assert_array_equal(read(path).data, img)
