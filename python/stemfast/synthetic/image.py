"""Synthetic MoS2-like HAADF-STEM micrographs with exact ground truth.

The package's own test-pattern generator: the tests, the benchmarks and the ``stemfast demo``
command use it, so it depends on nothing outside numpy/scipy and is deterministic for a seed.
The column intensities follow the Z-contrast model of this module (:data:`Z_MO`, :data:`Z_S`,
:data:`Z_EXPONENT`, :func:`chalcogen_atom_intensity`), which the site-patch generator
(:mod:`stemfast.synthetic.patches`) shares.

Conventions
-----------
``x`` = column, ``y`` = row, pixel centres at integers. The ground truth has the format of the
project's development data: ``truth`` is an ``N x 4`` float array with columns
``(x, y, sublattice, defect)`` where sublattice is ``0`` Mo, ``1`` S2, ``2`` hollow (hexagon centre,
no atom) and defect is ``0`` none, ``1`` V_S (one S of the S2 column missing), ``2`` V_S2 (both
missing), ``3`` V_Mo, ``4`` Mo_S (a Mo atom in the S2 column). ``meta`` is a JSON-serialisable dict
with at least ``nn_px`` (nearest-neighbour Mo-S2 column spacing in px, ``a / sqrt(3)``) and
``pixel_size_A``. On disk: ``np.savez(path, truth=truth, meta=json.dumps(meta))``
(see :func:`save_truth` / :func:`load_truth`).

Image model (intensities in detected electrons; the Mo column peak is ``dose``)::

    expected = dose * (atoms + film * (background + texture + contamination))
    image    = Poisson(expected) + Normal(0, gaussian_noise / 100 * dose)

* ``atoms``: a 2-D Gaussian (sigma ``column_sigma_A``) per column with peak ``1`` for Mo and
  ``(Z_S / Z_Mo) ** 1.7`` per S atom (so S2 / Mo = 2 * (16/42)^1.7 = 0.388); a Mo_S column
  renders like a Mo column, vacancies remove atoms.
* ``background``: a smooth random field (correlation lengths ~1 A and ~8 A) of mean
  ``0.75 * background`` and standard deviation ``0.15 * background``.
* ``texture``: fine amorphous texture (correlation ~0.2 A), standard deviation ``texture``.
* ``film``: 1 on the film, 0 in holes (vacuum, smooth edge).

The defaults reproduce the look of the development images (0.30 A column sigma, Mo peak = dose,
background ~0.15 of the Mo peak, read noise ~2 % of the Mo peak, 0.03 A random column
displacements).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

__all__ = [
    "SynthConfig",
    "SynthImage",
    "make_mos2",
    "make_lattice",
    "save_example",
    "save_truth",
    "load_truth",
    "render_gaussians",
    "SUBLATTICE_NAMES",
    "DEFECT_NAMES",
    "Z_EXPONENT",
    "Z_MO",
    "Z_S",
    "chalcogen_atom_intensity",
    "chalcogen_pair_intensity",
    "MIN_SIDE",
]

log = logging.getLogger(__name__)

#: The smallest image side the generator draws (px; :class:`SynthConfig` ``shape``, the demo's and the
#: bench's ``--size``).
MIN_SIDE = 16
SUBLATTICE_NAMES = ("Mo", "S2", "hollow")
DEFECT_NAMES = ("none", "V_S", "V_S2", "V_Mo", "Mo_S")
#: Atomic numbers of the metal and the chalcogen, and the exponent of the HAADF (Z-contrast)
#: intensity model: a column's peak is proportional to the sum of Z ** Z_EXPONENT over its atoms.
#: 1.7 is the exponent commonly used for annular dark-field images of 2H TMD monolayers
#: (Krivanek et al., Nature 464, 571 (2010)); for MoS2 it gives S2 / Mo = 2 (16/42)^1.7 = 0.388.
Z_MO = 42
Z_S = 16
Z_SE = 34  # an Se atom on a chalcogen site of an Se-implanted or alloyed MoS2 (SynthConfig.se_fraction)
Z_EXPONENT = 1.7
_RATE_KEYS = ("v_s", "v_s2", "v_mo", "mo_s")

# Correlation lengths of the random fields (Angstrom) and their weights, fitted to the dev data.
_BG_SCALES_A = ((0.9, 0.45), (7.7, 0.55))
_TEXTURE_CORR_A = 0.25


# ---------------------------------------------------------------------------------------------
# configuration and result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """Settings of :func:`make_mos2`.

    Attributes
    ----------
    shape : (height, width) of the image in px, each at least :data:`MIN_SIDE`.
    pixel_size_A : pixel size in Angstrom.
    a_A : in-plane lattice constant (MoS2: 3.16 A); the Mo-S2 column spacing is ``a / sqrt(3)``.
    rotation_deg : angle of the first lattice vector from the +x axis (counter-clockwise in x, y).
    strain : ``(exx, eyy, exy)`` homogeneous strain, applied in the image frame after rotation.
    scan_distortion : ``(sx, shear)``: ``x' = (1 + sx) x + shear y`` (fast-scan anisotropy and
        drift shear, about the image centre).
    rates : defect rates ``(v_s, v_s2, v_mo, mo_s)``: V_S, V_S2, Mo_S per S2 site, V_Mo per Mo site.
        A mapping with those keys is accepted as well (missing keys keep their defaults).
    column_sigma_A : standard deviation of the Gaussian of one atomic column, in Angstrom.
    position_jitter_A : standard deviation of random per-site displacements (x and y), Angstrom.
    dose : electrons per pixel at the peak of a Mo column (Poisson noise); the image is in counts.
    gaussian_noise : additive read noise, standard deviation in percent of the Mo peak (``dose``).
    background : level of the smooth film background as a fraction of the Mo peak (its mean is
        ``0.75 * background``, its standard deviation ``0.15 * background``).
    texture : standard deviation of the fine amorphous texture, fraction of the Mo peak.
    contamination : number of bright amorphous contamination patches.
    contamination_radius_nn : mean patch radius in units of ``nn`` (Mo-S2 spacing).
    contamination_level : patch peak intensity as a fraction of the Mo peak.
    holes : number of holes in the film (no atoms, vacuum intensity).
    hole_radius_nn : mean hole radius in units of ``nn``.
    scan_glitches : number of scan glitches (a band of 1-3 rows shifted by 1-4 px in x).
    hot_pixels : number of hot pixels (single-pixel spikes of 1.5-3 x dose; same pixels in every
        frame).
    n_frames : frames; ``> 1`` gives a ``[frames, H, W]`` time series of the same atoms with a
        drift of ``drift_px_per_frame`` per frame and independent noise.
    drift_px_per_frame : ``(dx, dy)`` drift per frame in px.
    noise : ``False`` renders the expected image (no Poisson / read noise, no hot pixels).
    seed : random seed; the same config gives the same image.
    se_fraction : share of the chalcogen atoms that are Se instead of S (an Se-implanted or alloyed
        MoS2(1-x)Se2x film), each atom of a chalcogen column drawn on its own: the coset then holds S2,
        SSe and Se2 columns (0.39, 0.89 and 1.40 of a Mo column at Z^1.7). The truth's defect codes do
        not mark them; ``meta`` counts them (``n_SSe``, ``n_Se2``). ``chalcogen_scale`` applies to them too.
    chalcogen_scale : factor on the chalcogen-pair columns' intensity (real HAADF images often
        show S2 far fainter than Z^1.7 predicts: 0.4-0.6 gives the faint S2 of real MoS2 data).
    contamination_texture : relative amplitude of the contamination's own texture (its
        thickness varies on a scale of ~0.5 A).
    illumination_gradient : total relative change of the signal (atoms and film) across the
        image along ``illumination_angle_deg`` (e.g. 0.3: +-15 % about the centre).
    illumination_angle_deg : direction of that gradient (degrees from +x towards +y).
    scan_streaks : number of scan streaks: bands of 1-3 rows whose signal is offset by
        ``streak_level`` (random sign, 0.5-1.5 times) of the Mo peak -- scan-line noise as real
        images show it; image artefacts, the truth is unchanged.
    streak_level : strength of a scan streak, fraction of the Mo peak.
    """

    shape: tuple[int, int] = (512, 512)
    pixel_size_A: float = 0.12
    a_A: float = 3.16
    rotation_deg: float = 0.0
    strain: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scan_distortion: tuple[float, float] = (0.0, 0.0)
    rates: tuple[float, float, float, float] = (0.03, 0.01, 0.005, 0.005)
    column_sigma_A: float = 0.30
    position_jitter_A: float = 0.03
    dose: float = 500.0
    gaussian_noise: float = 2.0
    background: float = 0.2
    texture: float = 0.025
    contamination: int = 0
    contamination_radius_nn: float = 3.0
    contamination_level: float = 0.6
    holes: int = 0
    hole_radius_nn: float = 4.0
    scan_glitches: int = 0
    hot_pixels: int = 0
    n_frames: int = 1
    drift_px_per_frame: tuple[float, float] = (0.3, 0.2)
    noise: bool = True
    seed: int = 0
    chalcogen_scale: float = 1.0
    se_fraction: float = 0.0
    contamination_texture: float = 0.35
    illumination_gradient: float = 0.0
    illumination_angle_deg: float = 30.0
    scan_streaks: int = 0
    streak_level: float = 0.3

    def __post_init__(self) -> None:
        rates = self.rates
        if isinstance(rates, Mapping):
            unknown = set(rates) - set(_RATE_KEYS)
            if unknown:
                raise ValueError(f"unknown defect rate keys {sorted(unknown)}; use {_RATE_KEYS}")
            default = SynthConfig.__dataclass_fields__["rates"].default
            rates = tuple(float(rates.get(k, d)) for k, d in zip(_RATE_KEYS, default))
        set_ = object.__setattr__
        set_(self, "rates", tuple(float(r) for r in rates))
        set_(self, "shape", tuple(int(s) for s in self.shape))
        set_(self, "strain", tuple(float(s) for s in self.strain))
        set_(self, "scan_distortion", tuple(float(s) for s in self.scan_distortion))
        set_(self, "drift_px_per_frame", tuple(float(s) for s in self.drift_px_per_frame))
        if len(self.shape) != 2 or min(self.shape) < MIN_SIDE:
            raise ValueError(f"shape must be (height, width) with both >= {MIN_SIDE}, got {self.shape}")
        if len(self.rates) != 4 or any(not 0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError(f"rates must be 4 values in [0, 1] (v_s, v_s2, v_mo, mo_s), got {self.rates}")
        if self.rates[0] + self.rates[1] + self.rates[3] > 1.0:
            raise ValueError("v_s + v_s2 + mo_s (all per S2 site) must not exceed 1")
        if not 0.0 <= float(self.se_fraction) <= 1.0:
            raise ValueError(f"se_fraction must be in [0, 1], got {self.se_fraction!r}")
        if len(self.strain) != 3:
            raise ValueError(f"strain must be (exx, eyy, exy), got {self.strain}")
        if len(self.scan_distortion) != 2:
            raise ValueError(f"scan_distortion must be (sx, shear), got {self.scan_distortion}")
        if len(self.drift_px_per_frame) != 2:
            raise ValueError(f"drift_px_per_frame must be (dx, dy), got {self.drift_px_per_frame}")
        for name in ("pixel_size_A", "a_A", "column_sigma_A", "dose"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("position_jitter_A", "gaussian_noise", "background", "texture",
                     "contamination_radius_nn", "contamination_level", "hole_radius_nn", "chalcogen_scale",
                     "contamination_texture", "streak_level"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if not (np.isfinite(self.illumination_gradient) and 0 <= self.illumination_gradient < 2):
            raise ValueError(f"illumination_gradient must be in [0, 2), got {self.illumination_gradient!r}")
        for name in ("contamination", "holes", "scan_glitches", "hot_pixels", "scan_streaks"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")
        if int(self.n_frames) < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")

    @property
    def nn_px(self) -> float:
        """Nearest-neighbour Mo-S2 column spacing in px (``a / sqrt(3) / pixel_size``)."""
        return self.a_A / math.sqrt(3.0) / self.pixel_size_A

    @property
    def sigma_px(self) -> float:
        """Column Gaussian standard deviation in px."""
        return self.column_sigma_A / self.pixel_size_A

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the settings."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, eq=False)
class SynthImage:
    """Result of :func:`make_mos2`.

    Attributes
    ----------
    image : float32 ``[H, W]`` or, for ``n_frames > 1``, ``[F, H, W]``.
    truth : float64 ``[N, 4]`` ``(x, y, sublattice, defect)`` of every site inside frame 0
        (``0 <= x <= W - 1``, ``0 <= y <= H - 1``), sites inside holes excluded.
    meta : JSON-serialisable description (``nn_px``, ``pixel_size_A``, geometry, rates, ...).
    hole_mask, contamination_mask : bool ``[H, W]`` of frame 0.
    truth_frames : for stacks, the truth of every frame (the same sites, shifted by the drift and
        cut to the frame); ``None`` for single images.
    drift : float64 ``[F, 2]`` ``(dx, dy)`` offset of each frame relative to frame 0 (zeros for
        a single image).
    """

    image: np.ndarray
    truth: np.ndarray
    meta: dict
    hole_mask: np.ndarray
    contamination_mask: np.ndarray
    truth_frames: list[np.ndarray] | None = None
    drift: np.ndarray = field(default_factory=lambda: np.zeros((1, 2)))

    @property
    def nn_px(self) -> float:
        """Nearest-neighbour Mo-S2 column spacing in px."""
        return float(self.meta["nn_px"])

    def save(self, image_path: str | os.PathLike, *, truth_path: str | os.PathLike | None = None
             ) -> tuple[Path, Path]:
        """Write the image as a calibrated TIFF and the truth next to it (``NAME.truth.npz``).

        Returns the two paths.
        """
        from ..io import write_tiff

        image_path = Path(image_path)
        if truth_path is None:
            truth_path = image_path.with_name(image_path.with_suffix("").name + ".truth.npz")
        write_tiff(image_path, self.image, pixel_size=self.meta["pixel_size_A"] / 10.0, unit="nm")
        save_truth(truth_path, self.truth, self.meta)
        return image_path, Path(truth_path)


# ---------------------------------------------------------------------------------------------
# rendering helpers
# ---------------------------------------------------------------------------------------------
def render_gaussians(shape: tuple[int, int], xy: np.ndarray, amplitude: np.ndarray | float,
                     sigma: float, *, out: np.ndarray | None = None, truncate: float = 4.0
                     ) -> np.ndarray:
    """Sum of isotropic 2-D Gaussians ``a * exp(-r^2 / (2 sigma^2))`` by local stamping.

    Each centre adds a ``(2 * ceil(truncate * sigma) + 1)^2`` stamp with its sub-pixel offset;
    the work is vectorised over centres and the stamps are scattered with ``np.add.at``.

    Parameters
    ----------
    shape : (H, W) of the output.
    xy : ``[N, 2]`` centres (x = column, y = row, pixel centres at integers); centres outside the
        image still add their tails.
    amplitude : peak value per centre (scalar or ``[N]``).
    sigma : Gaussian standard deviation in px.
    out : optional float32 ``[H, W]`` array to add into.
    truncate : stamp half-size in sigmas.

    Returns
    -------
    float32 ``[H, W]``.

    Examples
    --------
    >>> img = render_gaussians((32, 32), np.array([[10.25, 20.0]]), 1.0, 2.0)
    >>> int(img.argmax() % 32), int(img.argmax() // 32)
    (10, 20)
    """
    H, W = (int(s) for s in shape)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    amp = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (len(xy),))
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = max(1, int(math.ceil(truncate * sigma)))
    P = 2 * r
    H2, W2 = H + 2 * P, W + 2 * P
    acc = np.zeros(H2 * W2, dtype=np.float32)
    x, y = xy[:, 0], xy[:, 1]
    keep = ((x > -r - 0.5) & (x < W - 0.5 + r) & (y > -r - 0.5) & (y < H - 0.5 + r)
            & (amp != 0) & np.isfinite(x) & np.isfinite(y))
    x, y, a = x[keep], y[keep], amp[keep].astype(np.float32)
    if len(x):
        ix = np.floor(x + 0.5).astype(np.int64)
        iy = np.floor(y + 0.5).astype(np.int64)
        order = np.argsort(iy * W2 + ix, kind="stable")  # memory-friendly scatter order
        ix, iy, a = ix[order], iy[order], a[order]
        fx = (x[order] - ix).astype(np.float32)
        fy = (y[order] - iy).astype(np.float32)
        k = np.arange(-r, r + 1)
        kf = k.astype(np.float32)
        inv = np.float32(0.5 / (sigma * sigma))
        offs = (k * W2)[:, None] + k[None, :]
        chunk = max(1, 4_000_000 // (2 * r + 1) ** 2)
        for s in range(0, len(ix), chunk):
            sl = slice(s, s + chunk)
            gx = np.exp(-((kf[None, :] - fx[sl, None]) ** 2) * inv)
            gy = np.exp(-((kf[None, :] - fy[sl, None]) ** 2) * inv) * a[sl, None]
            w = gy[:, :, None] * gx[:, None, :]
            base = (iy[sl] + P) * W2 + (ix[sl] + P)
            np.add.at(acc, (base[:, None, None] + offs[None]).ravel(), w.ravel())
    img = acc.reshape(H2, W2)[P:P + H, P:P + W]
    if out is not None:
        out += img
        return out
    return np.ascontiguousarray(img)


def _rbf_weights(coords: np.ndarray, nodes: np.ndarray, sigma: float) -> sparse.csr_matrix:
    """Sparse Gaussian weights ``exp(-(c - n)^2 / (2 sigma^2))`` truncated at 4 sigma."""
    d = nodes[1] - nodes[0] if len(nodes) > 1 else 1.0
    half = int(math.ceil(4.0 * sigma / d)) + 1
    j0 = np.floor((coords - nodes[0]) / d).astype(np.int64)
    cols = j0[:, None] + np.arange(-half, half + 2)[None, :]
    valid = (cols >= 0) & (cols < len(nodes))
    colc = np.clip(cols, 0, len(nodes) - 1)
    w = (np.exp(-0.5 * ((coords[:, None] - nodes[colc]) / sigma) ** 2) * valid).astype(np.float32)
    rows = np.repeat(np.arange(len(coords)), cols.shape[1])
    m = sparse.csr_matrix((w.ravel(), (rows, colc.ravel())), shape=(len(coords), len(nodes)))
    m.eliminate_zeros()
    return m


class _RandomField:
    """Stationary Gaussian random field with Gaussian correlation, unit variance, mean 0.

    White noise on a node grid (spacing ``sigma``) convolved with a Gaussian of ``sigma`` px,
    evaluated exactly at any (shifted) pixel grid by two sparse products. The autocorrelation is
    ``exp(-L^2 / (4 sigma^2))`` (the node-grid ripple of the variance is ~1e-4). Defined on sample
    coordinates, so a drifting frame samples the same field shifted.
    """

    def __init__(self, rng: np.random.Generator, extent_x: tuple[float, float],
                 extent_y: tuple[float, float], sigma: float):
        self.sigma = float(sigma)
        d = self.sigma
        m = 4.0 * self.sigma + d
        self.nx = np.arange(extent_x[0] - m, extent_x[1] + m + d, d)
        self.ny = np.arange(extent_y[0] - m, extent_y[1] + m + d, d)
        self.noise = rng.standard_normal((len(self.ny), len(self.nx)), dtype=np.float32)
        # variance of sum_ij n_ij k(x - x_i) k(y - y_j) = (sum_i k^2)^2 ~ (sqrt(pi) sigma / d)^2
        self.norm = 1.0 / (math.sqrt(math.pi) * self.sigma / d)

    def sample(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """float32 field at the grid ``xs`` (columns) x ``ys`` (rows)."""
        wy = _rbf_weights(np.asarray(ys, float), self.ny, self.sigma)
        wx = _rbf_weights(np.asarray(xs, float), self.nx, self.sigma)
        tmp = np.ascontiguousarray((wy @ self.noise).T)   # [nx, H]
        out = (wx @ tmp).T                                # [H, W]
        out *= np.float32(self.norm)
        return np.ascontiguousarray(out)


def _blob_radius(phi: np.ndarray, r0: float, harmonics: np.ndarray) -> np.ndarray:
    """Radius of a blobby shape: ``r0 * (1 + sum_m a_m cos(m phi + p_m))``, m = 2, 3, 4."""
    r = np.ones_like(phi)
    for m, (a, p) in enumerate(harmonics, start=2):
        r = r + a * np.cos(m * phi + p)
    return r0 * r


@dataclass
class _Blob:
    x: float
    y: float
    r0: float
    harmonics: np.ndarray
    level: float = 0.0

    def signed_depth(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Approximate distance inside the blob boundary (positive inside), in px."""
        dx, dy = X - self.x, Y - self.y
        rho = np.hypot(dx, dy)
        return _blob_radius(np.arctan2(dy, dx), self.r0, self.harmonics) - rho

    def to_dict(self) -> dict:
        return {"x": round(float(self.x), 3), "y": round(float(self.y), 3),
                "radius_px": round(float(self.r0), 3), **({"level": round(float(self.level), 4)}
                                                           if self.level else {})}


def _blob_box(b: _Blob, xs: np.ndarray, ys: np.ndarray, pad: float
              ) -> tuple[slice, slice] | None:
    """Rows/columns of a frame (sample coordinates ``xs``, ``ys``) within reach of a blob."""
    reach = b.r0 * (1.0 + float(np.abs(b.harmonics[:, 0]).sum())) + pad
    cols = np.nonzero(np.abs(xs - b.x) <= reach)[0]
    rows = np.nonzero(np.abs(ys - b.y) <= reach)[0]
    if not len(cols) or not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _make_blobs(rng: np.random.Generator, n: int, radius_px: float, H: int, W: int,
                level: tuple[float, float] | None = None) -> list[_Blob]:
    blobs = []
    for _ in range(int(n)):
        r0 = radius_px * rng.uniform(0.7, 1.3)
        blobs.append(_Blob(x=float(rng.uniform(0, W - 1)), y=float(rng.uniform(0, H - 1)), r0=r0,
                           harmonics=np.c_[rng.uniform(0.0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)],
                           level=float(rng.uniform(*level)) if level else 0.0))
    return blobs


def _lattice_transform(cfg: SynthConfig) -> np.ndarray:
    """2 x 2 matrix from fractional lattice coordinates to image px (rotation, strain, scan)."""
    a = cfg.a_A / cfg.pixel_size_A
    B = a * np.array([[1.0, 0.5], [0.0, math.sqrt(3.0) / 2.0]])
    t = math.radians(cfg.rotation_deg)
    R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    exx, eyy, exy = cfg.strain
    E = np.eye(2) + np.array([[exx, exy], [exy, eyy]])
    sx, shear = cfg.scan_distortion
    D = np.array([[1.0 + sx, shear], [0.0, 1.0]])
    return D @ E @ R @ B


def _lattice_sites(M: np.ndarray, origin: np.ndarray, xlim: tuple[float, float],
                   ylim: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """All Mo / S2 / hollow sites ``origin + M @ (i + s, j + s)``, s = 0, 1/3, 2/3, in a box."""
    corners = np.array([[xlim[0], ylim[0]], [xlim[1], ylim[0]], [xlim[0], ylim[1]], [xlim[1], ylim[1]]])
    f = np.linalg.solve(M, (corners - origin).T).T
    lo = np.floor(f.min(0)) - 1
    hi = np.ceil(f.max(0)) + 1
    i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    ij = np.c_[i.ravel(), j.ravel()]
    xy_all, sub_all = [], []
    for s, off in enumerate((0.0, 1.0 / 3.0, 2.0 / 3.0)):
        xy = origin + (ij + off) @ M.T
        inside = ((xy[:, 0] >= xlim[0]) & (xy[:, 0] <= xlim[1])
                  & (xy[:, 1] >= ylim[0]) & (xy[:, 1] <= ylim[1]))
        xy_all.append(xy[inside])
        sub_all.append(np.full(int(inside.sum()), s, dtype=np.int64))
    return np.concatenate(xy_all), np.concatenate(sub_all)


def chalcogen_atom_intensity() -> float:
    """Peak intensity of one chalcogen atom relative to a metal column: ``(Z_S / Z_MO) ** Z_EXPONENT``.

    Read from the module constants at call time (the shipped model's training renders other
    2H materials by setting them).

    Examples
    --------
    >>> round(chalcogen_atom_intensity(), 4)
    0.1939
    """
    return (Z_S / Z_MO) ** Z_EXPONENT


def chalcogen_pair_intensity() -> float:
    """Peak intensity of a full chalcogen-pair column (S2) relative to a metal column (Mo).

    Examples
    --------
    >>> round(chalcogen_pair_intensity(), 3)
    0.388
    """
    return 2.0 * chalcogen_atom_intensity()


def _column_amplitudes(sub: np.ndarray, defect: np.ndarray) -> np.ndarray:
    """Peak intensity of every column relative to a Mo column (Z^1.7 contrast)."""
    s1 = chalcogen_atom_intensity()
    amp = np.zeros(len(sub))
    amp[(sub == 0) & (defect == 0)] = 1.0
    amp[(sub == 1) & (defect == 0)] = 2.0 * s1
    amp[(sub == 1) & (defect == 1)] = s1
    amp[(sub == 1) & (defect == 4)] = 1.0
    return amp


def _selenium(cfg: SynthConfig, rng: np.random.Generator, sub: np.ndarray, defect: np.ndarray,
              amp: np.ndarray) -> np.ndarray:
    """Se atoms per column (``cfg.se_fraction`` of the chalcogen atoms, each drawn on its own from
    ``rng``, a stream of its own, so the other features stay as they were), their intensity put into
    ``amp`` in place of S's; zeros (and ``amp`` untouched) without Se."""
    n_se = np.zeros(len(sub), np.int64)
    if cfg.se_fraction <= 0:
        return n_se
    atoms = np.where((sub == 1) & (defect == 0), 2, np.where((sub == 1) & (defect == 1), 1, 0))
    n_se = rng.binomial(atoms, float(cfg.se_fraction))
    amp += n_se * ((Z_SE / Z_MO) ** Z_EXPONENT - chalcogen_atom_intensity())
    return n_se


def _inside(xy: np.ndarray, H: int, W: int) -> np.ndarray:
    return (xy[:, 0] >= 0) & (xy[:, 0] <= W - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= H - 1)


# ---------------------------------------------------------------------------------------------
# public generators
# ---------------------------------------------------------------------------------------------
def make_mos2(config: SynthConfig | None = None, **overrides: Any) -> SynthImage:
    """Synthetic monolayer-MoS2 HAADF image (or time series) with exact ground truth.

    Parameters
    ----------
    config : :class:`SynthConfig`; default settings when ``None``.
    **overrides : fields of :class:`SynthConfig` to replace (e.g. ``shape=(256, 256)``).

    Returns
    -------
    :class:`SynthImage` with ``image`` (float32, counts), ``truth`` ``[N, 4]`` and ``meta``.

    Notes
    -----
    Truth positions include rotation, strain, scan distortion and the random column
    displacements, i.e. they are where the columns appear in the image. Every Mo, S2 and hollow
    site inside the image is listed (also under contamination); sites inside holes are not.
    Scan distortion moves the columns but leaves their round shape; scan glitches and hot
    pixels are image artefacts and do not change the truth.

    Examples
    --------
    >>> s = make_mos2(shape=(128, 128), seed=3)
    >>> s.image.shape, s.image.dtype
    ((128, 128), dtype('float32'))
    >>> np.unique(s.truth[:, 2]).astype(int).tolist()
    [0, 1, 2]
    >>> round(s.meta["nn_px"], 3)
    15.204
    """
    cfg = _resolve_config(config, overrides)
    # independent random streams, so switching one feature on or off leaves the others as they were
    (ss_lat, ss_def, ss_hole, ss_cont, ss_bg, ss_hot, ss_frames, ss_se) = np.random.SeedSequence(cfg.seed).spawn(8)
    rng_bg, rng_tex = (np.random.default_rng(x) for x in ss_bg.spawn(2))
    rng_cont, rng_hot = np.random.default_rng(ss_cont), np.random.default_rng(ss_hot)
    H, W = cfg.shape
    F = int(cfg.n_frames)
    drift = np.arange(F)[:, None] * np.asarray(cfg.drift_px_per_frame, float)[None, :]
    ext_x, ext_y = _sample_extent(cfg, drift)
    xy, sub, defect = _place_columns(cfg, np.random.default_rng(ss_lat), np.random.default_rng(ss_def),
                                     ext_x, ext_y)
    # holes and contamination (defined in sample coordinates); no columns in the holes
    holes = _make_blobs(np.random.default_rng(ss_hole), cfg.holes, cfg.hole_radius_nn * cfg.nn_px, H, W)
    contam = _make_blobs(rng_cont, cfg.contamination, cfg.contamination_radius_nn * cfg.nn_px, H, W,
                         level=(0.7 * cfg.contamination_level, 1.3 * cfg.contamination_level))
    in_hole = np.zeros(len(xy), dtype=bool)
    for b in holes:
        in_hole |= b.signed_depth(xy[:, 0], xy[:, 1]) > 0
    xy, sub, defect = xy[~in_hole], sub[~in_hole], defect[~in_hole]
    amp = _column_amplitudes(sub, defect)
    n_se = _selenium(cfg, np.random.default_rng(ss_se), sub, defect, amp)
    if cfg.chalcogen_scale != 1.0:
        amp[(sub == 1) & np.isin(defect, (0, 1))] *= cfg.chalcogen_scale
    scene = _Scene(cfg, holes, contam, *_random_fields(cfg, rng_bg, rng_tex, rng_cont, ext_x, ext_y, bool(contam)))

    # per-frame artefacts (drawn up front so frame content does not depend on the order)
    hot_idx = rng_hot.choice(H * W, size=min(int(cfg.hot_pixels), H * W), replace=False)
    hot_val = rng_hot.uniform(1.5, 3.0, len(hot_idx)) * cfg.dose
    frame_rngs = [tuple(np.random.default_rng(c) for c in ss.spawn(2)) for ss in ss_frames.spawn(F)]

    frames, truth_frames, glitches = [], [], []
    hole_mask0 = contam_mask0 = None
    for k in range(F):
        atoms = render_gaussians((H, W), xy + drift[k], amp, cfg.sigma_px)
        film, hmask, cmask = scene.film(drift[k])
        expected = _expected_counts(cfg, atoms, film, k)
        frng, grng = frame_rngs[k]  # noise, glitches
        img = _detect(cfg, expected, frng, hot_idx, hot_val)
        glitches += _scan_glitches(cfg, img, grng, k)
        frames.append(img)
        txy = xy + drift[k]
        sel = _inside(txy, H, W)
        truth_frames.append(np.c_[txy[sel], sub[sel], defect[sel]].astype(np.float64))
        if k == 0:
            hole_mask0, contam_mask0 = hmask, cmask

    image = frames[0] if F == 1 else np.stack(frames)
    truth = truth_frames[0]
    meta = _image_meta(cfg, truth, drift, holes, contam, hole_mask0, contam_mask0, glitches, hot_idx)
    if cfg.se_fraction > 0:
        seen = _inside(xy + drift[0], H, W)
        pair = seen & (sub == 1) & (defect == 0)  # a full chalcogen column (a V_S column keeps one atom, S or Se)
        meta.update(se_fraction=float(cfg.se_fraction), n_SSe=int(((n_se == 1) & pair).sum()),
                    n_Se2=int(((n_se == 2) & pair).sum()))
    return SynthImage(image=image, truth=truth, meta=meta, hole_mask=hole_mask0,
                      contamination_mask=contam_mask0,
                      truth_frames=truth_frames if F > 1 else None, drift=drift)


def _resolve_config(config: SynthConfig | None, overrides: dict) -> SynthConfig:
    """``config`` (default settings when None) with the ``overrides`` fields replaced; checked."""
    cfg = config if config is not None else SynthConfig()
    if not isinstance(cfg, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(cfg).__name__}")
    if overrides:
        unknown = set(overrides) - {f.name for f in fields(SynthConfig)}
        if unknown:
            raise TypeError(f"unknown SynthConfig fields: {sorted(unknown)}")
        cfg = replace(cfg, **overrides)
    return cfg


def _sample_extent(cfg: SynthConfig, drift: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """The sample-frame extent (x, y) seen by any frame, plus the Gaussian tails."""
    H, W = cfg.shape
    margin = 4.0 * cfg.sigma_px + 2.0
    x_lo = min(0.0, -drift[:, 0].max()) - margin
    x_hi = W - 1 + max(0.0, -drift[:, 0].min()) + margin
    y_lo = min(0.0, -drift[:, 1].max()) - margin
    y_hi = H - 1 + max(0.0, -drift[:, 1].min()) + margin
    return (x_lo, x_hi), (y_lo, y_hi)


def _place_columns(cfg: SynthConfig, rng_lat: np.random.Generator, rng_def: np.random.Generator,
                   ext_x: tuple[float, float], ext_y: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every lattice site in the extent (sample coordinates = frame-0 image coordinates), randomly
    displaced, with its sublattice and drawn defect: ``(xy, sub, defect)``."""
    H, W = cfg.shape
    M = _lattice_transform(cfg)
    centre = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
    origin = centre + M @ rng_lat.uniform(0.0, 1.0, 2)
    xy, sub = _lattice_sites(M, origin, ext_x, ext_y)
    jit = cfg.position_jitter_A / cfg.pixel_size_A
    if jit > 0:
        xy = xy + rng_lat.normal(0.0, jit, xy.shape)
    u = rng_def.random(len(xy))
    v_s, v_s2, v_mo, mo_s = cfg.rates
    defect = np.zeros(len(xy), dtype=np.int64)
    s2 = sub == 1
    defect[s2 & (u < v_s)] = 1
    defect[s2 & (u >= v_s) & (u < v_s + v_s2)] = 2
    defect[s2 & (u >= v_s + v_s2) & (u < v_s + v_s2 + mo_s)] = 4
    defect[(sub == 0) & (u < v_mo)] = 3
    return xy, sub, defect


def _random_fields(cfg: SynthConfig, rng_bg, rng_tex, rng_cont, ext_x, ext_y, contaminated: bool):
    """The smooth random fields (sample coordinates): background ``[(weight, field)]``, texture and
    the contamination's texture (None when switched off)."""
    bg_fields = [(w, _RandomField(rng_bg, ext_x, ext_y, s_A / cfg.pixel_size_A))
                 for s_A, w in _BG_SCALES_A] if cfg.background > 0 else []
    tex_field = (_RandomField(rng_tex, ext_x, ext_y, max(_TEXTURE_CORR_A / cfg.pixel_size_A, 0.6))
                 if cfg.texture > 0 else None)
    cont_field = (_RandomField(rng_cont, ext_x, ext_y, max(0.5 / cfg.pixel_size_A, 1.0))
                  if contaminated else None)
    return bg_fields, tex_field, cont_field


@dataclass
class _Scene:
    """The film of a synthetic image: holes, contamination and the random fields, in sample
    coordinates; :meth:`film` renders it for a frame."""

    cfg: SynthConfig
    holes: list
    contam: list
    bg_fields: list
    tex_field: _RandomField | None
    cont_field: _RandomField | None

    def film(self, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(film, hole_mask, contamination_mask)`` of the frame whose content is shifted by ``shift``."""
        cfg = self.cfg
        H, W = cfg.shape
        xs = np.arange(W) - shift[0]  # sample coordinates of this frame's pixels
        ys = np.arange(H) - shift[1]
        film = np.zeros((H, W), dtype=np.float32)
        if self.bg_fields:
            wnorm = math.sqrt(sum(w * w for w, _ in self.bg_fields))
            for w, fld in self.bg_fields:
                film += np.float32(0.15 * cfg.background * w / wnorm) * fld.sample(xs, ys)
            film += np.float32(0.75 * cfg.background)
        if self.tex_field is not None:
            film += np.float32(cfg.texture) * self.tex_field.sample(xs, ys)
        cmask = self._add_contamination(film, xs, ys)
        hmask = self._cut_holes(film, xs, ys)
        return film, hmask, cmask

    def _add_contamination(self, film: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        cmask = np.zeros(film.shape, dtype=bool)
        if not self.contam:
            return cmask
        tex = self.cont_field.sample(xs, ys)
        for b in self.contam:
            edge = max(0.3 * b.r0, 1.0)
            box = _blob_box(b, xs, ys, 2.0 * edge)
            if box is None:
                continue
            X, Y = np.meshgrid(xs[box[1]], ys[box[0]])
            depth = b.signed_depth(X, Y)
            prof = 0.5 * (1.0 + np.tanh(depth / (0.5 * edge)))
            film[box] += b.level * prof * np.clip(1.0 + self.cfg.contamination_texture * tex[box], 0.0, None)
            cmask[box] |= depth > 0
        return cmask

    def _cut_holes(self, film: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        hmask = np.zeros(film.shape, dtype=bool)
        for b in self.holes:
            edge = max(self.cfg.sigma_px, 0.5)
            box = _blob_box(b, xs, ys, 4.0 * edge)
            if box is None:
                continue
            X, Y = np.meshgrid(xs[box[1]], ys[box[0]])
            depth = b.signed_depth(X, Y)
            film[box] *= 0.5 * (1.0 - np.tanh(depth / edge))
            hmask[box] |= depth > 0
        return hmask


def _expected_counts(cfg: SynthConfig, atoms: np.ndarray, film: np.ndarray, k: int) -> np.ndarray:
    """Expected counts of frame ``k``: (atoms + film), illumination gradient, scan streaks, times
    the dose (``atoms`` is used as the output buffer)."""
    H, W = cfg.shape
    expected = atoms
    expected += film
    if cfg.illumination_gradient > 0:
        t = np.deg2rad(cfg.illumination_angle_deg)
        gx = (np.arange(W) / max(W - 1, 1) - 0.5) * np.cos(t)
        gy = (np.arange(H) / max(H - 1, 1) - 0.5) * np.sin(t)
        expected *= (1.0 + cfg.illumination_gradient * (gy[:, None] + gx[None, :])).astype(np.float32)
    if cfg.scan_streaks:
        srng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(8)[7].spawn(int(cfg.n_frames))[k])
        for _ in range(int(cfg.scan_streaks)):
            row = int(srng.integers(0, H))
            level = cfg.streak_level * srng.uniform(0.5, 1.5) * (1 if srng.random() < 0.5 else -1)
            expected[row:row + int(srng.integers(1, 4))] += np.float32(level)
    np.maximum(expected, 0.0, out=expected)
    expected *= np.float32(cfg.dose)
    return expected


def _detect(cfg: SynthConfig, expected: np.ndarray, frng: np.random.Generator, hot_idx: np.ndarray,
            hot_val: np.ndarray) -> np.ndarray:
    """The detected frame: Poisson counts, Gaussian read noise and hot pixels (or, without noise,
    the expected counts)."""
    if not cfg.noise:
        return expected.astype(np.float32)
    img = frng.poisson(expected).astype(np.float32)
    read_sd = cfg.gaussian_noise / 100.0 * cfg.dose
    if read_sd > 0:
        noise = frng.standard_normal(img.shape, dtype=np.float32)
        noise *= np.float32(read_sd)
        img += noise
    if len(hot_idx):
        img.ravel()[hot_idx] += hot_val.astype(np.float32)
    return img


def _scan_glitches(cfg: SynthConfig, img: np.ndarray, grng: np.random.Generator, k: int) -> list[dict]:
    """Shift a few bands of rows sideways in place (scan glitches of frame ``k``); returns their records."""
    H = cfg.shape[0]
    out = []
    for _ in range(int(cfg.scan_glitches)):
        row = int(grng.integers(0, H))
        n_rows = int(grng.integers(1, 4))
        shift = int(grng.integers(1, 5)) * (1 if grng.random() < 0.5 else -1)
        rows = slice(row, min(H, row + n_rows))
        band = img[rows].copy()
        img[rows] = np.roll(band, shift, axis=1)
        if shift > 0:
            img[rows, :shift] = band[:, :1]
        else:
            img[rows, shift:] = band[:, -1:]
        out.append({"frame": k, "row": row, "rows": rows.stop - rows.start, "shift_px": shift})
    return out


def _image_meta(cfg: SynthConfig, truth: np.ndarray, drift: np.ndarray, holes: list, contam: list,
                hole_mask0: np.ndarray, contam_mask0: np.ndarray, glitches: list, hot_idx: np.ndarray) -> dict:
    """The JSON-able ``meta`` of a synthetic image (settings, geometry, artefacts, truth counts)."""
    H, W = cfg.shape
    F = int(cfg.n_frames)
    nn = cfg.nn_px
    sig = cfg.sigma_px
    counts = {f"n_{name}": int((truth[:, 2] == s).sum()) for s, name in enumerate(SUBLATTICE_NAMES)}
    counts.update({f"n_{name}": int((truth[:, 3] == d).sum()) for d, name in enumerate(DEFECT_NAMES) if d})
    meta = {
        "n": int(max(H, W)),
        "shape": [H, W],
        "pixel_size_A": float(cfg.pixel_size_A),
        "a_A": float(cfg.a_A),
        "theta_deg": float(cfg.rotation_deg),
        "theta": float(cfg.rotation_deg),
        "strain": list(cfg.strain),
        "scan_distortion": list(cfg.scan_distortion),
        "rates": list(cfg.rates),
        "dose": float(cfg.dose),
        "seed": int(cfg.seed),
        "nn_px": float(nn),
        "column_sigma_A": float(cfg.column_sigma_A),
        "sigma_px": float(sig),
        "intensity_S2_over_Mo": chalcogen_pair_intensity(),
        "n_frames": F,
        "drift_px": drift.tolist(),
        "holes": [b.to_dict() for b in holes],
        "hole_fraction": float(hole_mask0.mean()),
        "contamination": [b.to_dict() for b in contam],
        "contamination_fraction": float(contam_mask0.mean()),
        "scan_glitches": glitches,
        "hot_pixels": [[int(i % W), int(i // W)] for i in hot_idx],
        "noise": bool(cfg.noise),
        "config": cfg.to_dict(),
        **counts,
    }
    return meta


def make_lattice(shape: tuple[int, int], spacing: float, *, rotation_deg: float = 0.0,
                 sigma: float | None = None, noise: float = 0.0, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A triangular lattice of identical unit-peak Gaussian blobs (for kernel tests).

    Parameters
    ----------
    shape : (H, W).
    spacing : nearest-neighbour distance in px.
    rotation_deg : angle of the first lattice vector from +x.
    sigma : blob standard deviation in px (default ``0.15 * spacing``).
    noise : standard deviation of additive Gaussian noise (blob peak = 1).
    seed : seeds the sub-pixel lattice origin and the noise.

    Returns
    -------
    image : float32 ``[H, W]`` (background 0).
    xy : float64 ``[N, 2]`` blob centres inside the image (``0 <= x <= W-1``, ``0 <= y <= H-1``).

    Examples
    --------
    >>> img, xy = make_lattice((64, 64), 8.0, seed=1)
    >>> img.shape, xy.shape[1], bool(0.8 < img.max() <= 1.0)
    ((64, 64), 2, True)
    """
    H, W = (int(s) for s in shape)
    if H < 1 or W < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    sigma = 0.15 * spacing if sigma is None else float(sigma)
    rng = np.random.default_rng(seed)
    t = math.radians(rotation_deg)
    R = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    M = R @ (spacing * np.array([[1.0, 0.5], [0.0, math.sqrt(3.0) / 2.0]]))
    origin = np.array([(W - 1) / 2.0, (H - 1) / 2.0]) + rng.uniform(-0.5, 0.5, 2)
    m = 4.0 * sigma + 1.0
    corners = np.array([[-m, -m], [W - 1 + m, -m], [-m, H - 1 + m], [W - 1 + m, H - 1 + m]])
    f = np.linalg.solve(M, (corners - origin).T).T
    lo, hi = np.floor(f.min(0)) - 1, np.ceil(f.max(0)) + 1
    i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    xy = origin + np.c_[i.ravel(), j.ravel()] @ M.T
    img = render_gaussians((H, W), xy, 1.0, sigma)
    if noise > 0:
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    xy = xy[_inside(xy, H, W)]
    xy = xy[np.lexsort((xy[:, 0], xy[:, 1]))]
    return img, xy


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def save_truth(path: str | os.PathLike, truth: np.ndarray, meta: Mapping) -> Path:
    """Write ground truth as ``np.savez(path, truth=truth, meta=json.dumps(meta))`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, truth=np.asarray(truth, dtype=np.float64), meta=json.dumps(dict(meta)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_truth(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a ``*.truth.npz`` written by :func:`save_truth` (or the dev data): ``(truth, meta)``."""
    with np.load(path, allow_pickle=False) as z:
        truth = np.asarray(z["truth"], dtype=np.float64)
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return truth, meta


_EXAMPLES = (
    dict(rotation_deg=12.0, dose=500.0, strain=(0.005, -0.003, 0.002)),
    dict(rotation_deg=37.0, dose=250.0, pixel_size_A=0.14, strain=(0.01, -0.005, 0.004),
         scan_distortion=(0.0, 0.015), holes=1, contamination=1),
    dict(rotation_deg=-8.0, dose=800.0, pixel_size_A=0.10, scan_glitches=2, hot_pixels=3),
    dict(rotation_deg=24.0, dose=150.0, rates=(0.06, 0.02, 0.01, 0.01)),
)


def save_example(directory: str | os.PathLike, *, n_images: int = 2, size: int = 512,
                 seed: int = 0) -> list[Path]:
    """Write small example micrographs (calibrated TIFF) and their ``.truth.npz`` files.

    The images cycle through a few settings (rotations, doses, pixel sizes, a hole and a
    contamination patch, scan glitches, hot pixels). Files: ``mos2_example_NN.tif`` and
    ``mos2_example_NN.truth.npz`` (format of :func:`save_truth`).

    Parameters
    ----------
    directory : output folder (created).
    n_images : number of micrographs.
    size : image side in px (at least :data:`MIN_SIDE`).
    seed : base seed; image ``i`` uses ``seed + i``.

    Returns
    -------
    Paths of the micrographs (not the truth files).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = save_example(d, n_images=1, size=64)
    ...     [p.name for p in paths]
    ['mos2_example_01.tif']
    """
    if n_images < 0:
        raise ValueError("n_images must be >= 0")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(int(n_images)):
        settings = dict(_EXAMPLES[i % len(_EXAMPLES)])
        if i >= len(_EXAMPLES):
            settings["rotation_deg"] = float(settings["rotation_deg"]) + 7.0 * (i // len(_EXAMPLES))
        nn = SynthConfig(**{k: v for k, v in settings.items() if k in ("pixel_size_A", "a_A")}).nn_px
        # holes / patches cover a small part of the image also for small sizes
        settings.setdefault("hole_radius_nn", min(4.0, size / 10.0 / nn))
        settings.setdefault("contamination_radius_nn", min(3.0, size / 12.0 / nn))
        s = make_mos2(shape=(int(size), int(size)), seed=int(seed) + i, **settings)
        p = directory / f"mos2_example_{i + 1:02d}.tif"
        s.save(p)
        paths.append(p)
        log.info("wrote %s (%d sites)", p, len(s.truth))
    return paths
