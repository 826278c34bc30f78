"""The per-site table: named NumPy columns plus metadata, written as CSV or Parquet."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from .atomic import atomic_open, atomic_path

__all__ = ["SiteTable"]


@dataclass
class SiteTable:
    """Columns of equal length (``dict`` name -> 1-D array) and a metadata ``dict``.

    Coordinates are ``x`` (column) and ``y`` (row) in pixels with pixel centres at integers;
    ``x_nm``/``y_nm`` are added when the pixel size is known.

    Examples
    --------
    >>> t = SiteTable({"x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])})
    >>> len(t), t.xy.tolist()
    (2, [[1.0, 3.0], [2.0, 4.0]])
    """

    columns: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lens = {k: len(np.asarray(v)) for k, v in self.columns.items()}
        if len(set(lens.values())) > 1:
            raise ValueError(f"SiteTable columns differ in length: {lens}")
        self.columns = {k: np.asarray(v) for k, v in self.columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def xy(self) -> np.ndarray:
        """[N, 2] float64 array of (x, y)."""
        return np.stack([self.columns["x"], self.columns["y"]], axis=1).astype(np.float64)

    @property
    def basis(self) -> np.ndarray | None:
        """[N, 2, 2] float64 local lattice bases (rows ``a1``, ``a2``: columns ``a1x, a1y, a2x, a2y``);
        None when the table has no such columns."""
        if not all(c in self.columns for c in ("a1x", "a1y", "a2x", "a2y")):
            return None
        c = self.columns
        return np.stack([np.column_stack([c["a1x"], c["a1y"]]), np.column_stack([c["a2x"], c["a2y"]])],
                        axis=1).astype(np.float64)

    def with_columns(self, new: Mapping[str, Iterable], **meta) -> "SiteTable":
        """A new table with ``new`` columns added (or replaced) and ``meta`` merged."""
        cols = dict(self.columns)
        cols.update({k: np.asarray(v) for k, v in new.items()})
        return SiteTable(cols, {**self.meta, **meta})

    def select(self, mask_or_index) -> "SiteTable":
        return SiteTable({k: v[mask_or_index] for k, v in self.columns.items()}, dict(self.meta))

    @staticmethod
    def concat(tables: list["SiteTable"]) -> "SiteTable":
        if not tables:
            return SiteTable({})
        names = tables[0].names
        return SiteTable({k: np.concatenate([t.columns[k] for t in tables]) for k in names}, dict(tables[0].meta))

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.columns)

    def to_csv(self, path: str | os.PathLike, *, float_format: str = "%.8g") -> None:
        """Write the table as CSV, atomically (8 significant digits: 1e-3 px on a 16k image)."""
        names = self.names
        cols = [self.columns[k] for k in names]
        fmts = []
        for c in cols:
            if c.dtype.kind == "f":
                fmts.append(lambda v, f=float_format: f % v)
            elif c.dtype.kind == "b":
                fmts.append(lambda v: "1" if v else "0")
            else:
                fmts.append(str)
        with atomic_open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            for i in range(len(self)):
                w.writerow([fmt(c[i]) for fmt, c in zip(fmts, cols)])

    def to_parquet(self, path: str | os.PathLike) -> None:
        """Write the table as Parquet (needs ``pyarrow``: ``pip install stemfast[parquet]``), atomically."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("writing Parquet needs pyarrow: pip install 'stemfast[parquet]'") from exc
        import json

        tab = pa.table({k: v for k, v in self.columns.items()})
        tab = tab.replace_schema_metadata({b"stemfast": json.dumps(self.meta, default=str).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(tab, tmp)

    def write(self, path: str | os.PathLike) -> None:
        """Write as Parquet when ``path`` ends in ``.parquet``/``.pq``, else as CSV."""
        if str(path).lower().endswith((".parquet", ".pq")):
            self.to_parquet(path)
        else:
            self.to_csv(path)

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> "SiteTable":
        import pandas as pd

        df = pd.read_csv(path, keep_default_na=True)
        return cls({k: df[k].to_numpy() for k in df.columns})
