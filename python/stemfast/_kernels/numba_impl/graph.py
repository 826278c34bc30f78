"""Numba graph walks over the site table (contract: :mod:`stemfast._kernels`)."""
from __future__ import annotations

import numpy as np
from numba import njit

from ..numpy_ref.graph import check_label_indices


@njit(cache=True)
def _propagate_labels(labels, kids, parents, step):  # pragma: no cover - compiled
    for i in range(kids.shape[0]):
        labels[kids[i]] = (labels[parents[i]] + step[i]) % 3


def propagate_labels(labels, kids, parents, step) -> None:
    """labels[kids[i]] = (labels[parents[i]] + step[i]) % 3, in order (parents come first); an index
    outside ``[0, len(labels))`` is a ValueError (the compiled loop does not check)."""
    check_label_indices(len(labels), kids, parents, step)
    _propagate_labels(labels, np.asarray(kids), np.asarray(parents), np.asarray(step))


__all__ = ["propagate_labels"]
