"""Synthetic MoS2-like site patches for tests and benchmarks of :mod:`stemfast.model`.

A 2H-MoS2 monolayer seen along [001] is a honeycomb: Mo columns (bright, 1.0) on one triangular
sublattice, S2 columns on the other, and empty hollow centres on the third. The S2 / Mo intensity
is that of the image generator's Z-contrast model
(:func:`stemfast.synthetic.image.chalcogen_pair_intensity`, 0.388 for MoS2), so patches rendered
here and patches cut from :func:`stemfast.synthetic.image.make_mos2` images agree. Nearest
neighbour (Mo-S2) projected distance ``d``; every site type has a characteristic first shell at
distance ``d``: Mo sees 3 S2 at 120 deg, S2 sees 3 Mo, a hollow 3 Mo + 3 S2 alternating.
Patches are rendered directly (sum of Gaussians, separable) at a random orientation per patch,
with per-patch intensity / width jitter, sub-pixel offset, Poisson shot noise and Gaussian read
noise; background ~0, Mo ~1 (like the pipeline's robust-normalised patches).
"""
from __future__ import annotations

import numpy as np

from .image import chalcogen_pair_intensity

SITE_TYPES = ("Mo", "S2", "hollow")


def _shell_points(spacing: float, extent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (M, 2), sublattice ids (M,) of Mo (0) and S2 (1) for origins at Mo, S2, hollow."""
    a = spacing * np.sqrt(3.0)  # Mo-Mo distance
    a1 = np.array([a, 0.0])
    a2 = np.array([a / 2.0, a * np.sqrt(3.0) / 2.0])
    n = int(np.ceil(extent / a)) + 2
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij"), -1).reshape(-1, 2)
    base = ij[:, :1] * a1 + ij[:, 1:] * a2
    mo = base
    s2 = base + (a1 + a2) / 3.0
    pts = np.concatenate([mo, s2])
    kind = np.concatenate([np.zeros(len(mo), int), np.ones(len(s2), int)])
    origins = [np.zeros(2), (a1 + a2) / 3.0, 2.0 * (a1 + a2) / 3.0]
    return pts, kind, np.array(origins)


def render_site_patches(
    n: int,
    size: int = 35,
    *,
    spacing: float = 14.0,
    types: np.ndarray | None = None,
    angles: np.ndarray | None = None,
    seed: int | np.random.Generator = 0,
    sigma: float = 2.6,
    dose: float = 60.0,
    read_noise: float = 0.03,
    jitter: float = 0.4,
    s2_intensity: float | None = None,
    same_site: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``n`` site-centred patches.

    ``s2_intensity`` is the S2 / Mo peak ratio; by default that of the image generator's intensity
    model (:func:`~stemfast.synthetic.image.chalcogen_pair_intensity`).

    ``same_site=True`` draws the site's own parameters (intensity / width jitter, sub-pixel
    offset) once and renders that one site at the ``n`` orientations (noise is still drawn per
    patch), e.g. to test rotation invariance.

    Returns
    -------
    patches : float32 [n, size, size]
    types : int [n], index into :data:`SITE_TYPES`
    angles : float [n], lattice orientation in degrees (counter-clockwise as displayed, y down)
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    types = rng.integers(0, 3, n) if types is None else np.asarray(types, int)
    angles = rng.uniform(0.0, 360.0, n) if angles is None else np.asarray(angles, float)
    half = (size - 1) / 2.0
    pts, kind, origins = _shell_points(spacing, extent=size * 0.75 + spacing)
    amp_of = np.array([1.0, chalcogen_pair_intensity() if s2_intensity is None else float(s2_intensity)])
    out = np.empty((n, size, size), np.float32)
    grid = np.arange(size, dtype=np.float64) - half
    chunk = 512
    if same_site:
        chunk = n
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        m = e - s
        rel = pts[None, :, :] - origins[types[s:e]][:, None, :]  # (m, M, 2) lattice frame, y up
        keep = np.abs(rel).max(axis=(0, 2)) < size * 0.75 + 2 * sigma
        rel = rel[:, keep]
        mp = 1 if same_site else m
        amp = amp_of[kind[keep]][None, :] * rng.normal(1.0, 0.05, (mp, 1)) * rng.normal(1.0, 0.03, (mp, keep.sum()))
        off = rng.uniform(-jitter, jitter, (mp, 1, 2))  # sub-pixel offset, moves with the lattice
        rel = rel + off
        t = np.deg2rad(angles[s:e])[:, None]
        # counter-clockwise as displayed: rotate in the y-up frame, then flip y for pixel rows
        px = rel[..., 0] * np.cos(t) - rel[..., 1] * np.sin(t)
        py = -(rel[..., 0] * np.sin(t) + rel[..., 1] * np.cos(t))
        sig = sigma * rng.normal(1.0, 0.04, (mp, 1, 1))
        gx = np.exp(-((grid[None, None, :] - px[..., None]) ** 2) / (2 * sig**2))  # (m, M, size)
        gy = np.exp(-((grid[None, None, :] - py[..., None]) ** 2) / (2 * sig**2))
        img = np.einsum("bmy,bmx->byx", gy * amp[..., None], gx)
        if dose > 0:
            img = rng.poisson(np.clip(img, 0, None) * dose + 0.5) / dose - 0.5 / dose
        img = img + rng.normal(0.0, read_noise, img.shape)
        out[s:e] = img.astype(np.float32)
    return out, types, angles
