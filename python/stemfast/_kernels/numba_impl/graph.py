"""Numba graph walks over the site table (contract: :mod:`stemfast._kernels`)."""
from __future__ import annotations

from numba import njit


@njit(cache=True)
def propagate_labels(labels, kids, parents, step):  # pragma: no cover - compiled
    """labels[kids[i]] = (labels[parents[i]] + step[i]) % 3, in order (parents come first)."""
    for i in range(kids.shape[0]):
        labels[kids[i]] = (labels[parents[i]] + step[i]) % 3


__all__ = ["propagate_labels"]
