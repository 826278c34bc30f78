"""Sideways wobble of the scan lines: a periodic shift along x from line to line, measured against
the lattice.

Mains interference or a vibration of the stage or the scan coils moves the beam along the fast
scan direction (x) as the lines are scanned: line ``y`` is recorded shifted by ``dx(y)``, a wave
with a period of some lines. The columns then zig-zag, and where they are read off-centre they
read darker or brighter than their sublattice (on the labelled WSe2 scan at 5 px spacing, a 1 px
wobble every 37 lines took the defect AP from 0.80 to 0.71 on HAADF and made the MAADF image's
sublattice names look swapped). A wave shorter than the phase map's smoothing stays in each column's
offset from its node (:func:`stemfast.sitelattice.node_residuals`); averaged over the columns of each
line, that is ``dx(y)`` with far less noise than any one column. Its strongest periodic component
(periods of :data:`MIN_PERIOD_LINES` lines to a quarter of the image) against the median one is
the measure; the phase map follows part of a longer wave, so the amplitude is a lower bound.

This is a diagnostic: the wobble is said (``lattice.scan_wobble`` in ``summary.json``, a
:class:`ScanWobbleWarning`), not undone.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ScanWobbleWarning", "line_wobble", "WOBBLE_MIN_NN", "WOBBLE_MIN_SNR", "MIN_PERIOD_LINES"]

#: a wobble is said when its amplitude reaches this share of the site spacing ...
WOBBLE_MIN_NN = 0.05
#: ... and this many times the median amplitude of the other periods (sound real scans: <= 5.2)
WOBBLE_MIN_SNR = 8.0
#: the shortest period looked for (lines): a column spans a few lines and averages a faster wave out
MIN_PERIOD_LINES = 6


class ScanWobbleWarning(UserWarning):
    """The scan lines wobble sideways (:func:`line_wobble`)."""


def line_wobble(residual_x: np.ndarray, y: np.ndarray, height: int, spacing: float) -> dict:
    """The strongest periodic sideways shift of the scan lines.

    Parameters
    ----------
    residual_x : float [N], each column's x offset from its node (px;
        :func:`stemfast.sitelattice.node_residuals`).
    y : float [N], the columns' rows (px).
    height : the image's number of lines.
    spacing : the site spacing (px).

    Returns
    -------
    dict
        ``amplitude_px`` (of the strongest component, a lower bound), ``amplitude_nn`` (in site
        spacings), ``period_lines``, ``snr`` (its amplitude over the median of the others), and a
        ``warning`` when it reaches :data:`WOBBLE_MIN_NN` and :data:`WOBBLE_MIN_SNR`; ``{}`` when too
        few lines hold columns to tell.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.uniform(0, 512, 8000)
    >>> dx = 0.6 * np.sin(2 * np.pi * y / 37) + rng.normal(0, 0.3, 8000)
    >>> w = line_wobble(dx, y, 512, 5.0)
    >>> round(w["period_lines"]), round(w["amplitude_px"], 1), "warning" in w
    (37, 0.6, True)
    >>> "warning" in line_wobble(rng.normal(0, 0.3, 8000), y, 512, 5.0)
    False
    """
    H = int(height)
    rx = np.asarray(residual_x, np.float64)
    row = np.clip(np.round(np.asarray(y, np.float64)).astype(np.int64), 0, max(H - 1, 0))
    n = np.bincount(row, minlength=H)
    held = n > 0
    if H < 4 * MIN_PERIOD_LINES or held.sum() < 16:
        return {}
    # at coarse sampling few lines hold a column's centre: no period shorter than three of their gaps
    shortest = max(float(MIN_PERIOD_LINES), 3.0 * H / held.sum())
    prof = np.bincount(row, rx, minlength=H)[held] / n[held]
    lines = np.arange(H)
    p = np.interp(lines, lines[held], prof)
    p -= p.mean()
    amp = np.abs(np.fft.rfft(p)) * 2.0 / H
    freq = np.fft.rfftfreq(H)
    band = (freq >= 4.0 / H) & (freq <= 1.0 / shortest)
    if band.sum() < 3:
        return {}
    k = int(np.argmax(np.where(band, amp, -1.0)))
    floor = float(np.median(amp[band]))
    a = float(amp[k])
    out = {"amplitude_px": round(a, 3), "amplitude_nn": round(a / spacing, 4),
           "period_lines": round(1.0 / float(freq[k]), 1), "snr": round(a / floor, 1) if floor > 0 else float("inf")}
    if a >= WOBBLE_MIN_NN * spacing and (floor == 0 or a >= WOBBLE_MIN_SNR * floor):
        out["warning"] = (f"the scan lines wobble sideways: a shift along x of at least {a:.2f} px "
                          f"({a / spacing:.2f} spacings) every {out['period_lines']:.0f} lines (mains interference, "
                          "a vibration of the stage or the scan coils): the columns zig-zag with it, and their "
                          "intensities and the defect scores are less sure")
    return out
