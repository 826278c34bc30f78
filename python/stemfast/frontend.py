"""One image to the model's inputs: its sites (the lattice front end) and a normalised patch around each.

:func:`prepare` is the patch path every model sees -- at training (:mod:`stemfast.model.train_default`),
in the shipped model's input-contract probe (:mod:`stemfast.model.shipped`) and in the pipeline
(:mod:`stemfast.pipeline`, which re-exports these names). It sits below both, so the model package
checks its input contract without importing the pipeline.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from .config import PipelineConfig
from .contrast import inverted
from .logutil import StageTimings, progress_mode
from .pairnaming import names_contradicted
from .patches import LazyPatches, default_patch_size, extract_patches, resample_weights
from .scanlines import levelled_image
from .sites import companion_intensity, find_sites
from .table import SiteTable

__all__ = ["MAX_PATCH_BYTES", "Prepared", "prepare", "with_companion", "named_with_companion", "resample_patches",
           "resample_weights"]

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
            max_patch_bytes: int | None = None, companion: np.ndarray | None = None,
            input_size: int | None = None, companion_higher: bool | None = None) -> Prepared:
    """Find the sites of a 2-D ``image`` and cut a normalised patch around each (from the image with the
    scan lines and parts of lines that ``find_sites`` found off levelled: :func:`stemfast.scanlines.levelled_image`).

    ``companion``: a second image of the same scan (another detector recorded at the same time, same
    shape); its column intensity at the sites becomes the ``companion_intensity`` column
    (:func:`stemfast.sites.companion_intensity`), and the defect scores weigh the two images' z together
    (:func:`stemfast.analysis.detector_weights`). ``companion_higher``: the companion was recorded at
    higher (True) or lower (False) angles than ``image`` (None: not known); where it shows the
    sublattice names impossible, the image is named the other way (:func:`named_with_companion`).

    ``patch_size`` (px) fixes the patch size (e.g. the one a loaded model was trained with);
    otherwise ``config.patch_size`` or ``default_patch_size(spacing)``. ``input_size`` (px): the size
    the patches are resampled to, that of the model that will encode them (default
    ``config.model.input_size``; :func:`stemfast.pipeline.analyze` refuses patches of another size
    than its model's). Patches that would take more
    than ``max_patch_bytes`` (default :data:`MAX_PATCH_BYTES`) are not cut here but on demand
    (``Prepared.patches`` is then a :class:`~stemfast.patches.LazyPatches`).
    """
    timings = _stage_timings(image)
    try:
        table = find_sites(image, settings=config.sites, pixel_size=pixel_size, unit=unit, timings=timings)
    except BaseException:
        if isinstance(timings, StageTimings):
            timings.close()
        raise
    table = with_companion(table, companion, config.sites)
    table = named_with_companion(table, image, companion, companion_higher, config.sites,
                                 pixel_size=pixel_size, unit=unit)
    if ((table.meta.get("lattice") or {}).get("contrast") or {}).get("inverted"):
        image = inverted(image)  # dark columns (bright field): the patches are cut where find_sites read them bright
    t0 = time.perf_counter()
    # the patches see the scan lines levelled, as the column intensities were read: a streak is not
    # part of what a site looks like (the model would reconstruct it badly and damp the scores there)
    cut_from = levelled_image(image, table.meta)
    size = patch_size or config.patch_size or (default_patch_size(table.meta["spacing_px"])
                                                if table.meta.get("status") == "ok" else 32)
    if len(table):
        out = int(input_size or getattr(config.model, "input_size", size) or size)
        # gather straight at the model's input size: the compiled gather applies resample_patches'
        # weights in the same pass (no size x size intermediate, no second pass over the patches)
        weights = resample_weights(size, out) if out != size else None
        budget = MAX_PATCH_BYTES if max_patch_bytes is None else int(max_patch_bytes)
        if len(table) * out * out * 4 > budget:
            patches = LazyPatches(cut_from, table.xy, size=size, resample_weights=weights, backend=config.sites.backend)
            edge, norm = patches.edge, patches.norm
            log.info("%d patches (%.1f GB) are cut on demand", len(table), len(table) * out * out * 4 / 1e9)
        else:
            p = extract_patches(cut_from, table.xy, size=size, backend=config.sites.backend, resample_weights=weights)
            patches, edge, norm = p.data, p.edge, p.norm
    else:
        patches = np.zeros((0, size, size), np.float32)
        edge = np.zeros(0, bool)
        norm = None
    timings["patches"] = time.perf_counter() - t0
    return Prepared(image=np.asarray(image), sites=table, patches=patches, edge=edge, norm=norm,
                    patch_size=int(size), timings=timings)


#: an image of at least this many pixels gets a bar over the pipeline's stages (on a terminal; progress
#: lines in the log elsewhere, :class:`stemfast.logutil.LogProgress`): its run
#: takes from seconds (4096^2: 5-14 s on 2 cores) to minutes (16384^2: ~2 min)
STAGE_BAR_PX = 4096 * 4096


def _stage_timings(image) -> dict:
    """The dict the stages record their seconds in: a :class:`~stemfast.logutil.StageTimings` with a
    bar over the stages of one image (:data:`stemfast.report.STAGES` after ``read``; ``encode`` and
    ``analysis`` are recorded by :func:`stemfast.pipeline.analyze`) for a large image, unless progress is
    off (``STEMFAST_PROGRESS=0``)."""
    if np.size(image) < STAGE_BAR_PX or progress_mode() == "off":
        return {}
    from .report import STAGES

    h, w = np.shape(image)[-2:]
    return StageTimings([s for s in STAGES if s != "read"], desc=f"{h} x {w} image", show=True)


def with_companion(table: SiteTable, companion: np.ndarray | None, settings) -> SiteTable:
    """``table`` with the ``companion_intensity`` column of a second detector's image of the same scan
    (:func:`stemfast.sites.companion_intensity`); unchanged without one or without sites."""
    if companion is None or not len(table):
        return table
    values, contrast = companion_intensity(companion, table, settings=settings, return_contrast=True)
    meta = {"lattice": {**table.meta["lattice"], "companion_contrast": contrast}} if "lattice" in table.meta else {}
    return table.with_columns({"companion_intensity": values}, **meta)


def named_with_companion(table: SiteTable, image: np.ndarray, companion: np.ndarray | None,
                         companion_higher: bool | None, settings, *, pixel_size=None, unit="nm") -> SiteTable:
    """``table`` (with its ``companion_intensity``), or where the companion of known angle shows its
    sublattice names impossible (:func:`stemfast.pairnaming.names_contradicted`) the sites of ``image``
    found again with ``settings.chalcogen_brighter`` the other way, ``meta["naming_from_companion"]``
    saying so. Unchanged where ``settings.chalcogen_brighter`` is set: the user's word stands."""
    if (companion is None or companion_higher is None or settings.chalcogen_brighter is not None
            or "companion_intensity" not in table):
        return table
    cb = bool(table.meta.get("chalcogen_brighter", False))
    usable = np.asarray(table["observed"], bool) & np.asarray(table["on_lattice"], bool)
    found = names_contradicted(table["sublattice"], table["companion_intensity"], usable,
                               chalcogen_brighter=cb, companion_higher=companion_higher)
    if found is None:
        return table
    log.info("the companion (%s angles) shows the %s sublattice brighter: named the other way",
             "higher" if companion_higher else "lower", found["companion_brighter"])
    turned = dataclasses.replace(settings, chalcogen_brighter=not cb)
    again = with_companion(find_sites(image, settings=turned, pixel_size=pixel_size, unit=unit), companion, turned)
    return again.with_columns({}, naming_from_companion={**found, "companion_higher_angle": bool(companion_higher),
                                                         "chalcogen_brighter": not cb})


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
