"""stemfast: fast unsupervised atomic-lattice analysis and defect detection for atomic-resolution STEM.

The main entry points (imported lazily, so ``import stemfast`` stays light and does not load torch):

- :func:`stemfast.read` -- read a micrograph (TIFF, NPY, Nion .ndata; HDF5/DM3/DM4/EMD/SER/MRC with ``stemfast[io]``)
- :func:`stemfast.find_sites` -- every atomic column and every place a column should be
- :class:`stemfast.RVAE` -- rotation-invariant VAE on site patches (spatial transformer + VAE)
- :func:`stemfast.run_image` -- the whole pipeline on one image
- ``python -m stemfast batch DIR/`` -- the whole pipeline on a folder (see ``--help``)
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "read": ("stemfast.io", "read"),
    "Micrograph": ("stemfast.io", "Micrograph"),
    "ReadError": ("stemfast.io", "ReadError"),
    "find_sites": ("stemfast.sites", "find_sites"),
    "SiteSettings": ("stemfast.sites", "SiteSettings"),
    "SiteTable": ("stemfast.table", "SiteTable"),
    "find_peaks": ("stemfast.peaks", "find_peaks"),
    "fill_lattice": ("stemfast.lattice", "fill_lattice"),
    "LatticeSettings": ("stemfast.lattice", "LatticeSettings"),
    "extract_patches": ("stemfast.patches", "extract_patches"),
    "RVAE": ("stemfast.model", "RVAE"),
    "RVAEConfig": ("stemfast.model", "RVAEConfig"),
    "analyze_sites": ("stemfast.analysis", "analyze_sites"),
    "AnalysisSettings": ("stemfast.analysis", "AnalysisSettings"),
    "PipelineConfig": ("stemfast.pipeline", "PipelineConfig"),
    "run_image": ("stemfast.pipeline", "run_image"),
    "available_backends": ("stemfast.backend", "available_backends"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stemfast' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
