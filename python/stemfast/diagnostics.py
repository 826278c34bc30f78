"""Diagnostics of a trained rVAE: does the STN canonicalise rotated copies of a site?

Acceptance criterion: *canonicalised patches of a site and of its rotated copy differ by less than
10 % relative error, modulo the lattice's 60 degree symmetry.* :func:`pair_errors` measures it for
any pairs ``(patch, copy)`` where ``copy`` shows the same site rotated by a known angle, inside the
model's disc mask, exactly as the model canonicalises (:meth:`stemfast.model.RVAE.canonicalize`).
Where the copies come from decides what else the number contains:

* :func:`rotated_copy_errors` warps the patches themselves (kornia, bilinear): the copy is
  interpolated once more than the patch, which smooths its noise and its sharp columns, so even
  a perfect STN does not reach 0 (the ``floor``);
* :func:`micrograph_pair_errors` rotates the whole micrograph and runs the lattice front end again
  (site detection and patch extraction of the copy). Multiples of 90 degrees use ``np.rot90``,
  an *exact* copy (no interpolation); other angles a spline interpolation of the image.

Run on micrographs: ``python -m stemfast diagnose OUT/model.pt IMAGE [IMAGE ...]``
(:mod:`stemfast.cli.diagnose`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import functional as MF

__all__ = ["PairErrors", "pair_errors", "rotated_copy_errors", "micrograph_pair_errors", "invariance_ratio",
           "format_summary"]


@dataclass(frozen=True)
class PairErrors:
    """Per-pair results of :func:`pair_errors` (float arrays ``[N]``; angles in degrees).

    Attributes
    ----------
    rel_error : ``||c(x) - c(copy)|| / ||c(x)||`` in the disc, ``c`` the model's canonicalisation; the
        copy's canonical angle may be shifted by any multiple of ``period`` (the smallest error counts).
    angle_error : ``|wrap(theta(copy) - theta(x) - angle, period)|``.
    angle_error_model : the same modulo the model's own period ``360 / rotation_symmetry``.
    floor : ``rel_error`` with the copy canonicalised at the exact angle ``theta(x) + angle``: what a
        perfect STN would give (interpolation, noise resampling, differences of the copy itself).
    floor_input : ``||x - rotate(copy, -angle)|| / ||x||`` in the disc (copy rotated back by the
        true angle, compared with the un-warped patch).
    unaligned : ``||x - copy|| / ||x||`` in the disc (no alignment at all; the comparison's scale).
    period : the symmetry the errors are taken modulo.
    """

    rel_error: np.ndarray
    angle_error: np.ndarray
    angle_error_model: np.ndarray
    floor: np.ndarray
    floor_input: np.ndarray
    unaligned: np.ndarray
    period: float

    def __len__(self) -> int:
        return len(self.rel_error)

    def summary(self) -> dict:
        """Mean, median and 90th percentile of every field, plus ``n`` and ``period``."""
        out: dict = {"n": len(self), "period": self.period}
        for f in ("rel_error", "angle_error", "angle_error_model", "floor", "floor_input", "unaligned"):
            v = getattr(self, f)
            out[f] = {"mean": float(np.mean(v)), "median": float(np.median(v)), "p90": float(np.quantile(v, 0.9))}
        return out

    def subset(self, keep: np.ndarray) -> "PairErrors":
        """The pairs selected by a boolean or index array."""
        return PairErrors(*(getattr(self, f)[keep] for f in ("rel_error", "angle_error", "angle_error_model",
                                                               "floor", "floor_input", "unaligned")),
                          period=self.period)


def _model_input(model, patches) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))[:, None]
    return MF.model_input(x, model.config.input_size, model.config.resample, model.config.background)


@torch.inference_mode()
def pair_errors(model, patches: np.ndarray, copies: np.ndarray, angles: np.ndarray, *, period: float = 60.0,
                batch_size: int = 1024) -> PairErrors:
    """Canonicalisation errors of ``(patches[i], copies[i])``, ``copies[i]`` = ``patches[i]`` rotated by ``angles[i]``.

    Parameters
    ----------
    model : stemfast.model.RVAE
        A trained rVAE (``model="rvae"``).
    patches, copies : arrays [N, S, S]
        Patches as given to :meth:`~stemfast.model.RVAE.encode` (resampled to the model's size here).
    angles : array [N]
        Rotation of each copy, degrees, counter-clockwise as displayed (:mod:`stemfast.model.functional`).
    period : float
        Symmetry modulo which patches count as equal: 60 for the MoS2 lattice, or the
        model's ``360 / rotation_symmetry``. Must divide 360.
    batch_size : int
        Patches per warp call.

    Examples
    --------
    >>> from stemfast.model import RVAE
    >>> from stemfast.synthetic import render_site_patches
    >>> p, _, _ = render_site_patches(200, 35, seed=0)
    >>> model = RVAE.fit(p, epochs=1, stn_epochs=1, progress=False)
    >>> x = p[:20, 1:33, 1:33]
    >>> r = pair_errors(model, x, np.rot90(x, 1, axes=(1, 2)), np.full(20, 90.0))
    >>> bool(r.floor.max() < 1e-4)   # a 90 degree copy is exact: a perfect STN would give 0
    True
    """
    from .model.modules import RVAENet

    if not isinstance(model.network, RVAENet):
        raise ValueError("pair_errors needs an rVAE (the plain VAE has no STN)")
    if len(patches) != len(copies) or len(angles) != len(patches):
        raise ValueError(f"need as many copies and angles as patches: {len(patches)}, {len(copies)}, {len(angles)}")
    n_rot = 360.0 / period
    if period <= 0 or abs(n_rot - round(n_rot)) > 1e-9:
        raise ValueError(f"period must divide 360, got {period}")
    n_rot = int(round(n_rot))
    net = model.network.eval()
    dev = model.device
    mask = net.mask
    model_period = 360.0 / net.stn.symmetry
    n = len(patches)
    out = {f: np.empty(n, np.float32) for f in ("rel_error", "angle_error", "angle_error_model", "floor",
                                                   "floor_input", "unaligned")}
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        x, xr = _model_input(model, patches[a:b]).to(dev), _model_input(model, copies[a:b]).to(dev)
        ang = torch.as_tensor(np.asarray(angles[a:b], np.float32), device=dev)
        ca, ta = net.canonical(x)  # the model's canonicalisation: warp the full patch, then mask
        _, tb = net.canonical(xr)
        ca, ta, tb = ca.float(), ta.float(), tb.float()
        errs = torch.stack([MF.masked_relative_error(ca, MF.canonicalize(xr, tb + period * j) * mask, mask)
                            for j in range(n_rot)])
        d = tb - ta - ang
        res = {
            "rel_error": errs.min(0).values,
            "angle_error": MF.wrap_angle(d, period).abs(),
            "angle_error_model": MF.wrap_angle(d, model_period).abs(),
            "floor": MF.masked_relative_error(ca, MF.canonicalize(xr, ta + ang) * mask, mask),
            "floor_input": MF.masked_relative_error(x * mask, MF.rotate_patches(xr, -ang) * mask, mask),
            "unaligned": MF.masked_relative_error(x * mask, xr * mask, mask),
        }
        for f, v in res.items():
            out[f][a:b] = v.cpu().numpy()
    return PairErrors(period=float(period), **out)


@torch.inference_mode()
def rotated_copy_errors(model, patches: np.ndarray, *, seed: int = 0, period: float = 60.0) -> PairErrors:
    """:func:`pair_errors` with copies made by warping each patch by a random angle (uniform in [0, 360)).

    The copies are kornia bilinear rotations of the patches at the model's input size (zero padding
    reaches only the corners, never the disc), so ``floor`` contains that extra interpolation.
    """
    x = _model_input(model, patches)
    a = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) * 360.0
    xr = MF.rotate_patches(x, a)
    return pair_errors(model, x[:, 0].numpy(), xr[:, 0].numpy(), a.numpy(), period=period)


@torch.inference_mode()
def invariance_ratio(model, patches: np.ndarray, *, n_rot: int = 12, seed: int = 0) -> float:
    """Spread of the latent means across rotations of one patch / spread across patches.

    Every patch is warped by ``n_rot`` random angles (as in :func:`rotated_copy_errors`) and encoded;
    returns ``sqrt(mean_i sum_l var_r mu[i, r, l]) / sqrt(sum_l var_i mean_r mu[i, r, l])``.
    """
    x = _model_input(model, patches)
    n = len(x)
    a = torch.rand(n, n_rot, generator=torch.Generator().manual_seed(seed)) * 360.0
    xr = MF.rotate_patches(x.repeat_interleave(n_rot, 0), a.reshape(-1))
    mu = model.encode(xr[:, 0].numpy()).mu.reshape(n, n_rot, -1).astype(np.float64)
    within = np.sqrt(mu.var(axis=1).sum(-1).mean())
    across = np.sqrt(mu.mean(axis=1).var(axis=0).sum())
    return float(within / across)


def _rotate_image(image: np.ndarray, angle: float, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image rotated about its centre by ``angle`` (module convention); returns it, the old and new centres."""
    h, w = image.shape
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    k = angle / 90.0
    if abs(k - round(k)) < 1e-9:  # exact: np.rot90 rotates counter-clockwise as displayed
        k = int(round(k)) % 4
        out = np.ascontiguousarray(np.rot90(image, k))
        c2 = np.array([(out.shape[1] - 1) / 2.0, (out.shape[0] - 1) / 2.0])
        return out, c, c2
    from scipy import ndimage

    t = np.deg2rad(angle)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - c[0], yy - c[1]
    # output offset p' samples the input at R(-angle) p'
    sx = c[0] + dx * np.cos(t) - dy * np.sin(t)
    sy = c[1] + dx * np.sin(t) + dy * np.cos(t)
    out = ndimage.map_coordinates(np.asarray(image, np.float64), [sy, sx], order=order, mode="constant",
                                  cval=float(np.median(image)))
    return out.astype(np.float32), c, c


def micrograph_pair_errors(model, image: np.ndarray, angle: float, *, config=None, order: int = 3,
                           match_px: float = 1.0, period: float = 60.0, max_sites: int | None = None,
                           seed: int = 0) -> tuple[PairErrors, dict]:
    """:func:`pair_errors` on sites of ``image`` and of the image rotated by ``angle`` (degrees).

    Both images go through :func:`stemfast.frontend.prepare` (site detection, patch extraction and
    normalisation) with the model's patch size; each site is paired with the detected site of the
    rotated image nearest to its rotated position (within ``match_px``; patches touching the border
    are left out). Multiples of 90 degrees rotate exactly (``np.rot90``), other angles by a spline
    of ``order``.

    Returns the errors and a dict with ``n_sites``, ``n_matched``, ``position_rms_px`` (re-detected
    vs rotated position) and ``index`` (the paired sites of ``image``, for per-site breakdowns).
    """
    from scipy.spatial import cKDTree

    from .config import PipelineConfig
    from .frontend import prepare
    from .patchextent import plan_for

    config = config or PipelineConfig()
    size = plan_for(model, config).fixed_px
    image = np.asarray(image, np.float32)
    p0 = prepare(image, config=config, patch_size=size)
    rot, c0, c1 = _rotate_image(image, angle, order)
    p1 = prepare(rot, config=config, patch_size=p0.patch_size)
    if len(p0.sites) == 0 or len(p1.sites) == 0:
        raise ValueError("no sites found in the image or its rotated copy")
    t = np.deg2rad(angle)
    d0 = p0.sites.xy - c0
    xy = c1 + np.stack([d0[:, 0] * np.cos(t) + d0[:, 1] * np.sin(t), -d0[:, 0] * np.sin(t) + d0[:, 1] * np.cos(t)], 1)
    dist, j = cKDTree(p1.sites.xy).query(xy)
    ok = (dist < match_px) & ~p0.edge & ~p1.edge[j]
    idx = np.flatnonzero(ok)
    if max_sites is not None and len(idx) > max_sites:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_sites, replace=False))
    if len(idx) == 0:
        raise ValueError("no site of the image was found again in its rotated copy")
    res = pair_errors(model, p0.patches[idx], p1.patches[j[idx]], np.full(len(idx), float(angle), np.float32),
                      period=period)
    info = {"n_sites": int((~p0.edge).sum()), "n_matched": int(ok.sum()),
            "position_rms_px": float(np.sqrt(np.mean(dist[idx] ** 2))), "index": idx}
    return res, info


# ----------------------------------------------------------------------------- reporting

def format_summary(s: dict, model_period: float) -> str:
    """One line of a :meth:`PairErrors.summary`: mean and p90 of the errors, the angle errors modulo
    60 degrees and modulo the model's own period (``360 / rotation_symmetry``)."""
    def f(k: str) -> str:
        return f"{s[k]['mean']:.4f} (p90 {s[k]['p90']:.4f})"

    return (f"rel_error {f('rel_error')}  floor {f('floor')}  angle_error {s['angle_error']['mean']:.3f} deg "
            f"(p90 {s['angle_error']['p90']:.3f}; mod {model_period:g}: {s['angle_error_model']['mean']:.3f})  "
            f"unaligned {s['unaligned']['mean']:.3f}")
