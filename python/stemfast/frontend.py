"""One image to the model's inputs: its sites (the lattice front end) and a normalised patch around each.

:func:`prepare` is the patch path every model sees -- at training (:mod:`stemfast.model.train_default`),
in the shipped model's input-contract probe (:mod:`stemfast.model.shipped`) and in the pipeline
(:mod:`stemfast.pipeline`, which re-exports these names). It sits below both, so the model package
checks its input contract without importing the pipeline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .config import PipelineConfig
from .patches import LazyPatches, default_patch_size, extract_patches
from .sites import companion_intensity, find_sites
from .table import SiteTable

__all__ = ["MAX_PATCH_BYTES", "Prepared", "prepare", "with_companion", "resample_patches", "resample_weights"]

log = logging.getLogger(__name__)


#: ``prepare`` keeps the patches of an image in memory up to this many bytes; beyond, they are cut
#: on demand (:class:`~stemfast.patches.LazyPatches`) and ``analyze`` streams them in chunks, so a
#: 16k x 16k micrograph does not need 8 GB of patches.
MAX_PATCH_BYTES = 512 * 2**20


@dataclass
class Prepared:
    """One 2-D image after the lattice front end: its sites and their patches.

    ``patches`` is a float32 [N, M, M] array (robust-normalised, resampled to the model's input
    size M), or -- for images whose patches would exceed :data:`MAX_PATCH_BYTES` -- a
    :class:`~stemfast.patches.LazyPatches` that cuts them on demand (same values; index it like the
    array).
    """

    image: np.ndarray
    sites: SiteTable
    patches: np.ndarray  # or LazyPatches (see the class docstring)
    edge: np.ndarray  # bool [N], patch touches the image border
    norm: object  # stemfast.patches.PatchNorm
    patch_size: int  # px in the image (before resampling)
    timings: dict


def prepare(image: np.ndarray, *, config: PipelineConfig = PipelineConfig(), pixel_size: float | None = None,
            unit: str | None = "nm", patch_size: int | None = None,
            max_patch_bytes: int | None = None, companion: np.ndarray | None = None) -> Prepared:
    """Find the sites of a 2-D ``image`` and cut a normalised patch around each.

    ``companion``: a second image of the same scan (another detector recorded at the same time, same
    shape); its column intensity at the sites becomes the ``companion_intensity`` column
    (:func:`stemfast.sites.companion_intensity`), and the defect scores average the two images' z.

    ``patch_size`` (px) fixes the patch size (e.g. the one a loaded model was trained with);
    otherwise ``config.patch_size`` or ``default_patch_size(spacing)``. Patches that would take more
    than ``max_patch_bytes`` (default :data:`MAX_PATCH_BYTES`) are not cut here but on demand
    (``Prepared.patches`` is then a :class:`~stemfast.patches.LazyPatches`).
    """
    timings: dict = {}
    table = find_sites(image, settings=config.sites, pixel_size=pixel_size, unit=unit, timings=timings)
    table = with_companion(table, companion, config.sites)
    t0 = time.perf_counter()
    size = patch_size or config.patch_size or (default_patch_size(table.meta["spacing_px"])
                                                if table.meta.get("status") == "ok" else 32)
    if len(table):
        out = int(getattr(config.model, "input_size", size) or size)
        # gather straight at the model's input size: the compiled gather applies resample_patches'
        # weights in the same pass (no size x size intermediate, no second pass over the patches)
        weights = resample_weights(size, out) if out != size else None
        budget = MAX_PATCH_BYTES if max_patch_bytes is None else int(max_patch_bytes)
        if len(table) * out * out * 4 > budget:
            patches = LazyPatches(image, table.xy, size=size, resample_weights=weights, backend=config.sites.backend)
            edge, norm = patches.edge, patches.norm
            log.info("%d patches (%.1f GB) are cut on demand", len(table), len(table) * out * out * 4 / 1e9)
        else:
            p = extract_patches(image, table.xy, size=size, backend=config.sites.backend, resample_weights=weights)
            patches, edge, norm = p.data, p.edge, p.norm
    else:
        patches = np.zeros((0, size, size), np.float32)
        edge = np.zeros(0, bool)
        norm = None
    timings["patches"] = time.perf_counter() - t0
    return Prepared(image=np.asarray(image), sites=table, patches=patches, edge=edge, norm=norm,
                    patch_size=int(size), timings=timings)


def with_companion(table: SiteTable, companion: np.ndarray | None, settings) -> SiteTable:
    """``table`` with the ``companion_intensity`` column of a second detector's image of the same scan
    (:func:`stemfast.sites.companion_intensity`); unchanged without one or without sites."""
    if companion is None or not len(table):
        return table
    return table.with_columns({"companion_intensity": companion_intensity(companion, table, settings=settings)})


def resample_patches(patches: np.ndarray, size: int, *, chunk: int = 32768) -> np.ndarray:
    """Resample [N, S, S] patches to [N, size, size] (antialiased bilinear), in chunks.

    Patches are cut at a size set by the lattice spacing (a fixed number of spacings), then
    resampled to the model's input size, so images of different magnification give comparable
    patches and one model serves them all.
    """
    import torch

    from .model.functional import resample_patches as _resample

    n = len(patches)
    out = np.empty((n, size, size), np.float32)
    with torch.inference_mode():
        for i in range(0, n, chunk):
            t = torch.from_numpy(np.ascontiguousarray(patches[i:i + chunk]))[:, None]
            out[i:i + chunk] = _resample(t, size)[:, 0].numpy()
    return out


def _aa_bilinear_weights(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights [out, size] of torch's antialiased bilinear ``interpolate`` along one axis (CPU, float64;
    the separable filter of :func:`stemfast.model.functional.resample_patches`), computed as ATen does
    (triangle filter stretched by the scale when downsampling, each row divided by its sum), and
    each row's sum as the kernel adds it up (left to right)."""
    scale = size / out
    support = scale if scale >= 1.0 else 1.0  # bilinear: half of an interpolation size of 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out, size))
    sums = np.zeros(out)
    for i in range(out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        n = min(int(centre + support + 0.5), size) - lo
        row = [max(0.0, 1.0 - abs(((j + lo) - centre + 0.5) * invscale)) for j in range(n)]
        total = 0.0
        for v in row:
            total += v
        if total != 0.0:
            row = [v / total for v in row]
        acc = row[0] if row else 0.0
        for v in row[1:]:
            acc += v
        w[i, lo:lo + n] = row
        sums[i] = acc
    return w, sums


@lru_cache(maxsize=32)
def _resample_weights_cached(size: int, out: int) -> np.ndarray:
    # resample_patches is linear and separable (W P W^T), rows first: patch i, whose row i is all ones,
    # comes out as W[:, i] (x) (W 1); W 1 = 1 for an interpolator, and in general sqrt(sum_i of its
    # diagonal) -- read off exactly as from torch's output, without importing torch (tests check
    # bit-identity with torch)
    w, sums = _aa_bilinear_weights(size, out)
    res = w.T[:, :, None] * sums[None, None, :]  # what resample_patches gives for the probe [size, out, out]
    row_sum = np.sqrt(res[:, 0, 0].sum())
    out_w = np.ascontiguousarray(res[:, :, 0].T / row_sum)
    out_w.setflags(write=False)
    return out_w


def resample_weights(size: int, out: int) -> np.ndarray:
    """Weights ``W`` [out, size] of :func:`resample_patches` from ``size`` to ``out`` px (read off the
    model's resampler, which is linear and separable: a patch ``P`` becomes ``W @ P @ W.T``).

    Examples
    --------
    >>> w = resample_weights(5, 5)  # same size: the identity
    >>> bool(np.allclose(w, np.eye(5)))
    True
    """
    return _resample_weights_cached(int(size), int(out))
