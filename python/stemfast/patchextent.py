"""How far a model's patches reach, in lattice spacings, and at what size an image is cut for it.

Every site's patch is cut ``default_patch_size(spacing)`` px wide by default -- about 2.5-3 site
spacings of the image's own lattice (:func:`stemfast.patches.default_patch_size`) -- and resampled to
the model's input size, so one model serves images of any magnification. A model trained by stemfast
records how its training patches were cut, ``extra["patch_extent"]`` (:func:`extent_record`; also in
``OUT/model.json``):

- ``cut = "per-image"`` (``patch_size`` None): every image is cut by its own spacing, as for the
  shipped model; ``spacings`` is the extent the patches spanned (median over the training images).
- ``cut = "fixed"`` (the settings' ``patch_size``, px, stored as ``extra["patch_size"]``): every image
  is cut at that size; where an image's spacing makes it span more than :data:`EXTENT_TOLERANCE`
  more or fewer spacings than at training (``spacings``), the analysis says so (:func:`extent_note`:
  ``summary.json`` ``patch_extent`` and ``patch_warning``, report.html).

Model files written before this record hold a pixel ``patch_size`` only (:func:`plan_for`):

- written by ``batch --train`` / ``stemfast train`` without a ``patch_size`` setting (the settings
  saved with the model, ``extra["config"]``, say ``patch_size`` None): that size was derived from the
  first training image's spacing by :func:`~stemfast.patches.default_patch_size`, so the model
  learned patches of the default extent -- they are cut per image (an image at the first one's
  spacing gets the same size, one at another magnification the same extent);
- any other (a ``patch_size`` setting, or ``RVAE.fit`` / ``pipeline.train_model`` of an older
  version, which save no settings): cut at the recorded size; the training spacing is not known, so
  the extent is compared with the default extent at the image's spacing, and a difference of more
  than :data:`EXTENT_TOLERANCE` is said.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .patches import default_patch_size

__all__ = ["EXTENT_TOLERANCE", "PatchPlan", "PatchExtentWarning", "plan_for", "extent_record", "extent_note", "cut_of"]

#: a patch cut at a fixed size that spans more than this fraction more or fewer site spacings than
#: the model's patches at training is said (:func:`extent_note`)
EXTENT_TOLERANCE = 0.15

#: how a per-image cut sizes its patches (recorded in the model)
PER_IMAGE_RULE = "stemfast.patches.default_patch_size(spacing) = 2 * ceil(1.25 * spacing) + 1 px"


class PatchExtentWarning(UserWarning):
    """An image was cut at a fixed patch size that spans another number of site spacings than the
    model's patches at training (:func:`extent_note`)."""


@dataclass(frozen=True)
class PatchPlan:
    """How the images are cut for a model.

    Attributes
    ----------
    fixed_px : int or None
        The patch size (px) every image is cut at, ``prepare``'s ``patch_size``; None: each image by
        its own spacing (:func:`~stemfast.patches.default_patch_size`).
    extent : float or None
        Site spacings the model's patches spanned at training when they were cut at a fixed size;
        None: the default extent at the image's spacing (a per-image model, or not recorded).
    basis : str
        Where ``fixed_px`` comes from, for the messages.
    known : bool
        Whether the model's extent at training is known (False: an older model cut at a fixed size,
        whose training spacing is not recorded).
    extent_range : tuple of float, optional
        The least and most spacings the fixed size spanned over the training images (``extent`` is
        their median).
    """

    fixed_px: int | None
    extent: float | None
    basis: str
    known: bool = True
    extent_range: tuple[float, float] | None = None


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _derived_by_rule(extra: dict) -> bool:
    """An older model's pixel ``patch_size`` was derived from a training image's spacing: its saved
    settings (``extra["config"]``) fix no ``patch_size``."""
    cfg = extra.get("config")
    return isinstance(cfg, dict) and "patch_size" in cfg and cfg["patch_size"] is None


def plan_for(model, config) -> PatchPlan:
    """How the images are cut for ``model`` (None: one still to be trained) under ``config`` (a
    PipelineConfig): the size the model was trained at when its settings fixed one, else the run's
    ``patch_size`` setting, else per image (see the module docstring for older model files).

    Examples
    --------
    >>> from stemfast.config import PipelineConfig
    >>> plan_for(None, PipelineConfig()).fixed_px is None
    True
    """
    extra = getattr(model, "extra", None) or {}
    setting = getattr(config, "patch_size", None)
    record = extra.get("patch_extent")
    px = extra.get("patch_size")
    if px and isinstance(record, dict) and record.get("cut") == "fixed":
        span = record.get("spacings_range")
        span = tuple(float(v) for v in span) if isinstance(span, (list, tuple)) and len(span) == 2 else None
        return PatchPlan(int(px), _positive(record.get("spacings")), "the model's patch_size, fixed at training",
                         extent_range=span)
    if px and not isinstance(record, dict) and not _derived_by_rule(extra):
        return PatchPlan(int(px), None, "the model's patch_size", known=False)
    if setting:
        return PatchPlan(int(setting), None, "the settings' patch_size")
    return PatchPlan(None, None, "per image")


