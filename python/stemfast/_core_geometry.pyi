# Stub section of stemfast._core for the geometry kernels (lattice.cpp, patches.cpp); merged by the lead
# into _core.pyi. Contract: stemfast/_kernels/__init__.py.
import numpy as np
import numpy.typing as npt

def fit_local_lattices(
    xy: npt.NDArray[np.float64],
    neighbors: npt.NDArray[np.int64],
    basis0: npt.NDArray[np.float64],
    n_iter: int,
    outlier_tol: float,
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
