"""One image through the whole pipeline: sites -> patches -> (model) -> classes and defect scores.

The stages are separate functions so the batch runner can train one model on patches pooled
from many images (``prepare`` every image, ``train_model`` once, ``analyze`` every image) and so
a Dask worker can run ``prepare`` + ``analyze`` for one file or frame with a shipped model.
The first stage, ``prepare`` (sites and patches), lives in :mod:`stemfast.frontend` (below the
model package, whose input-contract check runs it) and is re-exported here.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from .analysis import analyze_sites
from .backend import one_blas_thread
from .config import PipelineConfig
from .frontend import MAX_PATCH_BYTES, Prepared, prepare, resample_patches, resample_weights  # noqa: F401
from .logutil import StageTimings
from .patches import LazyPatches
from .table import SiteTable

__all__ = ["PipelineConfig", "Prepared", "prepare", "resample_patches", "resample_weights", "train_model", "analyze",
           "model_input_size", "run_image"]

log = logging.getLogger(__name__)


#: sites per chunk when ``analyze`` streams the patches of a large image
STREAM_CHUNK = 1 << 16


def model_input_size(model) -> int | None:
    """The patch size (px) ``model`` encodes (its settings' ``input_size``), None for no model: what
    :func:`prepare` resamples the patches to for it (``input_size``) and :func:`analyze` checks."""
    return getattr(getattr(model, "config", None), "input_size", None)


def train_model(prepared: list[Prepared], *, config: PipelineConfig = PipelineConfig(), seed_sample: int = 0,
                init=None, steps: int = 0, patch_extent: dict | None = None):
    """Train one model on patches pooled from ``prepared`` images (sampled to the model's budget).

    With ``init`` (e.g. the shipped model) that model is fine-tuned on the pool for ``steps``
    optimiser steps instead (:meth:`stemfast.model.RVAE.finetune`).

    A trained model records how its patches were cut (:mod:`stemfast.patchextent`): each image by its
    own spacing (``Prepared.patch_size`` = ``default_patch_size`` of the image's spacing; images of
    different magnification pooled), then ``run_image`` and ``batch`` cut every image by its own
    spacing for it; or at one fixed size (``config.patch_size``, or ``prepare``'s ``patch_size``),
    recorded as ``extra["patch_size"]`` and cut at for every image (ValueError for images cut at
    different fixed sizes). ``patch_extent``: the record (:func:`stemfast.patchextent.extent_record`)
    where ``prepared`` cannot tell (one pool of many images' patches).
    """
    from .model import RVAE

    usable = [(p, np.flatnonzero(~p.edge)) for p in prepared if len(p.patches)]
    if not usable:
        raise ValueError("no patches to train on: no image had a lattice")
    record = None if init is not None else (patch_extent or _cut_record([p for p, _ in usable], config))
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
    return RVAE.fit(allp, config.model, extra={"patch_size": record["patch_px"], "patch_extent": record})


def _cut_record(prepared: list[Prepared], config: PipelineConfig) -> dict:
    """How ``prepared`` were cut (:func:`stemfast.patchextent.extent_record`): per image when no
    ``patch_size`` setting fixed a size and every image was cut at its spacing's default size, else at
    the one fixed size they share (ValueError when they do not share one)."""
    from .patchextent import cut_of, extent_record
    from .patches import default_patch_size

    cuts = [cut_of(p) for p in prepared]
    per_image = not config.patch_size and all(s is not None and p == default_patch_size(s) for p, s in cuts)
    sizes = {p for p, _ in cuts}
    if not per_image and len(sizes) > 1:
        raise ValueError(f"the images' patches were cut at different sizes ({sorted(sizes)} px), not each by its own "
                         "spacing: set one patch_size (the settings' or prepare's), or none to cut every image "
                         "by its own spacing")
    record = extent_record([p for p, _ in cuts], [s for _, s in cuts], None if per_image else sizes.pop())
    if record.get("warning"):
        log.warning("training: %s", record["warning"])
    return record


def analyze(prep: Prepared, model, *, config: PipelineConfig = PipelineConfig()) -> tuple[SiteTable, dict]:
    """Encode the patches of ``prep`` with ``model``, cluster and score them.

    Returns the full site table (see :func:`stemfast.analysis.analyze_sites` for the columns) and
    a summary dict. Every kernel runs on the backend ``config.sites.backend`` names (the one setting
    of the run, as in :func:`prepare`), the compiled model engine's included
    (:func:`stemfast.model.engine.on_backend`).
    """
    try:
        with one_blas_thread():  # the stages' parallelism is the kernels' own threads (backend.one_blas_thread)
            return _analyze(prep, model, config)
    finally:
        if isinstance(prep.timings, StageTimings):  # its bar ends with the image (done or failed)
            prep.timings.close()


def _analyze(prep: Prepared, model, config: PipelineConfig) -> tuple[SiteTable, dict]:
    t0 = time.perf_counter()
    if len(prep.patches) == 0:
        return prep.sites, {"n_sites": 0, "status": prep.sites.meta.get("status", "no lattice")}
    from .model.engine import on_backend, on_device

    want = model_input_size(model)
    if want is not None and int(prep.patches.shape[-1]) != int(want):
        raise ValueError(f"the patches were prepared at {prep.patches.shape[-1]} px but the model takes {want} px "
                         f"patches: set model.input_size = {want} in the settings (the model's), or prepare with "
                         f"input_size={want}")
    model = on_device(model, config.model.device)  # one loaded elsewhere (a model file, another process's)
    model = on_backend(model, config.sites.backend)  # the compiled engine's kernels: the run's backend
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
                                   rotation_symmetry=int(getattr(getattr(model, "config", None), "rotation_symmetry", 3)),
                                   backend=config.sites.backend)
    prep.timings["analysis"] = time.perf_counter() - t0
    summary.update(_extent_summary(prep, model, config))
    summary["timings_s"] = dict(prep.timings)
    return table, summary


def _extent_summary(prep: Prepared, model, config: PipelineConfig) -> dict:
    """``{"patch_extent": ..., "patch_warning": text}`` (and the warning given) where ``prep`` was cut at a
    fixed size that spans another number of site spacings than ``model``'s patches at training
    (:func:`stemfast.patchextent.extent_note`); ``{}`` otherwise."""
    import warnings

    from .patchextent import PatchExtentWarning, cut_of, extent_note, plan_for

    note = extent_note(plan_for(model, config), *cut_of(prep))
    if note is None:
        return {}
    warnings.warn(note["warning"], PatchExtentWarning, stacklevel=4)
    return {"patch_extent": {k: v for k, v in note.items() if k != "warning"}, "patch_warning": note["warning"]}


def _encode_streamed(model, patches: LazyPatches, chunk: int | None = None):
    """``model.encode`` of lazily cut patches, ``chunk`` sites at a time (default :data:`STREAM_CHUNK`;
    memory: one chunk of patches)."""
    from .model.settings import Encoding

    n = len(patches)
    chunk = int(chunk or STREAM_CHUNK)
    parts = [model.encode(patches[a:min(n, a + chunk)]) for a in range(0, n, chunk)]
    return Encoding(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in ("mu", "logvar", "angle", "recon_error",
                                                                            "angle_strength")})


def run_image(image: np.ndarray, *, model=None, config: PipelineConfig = PipelineConfig(),
              pixel_size: float | None = None, unit: str | None = "nm",
              train: bool = False, companion: np.ndarray | None = None,
              companion_higher: bool | None = None) -> tuple[SiteTable, dict, object]:
    """Convenience: the whole pipeline on one image.

    The model is ``model`` when given, else the shipped default model
    (:func:`stemfast.model.shipped.default_model`; on the compiled engine, without torch, as
    ``model.engine`` says), else -- with ``train=True``, or when the shipped
    model cannot be used (a warning says why) -- one trained on this image. ``companion``: a second
    detector's image of the same scan; ``companion_higher``: whether it was recorded at higher angles
    than ``image`` (None: not known; :func:`stemfast.frontend.prepare`).

    A given model gets patches cut as it was trained (:func:`stemfast.patchextent.plan_for`: by each
    image's spacing, or at the fixed size it records, ``extra["patch_size"]``) and resampled to its own
    ``input_size`` (whatever ``config.model`` says). An image without a lattice gives
    :func:`analyze`'s empty result (its ``status`` says why), with the model None when one was to be trained.
    A ``config`` that is not a ``PipelineConfig`` or a ``model`` that is not a model (a file name) is a TypeError.
    """
    from ._validate import check_type

    check_type("config", config, PipelineConfig, "stemfast.config.load_config(path, {'model.epochs': 3, ...})")
    if model is not None and (isinstance(model, (str, bytes, os.PathLike)) or not hasattr(model, "encode")):
        raise TypeError(f"model must be a loaded model (stemfast.batch.load_model(path)) or None, got "
                        f"{type(model).__name__} {model!r}"[:300])
    if model is None and not train:
        from .model.shipped import shipped_for_run

        model = shipped_for_run(config)
    from .patchextent import plan_for

    input_size = model_input_size(model) if model is not None else None
    prep = prepare(image, config=config, pixel_size=pixel_size, unit=unit, patch_size=plan_for(model, config).fixed_px,
                   companion=companion,
                   input_size=input_size, companion_higher=companion_higher)
    if model is None and len(prep.patches):
        model = train_model([prep], config=config)
    table, summary = analyze(prep, model, config=config)
    return table, summary, model
