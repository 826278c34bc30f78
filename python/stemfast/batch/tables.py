"""The per-input site table ``sites.csv``: column order, number formats, frame-by-frame streaming."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

__all__ = ["LEADING_COLUMNS", "CALIBRATED_COLUMNS", "COORD_COLUMNS", "column_order", "format_column", "CsvStream"]

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


def format_column(a: np.ndarray, name: str) -> list[str]:
    """The CSV cells of one column (coordinates with 8 significant digits, other floats 6)."""
    a = np.asarray(a)
    # ``str.__mod__`` mapped over the Python values: the same bytes as ``np.char.mod`` /
    # ``astype(str)`` (a float32 becomes the Python float of the same value either way), ~2.5x faster
    # (``benchmarks/bench_tables.py``); writing sites.csv of a 1024^2 image (38 columns) took 0.8 s
    if a.dtype.kind == "f":
        return list(map(("%.8g" if name in COORD_COLUMNS else "%.6g").__mod__, a.tolist()))
    if a.dtype.kind == "b":
        return np.where(a, "1", "0").tolist()
    if a.dtype.kind in "iu":
        return list(map(str, a.tolist()))
    out = []
    for v in a.tolist():
        s = str(v)
        if any(ch in s for ch in ',"\n\r'):
            s = '"' + s.replace('"', '""') + '"'
        out.append(s)
    return out


class CsvStream:
    """Writes site tables frame after frame into one CSV (header from the first non-empty table)."""

    CHUNK = 1 << 16  # rows formatted at a time

    def __init__(self, fh) -> None:
        self.fh = fh
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
        # ~3 GB (the 16k x 16k image's batch peaked at 5.4 GB in this step); the bytes are the same
        arrays = [table[c] if c in table else None for c in self.names]
        for a in range(0, n, self.CHUNK):
            b = min(n, a + self.CHUNK)
            cols = [format_column(col[a:b], c) if col is not None else [""] * (b - a)
                    for col, c in zip(arrays, self.names)]
            self.fh.write("".join(",".join(row) + "\n" for row in zip(*cols)))
        self.n_rows += n

    def finish(self) -> None:
        if self.names is None:
            self.names = list(LEADING_COLUMNS)
            self.fh.write(",".join(self.names) + "\n")
