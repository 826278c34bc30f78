"""More tests of the micrograph readers (stemfast.io and the modules below it): byte order, which
series' calibration, memory checks before decompression, frames= selections, calibrations and units."""
from __future__ import annotations

import json
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import tifffile

from stemfast.io import ReadError, ReadWarning, read


@pytest.fixture
def stack():
    rng = np.random.default_rng(2)
    return rng.normal(100.0, 10.0, (3, 40, 56)).astype(np.float32)


def _err(path, **kw) -> ReadError:
    with pytest.raises(ReadError) as ei:
        read(path, **kw)
    assert os.path.basename(str(path)) in str(ei.value)  # the message names the file
    return ei.value


# ---------------------------------------------------------------------------------------------
# TIFF
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_big_endian_uncompressed_stack_is_read_in_its_byte_order(tmp_path, stack, dtype):
    """tifffile gives a series' dtype in the native byte order: the memory map of an uncompressed
    big-endian stack must be made in the file's order, or every value is byte-swapped garbage."""
    data = (stack * 10).astype(dtype)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">", photometric="minisblack")
    mg = read(tmp_path / "be.tif")
    np.testing.assert_array_equal(mg.data, data.astype(np.float32))
    np.testing.assert_array_equal(read(tmp_path / "be.tif", frames=1).data, data[1].astype(np.float32))
    np.testing.assert_array_equal(read(tmp_path / "be.tif", frames=[2, 0]).data, data[[2, 0]].astype(np.float32))
