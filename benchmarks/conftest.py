"""Shared benchmark machinery: quick/full mode and the ratio-vs-baseline check CI relies on.

Every benchmark measures a *ratio* -- the reference's time over ours, both timed in the same
process on the same input -- because ratios survive a slower or busier machine where seconds do
not. ``check_ratio(name, ratio)`` records the ratio in pytest-benchmark's ``extra_info`` and fails
when it falls more than 30% below the committed baseline in ``benchmarks/baseline.json``.

Modes: quick (default; small inputs, what CI runs) and full (``STEMFAST_BENCH_FULL=1``; the
sizes the issues quote, e.g. 4096 x 4096 images and 1e6 lattice fits).
Update the baseline deliberately, in its own commit, with the reason:
``STEMFAST_BENCH_UPDATE=1 python -m pytest benchmarks`` rewrites the entries of the current mode.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

FULL = os.environ.get("STEMFAST_BENCH_FULL", "0") not in ("0", "", "false", "no")
# bench modules read STEMFAST_BENCH_QUICK; keep both names consistent
os.environ["STEMFAST_BENCH_QUICK"] = "0" if FULL else "1"
MODE = "full" if FULL else "quick"
BASELINE = Path(__file__).with_name("baseline.json")
TOLERANCE = 0.30  # fail when a ratio falls more than 30% below its baseline
_measured: dict[str, float] = {}


def best_time(fn, *, repeat: int = 3, min_time: float = 0.0) -> float:
    """Minimum wall time of ``fn()`` over ``repeat`` runs (min is the least noisy estimator)."""
    best = float("inf")
    t_start = time.perf_counter()
    n = 0
    while n < repeat or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
        if n >= 50:
            break
    return best


def paired_best_times(ours, reference, *, repeat: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Best wall times of ``ours()`` and ``reference()``, measured alternately (after ``warmup`` calls each).

    Alternating the two keeps a change of machine load (another process, CPU frequency) from
    landing on one side of a ratio only; the minimum of each is the least noisy estimator.
    """
    for _ in range(warmup):
        ours()
        reference()
    t_ours = t_ref = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        reference()
        t2 = time.perf_counter()
        t_ours, t_ref = min(t_ours, t1 - t0), min(t_ref, t2 - t1)
    return t_ours, t_ref


def gaussian_yardstick(image, sigma: float) -> float:
    """Best-of-3 time of ``scipy.ndimage.gaussian_filter(image, sigma)``: the machine-speed yardstick
    the end-to-end benchmarks divide by (single-threaded C, so a slower machine slows both sides)."""
    from scipy import ndimage

    return best_time(lambda: ndimage.gaussian_filter(image, sigma), repeat=3)


def truth_match(xy, truth, nn: float):
    """Match true sites ``truth`` [N, >=3] (x, y, sublattice, ...) to found sites ``xy``: returns the
    distance and index of each true site's nearest found site, and the recall of the atom sites
    (sublattice < 2) within 0.3 spacings."""
    from scipy.spatial import cKDTree

    d, j = cKDTree(xy).query(truth[:, :2])
    atoms = truth[:, 2] < 2
    return d, j, float((d[atoms] <= 0.3 * nn).mean())


def timed_pedantic(benchmark, fn, *, rounds: int, warmup_rounds: int = 0):
    """Run ``fn`` under pytest-benchmark's pedantic mode; return (its result, best wall time in s)."""
    times = []

    def run():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        return out

    result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return result, min(times)


def _load_baseline() -> dict:
    if BASELINE.exists():
        return json.loads(BASELINE.read_text())
    return {}


@pytest.fixture
def check_ratio(request):
    """``check_ratio(name, ratio, benchmark=None)``: record and compare a speed ratio to the baseline."""

    def check(name: str, ratio: float, benchmark=None, *, target: float | None = None) -> None:
        assert ratio > 0 and ratio == ratio, f"{name}: invalid ratio {ratio}"
        _measured[name] = float(ratio)
        if benchmark is not None:
            benchmark.extra_info["ratio"] = float(ratio)
            benchmark.extra_info["mode"] = MODE
            benchmark.extra_info["ratio_name"] = name
            if target is not None:
                benchmark.extra_info["target"] = target
        print(f"\n[ratio] {MODE} {name}: {ratio:.3g}" + (f" (issue target {target:g} in full mode)" if target else ""))
        if os.environ.get("STEMFAST_BENCH_UPDATE"):
            return
        base = _load_baseline().get(MODE, {}).get(name)
        if base is None and FULL:
            return  # full-size runs are measurements for people; CI gates on the quick baseline
        assert base is not None, (f"no {MODE} baseline for {name!r} (measured {ratio:.3g}): record one with "
                                  "STEMFAST_BENCH_UPDATE=1 and commit benchmarks/baseline.json")
        floor = (1.0 - TOLERANCE) * float(base)
        assert ratio >= floor, (f"speed regression in {name}: ratio {ratio:.3g} is more than "
                                f"{TOLERANCE:.0%} below the baseline {base:.3g} (floor {floor:.3g})")

    return check


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("STEMFAST_BENCH_UPDATE") and _measured:
        data = _load_baseline()
        data.setdefault(MODE, {}).update({k: round(v, 4) for k, v in _measured.items()})
        BASELINE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
