"""Small Numba helpers for graph walks over the site table (not part of the kernel contract)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def propagate_labels(labels, kids, par, step):  # pragma: no cover - compiled
    """labels[kids[i]] = (labels[par[i]] + step[i]) % 3, in order (parents come first)."""
    for i in range(kids.shape[0]):
        labels[kids[i]] = (labels[par[i]] + step[i]) % 3


__all__ = ["propagate_labels", "np"]
