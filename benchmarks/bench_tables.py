"""Benchmark of ``sites.csv`` writing (:class:`stemfast.batch.tables.CsvStream`).

Reported, not gated (``report_ratio``; CPU time, one thread, paired like the gates):

* ``csv_format_vs_np_char_mod``: the cells of a site table the shape of a 1024^2 image's (~5k sites,
  the 38 columns of ``sites.csv``: floats, ints, bools, strings) formatted by
  :func:`stemfast.batch.tables.format_column` against the formatting it replaced
  (``np.char.mod`` for floats, ``astype(str)`` for ints; kept below). Asserted alongside: the same
  strings, cell for cell (NaN, infinities, float32 and float64 included).
  Not gated: both sides are Python-level string formatting, so the ratio is
  stable (2.5x measured under load), but a gate would guard two lines of string formatting rather than a kernel.
"""
from __future__ import annotations

import os

import numpy as np

from stemfast.batch.tables import COORD_COLUMNS, format_column

from conftest import MIN_CPU, paired_times

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")


def _table(n: int) -> dict[str, np.ndarray]:
    """Columns like those of sites.csv: coordinates, float32 / float64 values with NaN and inf, ints, bools."""
    rng = np.random.default_rng(0)
    cols: dict[str, np.ndarray] = {"frame": np.zeros(n, np.int64), "x": rng.uniform(0, 1024, n),
                                   "y": rng.uniform(0, 1024, n), "class_id": rng.integers(-1, 3, n),
                                   "is_defect": rng.random(n) < 0.05, "fit_ok": rng.random(n) < 0.9,
                                   "lattice_i": rng.integers(-80, 80, n), "lattice_j": rng.integers(-80, 80, n)}
    for i in range(24):
        v = rng.normal(0, 10.0 ** rng.integers(-4, 4), n).astype(np.float32 if i % 2 else np.float64)
        v[rng.random(n) < 0.02] = np.nan
        v[0] = np.inf if i % 3 == 0 else v[0]
        cols[f"value_{i}"] = v
    return cols


def _format_column_reference(a: np.ndarray, name: str) -> list[str]:
    """The formatting ``format_column`` used before (NumPy's string functions), for numeric columns."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return np.char.mod("%.8g" if name in COORD_COLUMNS else "%.6g", a).tolist()
    if a.dtype.kind == "b":
        return np.where(a, "1", "0").tolist()
    return a.astype(str).tolist()


def test_csv_format_speed(benchmark, report_ratio):
    cols = _table(2_000 if QUICK else 20_000)

    def ours():
        return [format_column(v, k) for k, v in cols.items()]

    def reference():
        return [_format_column_reference(v, k) for k, v in cols.items()]

    a, b = paired_times(ours, reference, repeat=5, warmup=1, min_cpu=MIN_CPU)
    report_ratio("csv_format_vs_np_char_mod", b.cpu / a.cpu, benchmark,
                 meaning="sites.csv cells: str.__mod__ over Python values vs np.char.mod / astype(str) (CPU)")
    assert a.result == b.result  # the same cells, every one


def test_csv_rows_compiled_vs_python(benchmark, speed_gate):
    """``format_csv_rows`` (C++, one thread here, like the reference) against the NumPy-reference
    backend's Python formatting, on rows like sites.csv's (gated: ``csv_rows_cpp_vs_python``); the
    same text asserted alongside. A 16k image's 1.3M rows took ~15 s of Python formatting."""
    from stemfast.backend import available_backends, get_kernels
    from stemfast.batch.tables import cell_spec

    if "cpp" not in available_backends():
        import pytest

        pytest.skip("the C++ extension is not built")
    cols = _table(5_000 if QUICK else 50_000)
    cols["defect_kind"] = np.array(["none", "vacancy_S", "substitution_S"])[np.arange(len(cols["x"])) % 3]
    specs = [cell_spec(v, k) for k, v in cols.items()]
    args = (len(cols["x"]), [s[0] for s in specs], [s[1] for s in specs], [s[2] for s in specs])
    cpp, ref = get_kernels("cpp"), get_kernels("numpy")
    info = speed_gate("csv_rows_cpp_vs_python", lambda: cpp.format_csv_rows(*args), lambda: ref.format_csv_rows(*args),
                      benchmark, repeat=3)
    assert info["result_ours"] == info["result_reference"]
    benchmark.extra_info.update(n_rows=args[0], n_columns=len(specs))
