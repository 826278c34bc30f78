"""Figure plumbing shared by the report and the tracking figures: matplotlib on the Agg backend, the
grey-level range of an image, atomic PNG writes."""
from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_path

__all__ = ["pyplot", "display_range", "tight_layout", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # pragma: no cover - a backend already in use by the application
            pass
    import matplotlib.pyplot as plt

    return plt


def display_range(image: np.ndarray) -> tuple[float, float]:
    """Robust grey-level range (0.5th and 99.5th percentiles) for showing ``image``."""
    a = np.asarray(image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max()) + 1e-12
    return float(lo), float(hi)


def tight_layout(fig) -> None:
    """Lay ``fig`` out as ``fig.tight_layout()`` does, without leaving a layout engine behind.

    ``Figure.tight_layout`` leaves a placeholder layout engine on the figure, and ``savefig`` then
    draws the whole figure once more (without rendering) before the real draw: for the class map of
    a 1024^2 image that dry run (image resampling, ~5k markers, text layout) was a third of the
    figure's time. The subplot parameters set here are the same, so are the pixels.
    """
    from matplotlib.layout_engine import TightLayoutEngine

    TightLayoutEngine().execute(fig)


#: zlib level of the PNGs: at level 1 they come out ~1.3x larger and encode ~5x faster (at the default
#: level 6 encoding was the largest single cost of the figures); the pixels are identical
PNG_COMPRESS_LEVEL = 1


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    finally:
        plt.close(fig)
