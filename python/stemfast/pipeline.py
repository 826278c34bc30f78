"""One image through the whole pipeline: sites -> patches -> (model) -> classes and defect scores.

The stages are separate functions so the batch runner can train one model on patches pooled
from many images (``prepare`` every image, ``train_model`` once, ``analyze`` every image) and so
a Dask worker can run ``prepare`` + ``analyze`` for one file or frame with a shipped model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .analysis import analyze_sites
from .config import PipelineConfig
from .patches import LazyPatches, default_patch_size, extract_patches
from .sites import find_sites
from .table import SiteTable

__all__ = ["PipelineConfig", "Prepared", "prepare", "resample_patches", "resample_weights", "train_model", "analyze",
           "run_image"]

log = logging.getLogger(__name__)


#: ``prepare`` keeps the patches of an image in memory up to this many bytes; beyond, they are cut
#: on demand (:class:`~stemfast.patches.LazyPatches`) and ``analyze`` streams them in chunks, so a
#: 16k x 16k micrograph does not need 8 GB of patches.
MAX_PATCH_BYTES = 512 * 2**20
#: sites per chunk when ``analyze`` streams the patches of a large image
STREAM_CHUNK = 1 << 16


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
            max_patch_bytes: int | None = None) -> Prepared:
    """Find the sites of a 2-D ``image`` and cut a normalised patch around each.

    ``patch_size`` (px) fixes the patch size (e.g. the one a loaded model was trained with);
    otherwise ``config.patch_size`` or ``default_patch_size(spacing)``. Patches that would take more
    than ``max_patch_bytes`` (default :data:`MAX_PATCH_BYTES`) are not cut here but on demand
    (``Prepared.patches`` is then a :class:`~stemfast.patches.LazyPatches`).
    """
    timings: dict = {}
    table = find_sites(image, settings=config.sites, pixel_size=pixel_size, unit=unit, timings=timings)
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


@lru_cache(maxsize=32)
def _resample_weights_cached(size: int, out: int) -> np.ndarray:
    import torch

    from .model.functional import resample_patches as _resample

    # resample_patches is linear and separable (W P W^T): patch i, whose row i is all ones, comes out
    # as W[:, i] (x) (W 1); W 1 = 1 for an interpolator, and in general sqrt(sum_i of its diagonal)
    probe = torch.zeros((size, 1, size, size), dtype=torch.float64)
    probe[torch.arange(size), 0, torch.arange(size), :] = 1.0
    with torch.inference_mode():
        res = _resample(probe, out)[:, 0].numpy()  # [size, out, out]
    row_sum = np.sqrt(res[:, 0, 0].sum())
    w = np.ascontiguousarray(res[:, :, 0].T / row_sum)
    w.setflags(write=False)
    return w


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


def train_model(prepared: list[Prepared], *, config: PipelineConfig = PipelineConfig(), seed_sample: int = 0,
                init=None, steps: int = 0):
    """Train one model on patches pooled from ``prepared`` images (sampled to the model's budget).

    With ``init`` (e.g. the shipped model) that model is fine-tuned on the pool for ``steps``
    optimiser steps instead (:meth:`stemfast.model.RVAE.finetune`).
    """
    from .model import RVAE

    usable = [(p, np.flatnonzero(~p.edge)) for p in prepared if len(p.patches)]
    if not usable:
        raise ValueError("no patches to train on: no image had a lattice")
    sizes = {p.patches.shape[-1] for p, _ in usable}
    if len(sizes) > 1:
        raise ValueError(f"patch sizes differ between images: {sorted(sizes)}; set patch_size")
    # draw the training sample from the pooled indices first, then cut only those patches (the
    # patches of a large image are cut on demand)
    offsets = np.cumsum([0] + [len(idx) for _, idx in usable])
    pick = np.arange(offsets[-1])
    cap = getattr(config.model, "max_train_patches", None)
    if cap and len(pick) > cap:
        rng = np.random.default_rng(seed_sample)
        pick = np.sort(rng.choice(len(pick), cap, replace=False))
    allp = np.concatenate([np.asarray(p.patches[idx[pick[(pick >= lo) & (pick < hi)] - lo]])
                           for (p, idx), lo, hi in zip(usable, offsets[:-1], offsets[1:])])
    if init is not None:
        return init.finetune(allp, steps=steps)
    return RVAE.fit(allp, config.model)


def analyze(prep: Prepared, model, *, config: PipelineConfig = PipelineConfig()) -> tuple[SiteTable, dict]:
    """Encode the patches of ``prep`` with ``model``, cluster and score them.

    Returns the full site table (see :func:`stemfast.analysis.analyze_sites` for the columns) and
    a summary dict.
    """
    t0 = time.perf_counter()
    if len(prep.patches) == 0:
        return prep.sites, {"n_sites": 0, "status": prep.sites.meta.get("status", "no lattice")}
    if isinstance(prep.patches, LazyPatches):
        enc = _encode_streamed(model, prep.patches)
        gather_s = prep.patches.seconds
        prep.patches.seconds = 0.0
        prep.timings["patches"] = prep.timings.get("patches", 0.0) + gather_s
        prep.timings["encode"] = time.perf_counter() - t0 - gather_s
    else:
        enc = model.encode(prep.patches)
        prep.timings["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table, summary = analyze_sites(prep.sites, enc, settings=config.analysis, edge=prep.edge,
                                   rotation_symmetry=int(getattr(getattr(model, "config", None), "rotation_symmetry", 3)))
    prep.timings["analysis"] = time.perf_counter() - t0
    summary["timings_s"] = dict(prep.timings)
    return table, summary


def _encode_streamed(model, patches: LazyPatches, chunk: int | None = None):
    """``model.encode`` of lazily cut patches, ``chunk`` sites at a time (default :data:`STREAM_CHUNK`;
    memory: one chunk of patches)."""
    from .model.api import Encoding

    n = len(patches)
    chunk = int(chunk or STREAM_CHUNK)
    parts = [model.encode(patches[a:min(n, a + chunk)]) for a in range(0, n, chunk)]
    return Encoding(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in ("mu", "logvar", "angle", "recon_error",
                                                                            "angle_strength")})


def run_image(image: np.ndarray, *, model=None, config: PipelineConfig = PipelineConfig(),
              pixel_size: float | None = None, unit: str | None = "nm",
              train: bool = False) -> tuple[SiteTable, dict, object]:
    """Convenience: the whole pipeline on one image.

    The model is ``model`` when given, else the shipped default model
    (:func:`stemfast.model.shipped.default_model`), else -- with ``train=True``, or when the shipped
    model cannot be used (a warning says why) -- one trained on this image.
    """
    if model is None and not train:
        from .model.shipped import default_model

        model = default_model(config)
    patch_size = None
    if model is not None:
        patch_size = model.extra.get("patch_size") if getattr(model, "extra", None) else None
    prep = prepare(image, config=config, pixel_size=pixel_size, unit=unit, patch_size=patch_size)
    if model is None:
        model = train_model([prep], config=config)
    table, summary = analyze(prep, model, config=config)
    return table, summary, model