def extent_record(sizes_px: Sequence[float], spacings_px: Sequence[float], fixed_px: int | None) -> dict:
    """``extra["patch_extent"]`` of a model trained on patches cut ``sizes_px`` wide on images of site
    spacing ``spacings_px`` (one each; unknown spacings left out), at the fixed size ``fixed_px`` (None:
    per image).

    Examples
    --------
    >>> r = extent_record([19, 37], [7.0, 14.0], None)
    >>> r["cut"], r["spacings_range"], r["train_spacing_range_px"]
    ('per-image', [2.6429, 2.7143], [7.0, 14.0])
    """
    pairs = [(float(p), s) for p, s in zip(sizes_px, (_positive(v) for v in spacings_px)) if s is not None]
    ratio = np.array([p / s for p, s in pairs]) if pairs else np.zeros(0)
    sp = np.array([s for _, s in pairs])

    def r4(v) -> float:
        return round(float(v), 4)

    record = {"cut": "fixed" if fixed_px else "per-image", "patch_px": int(fixed_px) if fixed_px else None,
              "rule": None if fixed_px else PER_IMAGE_RULE,
              "spacings": r4(np.median(ratio)) if len(ratio) else None,
              "spacings_range": [r4(ratio.min()), r4(ratio.max())] if len(ratio) else None,
              "train_spacing_px": r4(np.median(sp)) if len(sp) else None,
              "train_spacing_range_px": [r4(sp.min()), r4(sp.max())] if len(sp) else None,
              "n_images": len(pairs)}
    if fixed_px and len(ratio) and ratio.max() > ratio.min() * (1.0 + EXTENT_TOLERANCE):
        record["warning"] = (f"the patch_size setting fixes the patches at {int(fixed_px)} px, which spans "
                             f"{ratio.min():.2f}-{ratio.max():.2f} site spacings over the training images (site "
                             f"spacing {sp.min():.2f}-{sp.max():.2f} px): the model learns sites at different "
                             "extents; without a patch_size setting every image is cut by its own spacing")
    return record


def cut_of(prep) -> tuple[int, float | None]:
    """``(patch size in px, site spacing in px or None)`` of a prepared image (``Prepared``)."""
    return int(prep.patch_size), _positive(prep.sites.meta.get("spacing_px"))


def extent_note(plan: PatchPlan, patch_px: int, spacing_px) -> dict | None:
    """Where an image of site spacing ``spacing_px`` cut ``patch_px`` wide for a model (``plan``) gets
    patches that span more than :data:`EXTENT_TOLERANCE` more or fewer site spacings than the model's
    at training: ``{patch_px, spacing_px, spacings, spacings_at_training, off, recorded, warning}``;
    None otherwise (an image cut by its own spacing for a model so trained never is).

    Examples
    --------
    >>> n = extent_note(PatchPlan(37, 2.643, "the model's patch_size, fixed at training"), 37, 7.0)
    >>> n["spacings"], n["off"]
    (5.286, 1.0)
    >>> extent_note(PatchPlan(37, 2.643, "x"), 37, 13.0) is None
    True
    """
    spacing = _positive(spacing_px)
    if spacing is None:
        return None
    now = float(patch_px) / spacing
    ref = plan.extent or default_patch_size(spacing) / spacing
    off = now / ref - 1.0
    if abs(off) <= EXTENT_TOLERANCE:
        return None
    against = f"{ref:.2f} at training"
    if not plan.known:
        against = f"{ref:.2f} for the default cut (the model file does not record the spacing it was trained at)"
    elif plan.extent_range and plan.extent_range[1] > plan.extent_range[0] * (1.0 + EXTENT_TOLERANCE):
        against += f" (the median of {plan.extent_range[0]:.2f}-{plan.extent_range[1]:.2f} over its training images)"
    basis = plan.basis if plan.fixed_px == int(patch_px) else "the size the image was prepared at"
    msg = (f"the patches are cut at a fixed {int(patch_px)} px ({basis}), which spans {now:.2f} site spacings "
           f"in this image (spacing {spacing:.2f} px) against {against}, {off:+.0%}: the classes may not follow "
           "the sublattices at this magnification; a model trained without a patch_size setting, run without one, "
           "cuts every image by its own spacing")
    return {"patch_px": int(patch_px), "spacing_px": round(spacing, 4), "spacings": round(now, 3),
            "spacings_at_training": round(ref, 3), "off": round(off, 3), "recorded": plan.known,
            "warning": msg}
