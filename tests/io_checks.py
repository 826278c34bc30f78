"""Helpers shared by the reader tests (``test_io.py``, ``test_io_more.py``)."""
from __future__ import annotations

import os

import pytest

from stemfast.io import ReadError, read


def read_error(path, **kw) -> ReadError:
    """The :class:`ReadError` that ``read(path, **kw)`` raises (it must), checked to name the file."""
    with pytest.raises(ReadError) as ei:
        read(path, **kw)
    assert os.path.basename(str(path)) in str(ei.value)  # the message names the file
    return ei.value
