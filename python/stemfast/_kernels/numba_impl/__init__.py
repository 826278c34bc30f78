"""numba_impl backend of the stemfast kernels (contract: :mod:`stemfast._kernels`)."""
from .image import bandpass_apply, local_maxima, refine_com, refine_gauss
from .geometry import fit_local_lattices, gather_patches

__all__ = ["bandpass_apply", "local_maxima", "refine_com", "refine_gauss", "fit_local_lattices", "gather_patches"]
