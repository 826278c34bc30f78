"""Type stubs of stemfast._core, the private compiled kernels (C++17, pybind11).

Contract and NumPy reference: stemfast/_kernels/__init__.py and stemfast/_kernels/numpy_ref/.
"""
from typing import Sequence

import numpy as np
import numpy.typing as npt

#: the kernel contract this build implements (stemfast._kernels.CONTRACT_VERSION)
CONTRACT_VERSION: int

def get_num_threads() -> int:
    """Worker threads the kernels use (process-wide; hardware_threads() unless set)."""

def set_num_threads(n: int) -> None:
    """Set the kernels' worker threads, process-wide: n >= 1, or 0 for hardware_threads(); n < 0 raises
    ValueError. Results do not depend on it. Public API: stemfast.backend.kernel_threads."""

def hardware_threads() -> int:
    """std::thread::hardware_concurrency() (1 when unknown), the default thread count."""


def bandpass_apply(
    spec: npt.NDArray[np.complex64], height: int, width: int, noise_sigma: float, background_sigma: float, /
) -> None:
    """Multiply an rfft2 spectrum (writeable C-contiguous complex64[height, width // 2 + 1]) in place
    by exp(-2 pi^2 ns^2 f^2) * (1 - exp(-2 pi^2 bs^2 f^2)); ns <= 0 / bs <= 0 drop a factor."""

def local_maxima(image: npt.ArrayLike, radius: float, threshold: float, border: int, /) -> npt.NDArray[np.int64]:
    """(x, y) int64[N, 2], raster order, of the pixels above threshold that dominate their disc
    (later raster pixels strictly lower, earlier ones lower or equal). image: float32[H, W]."""

def refine_com(image: npt.ArrayLike, xy: npt.ArrayLike, radius: float, /) -> npt.NDArray[np.float64]:
    """Centre of mass of image - min over the disc around round(xy) -> float64[N, 2]."""

def refine_gauss(
    image: npt.ArrayLike, xy: npt.ArrayLike, radius: float, sigma0: float, n_iter: int, /
) -> npt.NDArray[np.float64]:
    """Levenberg-Marquardt fit of B + A exp(-r^2 / (2 s^2)) per site -> float64[N, 6]
    (x0, y0, A, s, B, ok)."""


def fit_local_lattices(
    xy: npt.NDArray[np.float64],
    neighbors: npt.NDArray[np.int64],
    basis0: npt.NDArray[np.float64],
    n_iter: int,
    outlier_tol: float,
    *,
    scalar: bool = False,
) -> tuple[
    npt.NDArray[np.float64],  # origin [N, 2]
    npt.NDArray[np.float64],  # basis [N, 2, 2]
    npt.NDArray[np.float64],  # rms [N]
    npt.NDArray[np.int64],  # n_used [N]
]: ...
def gather_patches(
    image: npt.NDArray[np.float32],
    xy: npt.NDArray[np.float64],
    size: int,
    fill: float,
    out: npt.NDArray[np.float32],
) -> npt.NDArray[np.uint8]: ...
def gather_resampled(
    image: npt.NDArray[np.float32],
    xy: npt.NDArray[np.float64],
    size: int,
    weights: npt.NDArray[np.float64],
    fill: float,
    center: float,
    scale: float,
    out: npt.NDArray[np.float32],
) -> npt.NDArray[np.uint8]:
    """gather_patches patches P, written as (W @ P @ W.T - center) / scale into out float32[N, M, M]."""

def knn_within(
    points: npt.NDArray[np.float64], queries: npt.NDArray[np.float64], k: int, radius: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Up to k nearest points strictly within radius of each query: (dist [M, k] inf-padded, idx [M, k] -1-padded)."""

def pairs_within(points: npt.NDArray[np.float64], radius: float) -> npt.NDArray[np.int64]:
    """Pairs (i, j), i < j, at most radius apart, sorted: int64[P, 2]."""

def propagate_labels(
    labels: npt.NDArray[np.int64],
    kids: npt.NDArray[np.int64],
    parents: npt.NDArray[np.int64],
    step: npt.NDArray[np.int64],
) -> None:
    """labels[kids[i]] = (labels[parents[i]] + step[i]) mod 3 for i in order, in place."""

def local_references(
    xy: npt.NDArray[np.float64],
    inv_basis: npt.NDArray[np.float64],
    values: npt.NDArray[np.float64],
    refable: npt.NDArray[np.bool_],
    rows: npt.NDArray[np.int64],
    k: int,
    tol: float,
) -> tuple[
    npt.NDArray[np.float64],  # median [M, 3]
    npt.NDArray[np.float64],  # mad [M, 3] (1.4826 x MAD)
    npt.NDArray[np.int64],  # count [M, 3]
    npt.NDArray[np.float64],  # reach [M]
]:
    """Per row site, statistics of its on-node neighbours among its k nearest by relative colour."""

def neighbour_mean(
    xy: npt.NDArray[np.float64], values: npt.NDArray[np.float64], k: int
) -> npt.NDArray[np.float64]:
    """Mean of values [N, L] over each site's k nearest sites (itself included), summed nearest first."""

def rvae_forward(
    x: npt.NDArray[np.float32],
    mask: npt.NDArray[np.float32],
    stn: tuple[npt.NDArray[np.float32], ...],
    enc: tuple[npt.NDArray[np.float32], ...],
    dec: tuple[npt.NDArray[np.float32], ...],
    symmetry: int,
    symmetrize: int,
    stn_downsample: int,
    background_rank: int,
    recon: npt.NDArray[np.float32],
) -> tuple[
    npt.NDArray[np.float32],  # mu [N, L]
    npt.NDArray[np.float32],  # logvar [N, L]
    npt.NDArray[np.float32],  # angle [N] (degrees; NaN without an STN)
    npt.NDArray[np.float32],  # angle_strength [N]
    npt.NDArray[np.float32],  # recon_error [N]
]:
    """Inference pass of the patch model on model inputs x [N, S, S] (weights as stemfast.model.engine prepares them)."""
def format_csv_rows(
    n_rows: int, columns: Sequence[npt.ArrayLike], kinds: Sequence[int], vocabs: Sequence[Sequence[str]], /
) -> str: ...
