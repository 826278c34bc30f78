"""Reference of the ``format_csv_rows`` kernel (contract: :mod:`stemfast._kernels`)."""
from __future__ import annotations

import numpy as np

#: cell kinds of format_csv_rows
F8, F6, INT, BOOL, CODE, EMPTY = range(6)


def format_cells(n_rows: int, col, kind: int, vocab) -> list[str]:
    """The ``n_rows`` cells of one column (one kind of :func:`format_csv_rows`)."""
    if kind in (F8, F6):
        return list(map(("%.8g" if kind == F8 else "%.6g").__mod__, np.asarray(col, np.float64).tolist()))
    if kind == INT:
        return list(map(str, np.asarray(col, np.int64).tolist()))
    if kind == BOOL:
        return np.where(np.asarray(col) != 0, "1", "0").tolist()
    if kind == CODE:
        return [vocab[i] for i in np.asarray(col, np.int64).tolist()]
    return [""] * n_rows


def format_csv_rows(n_rows, columns, kinds, vocabs) -> str:
    cells = [format_cells(n_rows, col, kind, voc) for col, kind, voc in zip(columns, kinds, vocabs)]
    if not cells:
        return "\n" * n_rows
    return "".join(",".join(row) + "\n" for row in zip(*cells))
