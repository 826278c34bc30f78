"""Synthetic 2H monolayer data with exact ground truth: the package's test patterns.

- :mod:`~stemfast.synthetic.image`: HAADF micrographs (:func:`make_mos2`, :func:`make_lattice`,
  :func:`save_example`) and the one Z-contrast intensity model of the columns
  (:func:`chalcogen_pair_intensity`: S2 / Mo = 2 (Z_S / Z_Mo)^1.7 = 0.388 for MoS2).
- :mod:`~stemfast.synthetic.series`: drifting time series with moving defects (:func:`make_series`).
- :mod:`~stemfast.synthetic.patches`: site-centred patches rendered directly, with the same
  intensity model (:func:`render_site_patches`), for the model's tests and benchmarks.

Examples
--------
>>> from stemfast.synthetic import make_mos2
>>> s = make_mos2(shape=(96, 96), seed=0)
>>> s.image.shape, s.truth.shape[1]
((96, 96), 4)
"""
from __future__ import annotations

from .image import (DEFECT_NAMES, MIN_SIDE, SUBLATTICE_NAMES, SynthConfig, SynthImage, chalcogen_atom_intensity,
                    chalcogen_pair_intensity, load_truth, make_lattice, make_mos2, render_gaussians, save_example,
                    save_truth)
from .patches import SITE_TYPES, render_site_patches
from .series import SeriesConfig, SynthSeries, load_series_truth, make_series

__all__ = ["SynthConfig", "SynthImage", "make_mos2", "make_lattice", "save_example", "save_truth", "load_truth",
           "MIN_SIDE", "render_gaussians", "SUBLATTICE_NAMES", "DEFECT_NAMES", "chalcogen_atom_intensity",
           "chalcogen_pair_intensity", "SeriesConfig", "SynthSeries", "make_series", "load_series_truth",
           "SITE_TYPES", "render_site_patches"]
