"""numpy_ref backend of the stemfast kernels (contract: :mod:`stemfast._kernels`)."""
from .image import bandpass_apply, local_maxima, refine_com, refine_gauss
from .geometry import fit_local_lattices, gather_patches, gather_resampled
from .graph import propagate_labels
from .neighbors import knn_within, pairs_within
from .model import rvae_forward
from .references import local_references, neighbour_mean
from .text import format_csv_rows

__all__ = ["bandpass_apply", "local_maxima", "refine_com", "refine_gauss", "fit_local_lattices", "gather_patches",
           "gather_resampled", "knn_within", "pairs_within", "propagate_labels",
           "local_references", "neighbour_mean", "rvae_forward", "format_csv_rows"]
