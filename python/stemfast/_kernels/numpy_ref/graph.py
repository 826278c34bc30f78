"""NumPy reference of the graph walks over the site table (contract: :mod:`stemfast._kernels`)."""
from __future__ import annotations

import numpy as np


def propagate_labels(labels: np.ndarray, kids: np.ndarray, parents: np.ndarray, step: np.ndarray) -> None:
    """``labels[kids[i]] = (labels[parents[i]] + step[i]) % 3`` for i = 0, 1, ... in order, in place.

    The order matters: in a breadth-first walk every parent is labelled before its children.

    Examples
    --------
    >>> labels = np.array([0, -1, -1], np.int64)
    >>> propagate_labels(labels, np.array([1, 2]), np.array([0, 1]), np.array([2, 2]))
    >>> labels.tolist()
    [0, 2, 1]
    """
    check_label_indices(len(labels), kids, parents, step)
    for k, p, s in zip(kids.tolist(), parents.tolist(), step.tolist()):
        labels[k] = (labels[p] + s) % 3


def check_label_indices(n: int, kids: np.ndarray, parents: np.ndarray, step: np.ndarray) -> None:
    """ValueError unless ``kids``, ``parents`` and ``step`` have one length and every index lies in
    ``[0, n)`` (the contract's check, as the C++ kernel makes it)."""
    if not len(kids) == len(parents) == len(step):
        raise ValueError("propagate_labels: kids, parents and step must have one length")
    for name, a in (("kids", kids), ("parents", parents)):
        a = np.asarray(a)
        if a.size and (int(a.min()) < 0 or int(a.max()) >= n):
            raise ValueError(f"propagate_labels: {name} out of range [0, {n})")


__all__ = ["propagate_labels"]
