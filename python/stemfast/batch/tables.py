"""The per-input site table ``sites.csv``: column order, number formats, frame-by-frame streaming."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .._kernels.numpy_ref.text import BOOL, CODE, EMPTY, F6, F8, INT, format_cells

__all__ = ["LEADING_COLUMNS", "CALIBRATED_COLUMNS", "COORD_COLUMNS", "column_order", "cell_spec", "format_column",
           "CsvStream"]

log = logging.getLogger("stemfast.batch")

#: Columns that come first in ``sites.csv`` (then ``x_nm, y_nm`` when calibrated, then the rest).
LEADING_COLUMNS = ("frame", "x", "y", "source", "intensity", "class_id", "recon_error", "anomaly_score",
                   "is_defect", "defect_kind", "angle")
CALIBRATED_COLUMNS = ("x_nm", "y_nm")
COORD_COLUMNS = {"x", "y", "x_nm", "y_nm"}


def column_order(names: Sequence[str]) -> list[str]:
    """``names`` in the ``sites.csv`` order: :data:`LEADING_COLUMNS`, then ``x_nm, y_nm``, then the rest."""
    lead = [c for c in LEADING_COLUMNS if c in names]
    cal = [c for c in CALIBRATED_COLUMNS if c in names]
    return lead + cal + [c for c in names if c not in lead and c not in cal]


def cell_spec(a: np.ndarray, name: str) -> tuple[np.ndarray, int, list[str]]:
    """How one column's cells are written (the ``format_csv_rows`` kernel's column, kind and vocabulary,
    :mod:`stemfast._kernels`): coordinates with 8 significant digits, other floats 6, integers in
    decimal, booleans ``1`` / ``0``, anything else as ``str`` of the value (quoted when it holds a
    comma, a quote or a line break), as codes into its distinct values."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return a, F8 if name in COORD_COLUMNS else F6, []
    if a.dtype.kind == "b":
        return a, BOOL, []
    if a.dtype.kind == "i" or (a.dtype.kind == "u" and a.dtype.itemsize < 8):
        return a, INT, []
    strs = a if a.dtype.kind == "U" else np.array([str(v) for v in a.tolist()], dtype=str)
    uniq, codes = np.unique(strs, return_inverse=True)
    return codes.reshape(-1), CODE, [_quoted(str(u)) for u in uniq.tolist()]


def _quoted(s: str) -> str:
    return '"' + s.replace('"', '""') + '"' if any(ch in s for ch in ',"\n\r') else s


def format_column(a: np.ndarray, name: str) -> list[str]:
    """The CSV cells of one column, as ``sites.csv`` writes them (:func:`cell_spec`)."""
    col, kind, vocab = cell_spec(a, name)
    return format_cells(len(col), col, kind, vocab)


class CsvStream:
    """Writes site tables frame after frame into one CSV (header from the first non-empty table), the
    rows formatted by the ``format_csv_rows`` kernel of ``backend`` (the run's ``sites.backend``; None:
    ``STEMFAST_BACKEND`` or the fastest available; every backend writes the same bytes)."""

    CHUNK = 1 << 16  # rows formatted at a time

    def __init__(self, fh, *, backend: str | None = None) -> None:
        self.fh = fh
        self.backend = backend
        self.names: list[str] | None = None
        self.n_rows = 0
        self._warned = False

    def write(self, table) -> None:
        if table is None or len(table) == 0:
            return
        if self.names is None:
            self.names = column_order(table.names)
            self.fh.write(",".join(self.names) + "\n")
        n = len(table)
        extra = [c for c in table.names if c not in self.names]
        if extra and not self._warned:
            log.warning("sites.csv: columns %s of a later frame are not in the header; left out", extra)
            self._warned = True
        # formatted CHUNK rows at a time: strings for every cell of a 1.3M-site table at once took
        # ~3 GB (the 16k x 16k image's batch peaked at 5.4 GB in this step); the bytes are the same.
        # The compiled kernel formats the rows in parallel (Python's formatting of a 16k image's
        # 51M cells took ~15 s); every backend writes the same bytes (tests/test_batch.py)
        from ..backend import get_kernels

        kern = get_kernels(self.backend)
        arrays = [table[c] if c in table else None for c in self.names]
        empty = np.empty(0)
        for a in range(0, n, self.CHUNK):
            b = min(n, a + self.CHUNK)
            specs = [cell_spec(col[a:b], c) if col is not None else (empty, EMPTY, [])
                     for col, c in zip(arrays, self.names)]
            self.fh.write(kern.format_csv_rows(b - a, [s[0] for s in specs], [s[1] for s in specs],
                                               [s[2] for s in specs]))
        self.n_rows += n

    def finish(self) -> None:
        if self.names is None:
            self.names = list(LEADING_COLUMNS)
            self.fh.write(",".join(self.names) + "\n")
