"""Settings of the patch model, :class:`RVAEConfig`, and the :class:`Encoding` it returns -- both
without importing torch, so that settings can be made, read and checked (and encodings received from
another process) in a process that never loads the network."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from ..limits import check_section

__all__ = ["RVAEConfig", "Encoding", "BACKGROUNDS", "BACKGROUND_QUANTILE", "background_rank", "default_mask_radius",
           "disc_mask", "MIN_PATCH_SIZE", "check_patch_shape", "check_finite_patches", "check_batch_size"]

log = logging.getLogger(__name__)

#: choices of ``RVAEConfig.background``
BACKGROUNDS = ("none", "patch")
#: quantile of a patch's pixel values taken as its background (``background = "patch"``; the torch
#: model's ``subtract_background`` and the compiled engine's kernel, through :func:`background_rank`)
BACKGROUND_QUANTILE = 0.1


def background_rank(n_pixels: int, quantile: float = BACKGROUND_QUANTILE) -> int:
    """Which order statistic (1-based) of a patch's ``n_pixels`` values is its background:
    ``max(1, round(quantile * n_pixels))``.

    >>> background_rank(576)
    58
    """
    return max(1, int(round(quantile * n_pixels)))


def default_mask_radius(size: int) -> float:
    """Default disc radius, ``size / 2 - 0.5`` px (~ input_size / 2).

    The half pixel keeps every bilinear sample of a rotated disc pixel inside the pixel grid, so
    rotating a full patch never mixes padding into the disc. The model therefore rotates first and
    masks afterwards: a disc-edge pixel's bilinear neighbours may lie just outside the disc (real
    image content); masking before rotating would blend zeros into the disc edge instead.
    """
    return size / 2.0 - 0.5


def disc_mask(size: int, radius: float | None = None) -> np.ndarray:
    """The model's disc mask, float32 ``(size, size)``: 1 where the pixel centre is within ``radius``
    (default :func:`default_mask_radius`) of the patch centre.

    >>> disc_mask(4).astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    r = default_mask_radius(size) if radius is None else float(radius)
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return (((xx - c) ** 2 + (yy - c) ** 2) <= r * r + 1e-9).astype(np.float32)


#: the smallest patch (px) a model takes (torch's resampling refuses smaller ones)
MIN_PATCH_SIZE = 4


def check_patch_shape(shape) -> None:
    """ValueError unless ``shape`` is that of square patches ``[N, S, S]`` with ``S >= MIN_PATCH_SIZE``:
    the check of every model's input (the torch :class:`~stemfast.model.RVAE` and the compiled engine).

    >>> check_patch_shape((5, 3, 3))
    Traceback (most recent call last):
    ...
    ValueError: patches are too small (3 px; at least 4)
    """
    if shape is None or len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"patches must be a [N, S, S] array of square patches, got shape "
                         f"{tuple(shape) if shape is not None else None}")
    if shape[1] < MIN_PATCH_SIZE:
        raise ValueError(f"patches are too small ({shape[1]} px; at least {MIN_PATCH_SIZE})")


def check_finite_patches(x: np.ndarray, start: int = 0) -> None:
    """ValueError naming the first patch of ``x [n, S, S]`` with a NaN or infinite value (``start``: the
    index of ``x[0]`` among all patches). A model fed one would train to NaN weights (or crash in torch's
    backward pass) and encodes it to NaN, or, on the compiled engine, to plausible numbers.

    >>> check_finite_patches(np.array([[[0.0]], [[np.nan]]]), start=10)
    Traceback (most recent call last):
    ...
    ValueError: patch 11 has non-finite values (NaN or inf): fill or drop it first
    """
    x = np.asarray(x)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.size else np.ones(len(x), bool)
    if not finite.all():
        i = start + int(np.flatnonzero(~finite)[0])
        more = int((~finite).sum()) - 1
        raise ValueError(f"patch {i} {f'(and {more} more) ' if more else ''}has non-finite values (NaN or inf): "
                         "fill or drop it first")


def check_batch_size(batch_size) -> int:
    """``int(batch_size)``; ValueError unless ``batch_size >= 1`` (patches per model call in ``encode``).

    >>> check_batch_size(0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be >= 1, got 0
    """
    try:
        ok = batch_size >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return int(batch_size)


@dataclass(frozen=True)
class RVAEConfig:
    """Settings of the patch model (``[model]`` section of ``stemfast.toml``).

    Parameters
    ----------
    model : {"rvae", "vae"}
        ``"rvae"``: STN + VAE (rotation invariant); ``"vae"``: the plain VAE baseline with the same
        encoder / decoder.
    latent_dim : int
        Latent size L.
    input_size : int
        Patches of any size S are resampled to ``input_size`` (a multiple of 8) before the model.
        24 (the default since model 1.2; 32 before): a patch spans ~2.8 site spacings, so 24 px
        keep ~8.6 px per spacing (the real WSe2 scans are recorded at 5), and the network runs
        ~1.7x faster than at 32 with the same classes and defect ranking on the shared real and
        simulated images. 16 px ran 2.1-2.5x faster with the same rankings too, but its
        reconstructions lost a third of their fidelity and its STN angles half their precision
        (docs/RESULTS.md, round 7).
    resample : {"bilinear", "area"}
        Resampling to ``input_size``: antialiased bilinear or area averaging. Stored with the
        model, so a loaded model treats new patches the same way.
    channels, stn_channels : tuple of int
        Conv widths of the encoder / decoder and of the STN.
    stn_downsample : {1, 2} or None
        Average-pool factor of the STN's input. None: 2 at ``input_size`` >= 24, else 1 -- the STN
        sees the patch at 12 px or more (pooled to 8 px, a 16 px input's angles were 3x less
        accurate: 1.06 vs 0.35 deg on the rotated renderings of tests/test_model.py; 24 px pooled
        to 12: 0.50 deg). Resolved on construction; a saved config without it (models before 1.2)
        was trained with 2.
    rotation_symmetry : int
        Rotation order k of the sites; the canonical frame is defined modulo ``360 / k`` degrees.
        3 for MoS2 / hBN-like lattices (C3v sites: the first shell has 6 directions, but a 60 deg
        rotation turns a Mo site into a different image), 6 for graphene / triangular, 4 for
        square. See :class:`stemfast.model.modules.STN`.
    symmetrize : {"image", "features", "none"}
        How the rVAE encoder is made invariant to the k canonical branches (rotations by
        ``360 / k`` left open by the STN), so the latent code does not jump when the STN angle
        crosses its branch cut: encode the branch-averaged patch (``"image"``, k warps), average the
        encodings of all branches (``"features"``, k encoder passes) or not at all (``"none"``).
        See :class:`stemfast.model.modules.RVAENet`.
    mask_radius : float or None
        Radius (px at ``input_size``) of the disc applied to inputs and the reconstruction loss;
        None = ``input_size / 2 - 0.5``.
    beta : float
        Weight of the KL term against the masked sum of squared errors.
    kl_warmup : int
        Epochs over which the KL weight ramps linearly from ``beta / kl_warmup`` to ``beta``
        (against posterior collapse); early stopping starts after the ramp.
    lr, stn_lr : float
        Adam learning rates.
    batch_size, epochs, stn_epochs, patience : int
        Mini-batch size; maximal epochs of VAE training / STN pretraining; early-stopping patience
        (epochs without a relative validation improvement of ``min_delta``).
    val_fraction : float
        Held-out fraction for validation / early stopping.
    augment_rotate, augment_flip : bool
        Random rotations (uniform in [0, 360)) and x-flips of training batches.
    augment_shift : float
        Maximal random sub-pixel translation (px at ``input_size``); 0 disables.
    anchor_weight : float
        Weight of the angle-difference anchor term in STN pretraining.
    seed : int
        Seeds torch and NumPy generators (splits, shuffling, augmentation, initialisation).
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    engine : {"auto", "compiled", "torch"}
        What runs a trained model's inference pass where torch is not needed otherwise (the shipped
        model used as is): ``"compiled"`` -- the ``rvae_forward`` kernel on the CPU, no torch import
        (:mod:`stemfast.model.engine`; same outputs to float32 rounding); ``"torch"``; ``"auto"``
        -- compiled unless a GPU may be used (``device`` ``"cuda..."``, or ``"auto"`` with an NVIDIA
        GPU visible). Training and fine-tuning always use torch.
    amp : bool
        Mixed precision (bf16, else fp16 + grad scaling) for training and fine-tuning on CUDA;
        ignored on CPU. Inference (encoding) runs in float32 on every device, so a GPU gives the
        CPU's latents, classes and scores.
    max_train_patches : int or None
        Random subsample of the training patches when more are given.
    num_threads : int or None
        ``torch.set_num_threads`` for the run; None keeps torch's setting (OMP_NUM_THREADS) unless
        ``STEMFAST_NUM_THREADS`` is set.
    progress : bool or None
        progress of the epochs: True a tqdm bar, False none; None = a bar on a terminal, INFO lines in
        the log elsewhere (:func:`stemfast.logutil.progress`; ``STEMFAST_PROGRESS`` overrides).
    """

    model: Literal["rvae", "vae"] = "rvae"
    latent_dim: int = 4
    input_size: int = 24
    resample: Literal["bilinear", "area"] = "bilinear"
    background: Literal["patch", "none"] = "patch"
    channels: tuple[int, int, int] = (8, 16, 32)
    stn_channels: tuple[int, int] = (8, 8)
    stn_downsample: int | None = None
    rotation_symmetry: int = 3
    symmetrize: Literal["image", "features", "none"] = "image"
    mask_radius: float | None = None
    beta: float = 1.0
    kl_warmup: int = 5
    lr: float = 2e-3
    stn_lr: float = 3e-3
    batch_size: int = 256
    epochs: int = 30
    stn_epochs: int = 10
    patience: int = 5
    min_delta: float = 1e-3
    val_fraction: float = 0.1
    augment_rotate: bool = True
    augment_flip: bool = True
    augment_shift: float = 0.5
    anchor_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    engine: Literal["auto", "compiled", "torch"] = "auto"
    amp: bool = True
    max_train_patches: int | None = 20000
    num_threads: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        # TOML / JSON give lists: store tuples so the config stays hashable and comparable
        for name in ("channels", "stn_channels"):
            v = getattr(self, name)
            if not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(int(c) for c in v))
        if self.resample not in ("bilinear", "area"):
            raise ValueError(f"resample must be 'bilinear' or 'area', got {self.resample!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.engine not in ("auto", "compiled", "torch"):
            raise ValueError(f"engine must be 'auto', 'compiled' or 'torch', got {self.engine!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.symmetrize not in ("image", "features", "none"):
            raise ValueError(f"symmetrize must be 'image', 'features' or 'none', got {self.symmetrize!r}")
        if self.model not in ("rvae", "vae"):
            raise ValueError(f"model must be 'rvae' or 'vae', got {self.model!r}")
        if self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"input_size must be a positive multiple of 8, got {self.input_size}")
        if self.stn_downsample is None:
            object.__setattr__(self, "stn_downsample", 2 if self.input_size >= 24 else 1)
        if self.stn_downsample not in (1, 2):
            raise ValueError(f"stn_downsample must be 1, 2 or None, got {self.stn_downsample!r}")
        if len(self.channels) != 3 or len(self.stn_channels) != 2:
            raise ValueError("channels needs 3 widths and stn_channels 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be >= 0, got {self.kl_warmup}")
        if self.batch_size < 1 or self.stn_epochs < 0 or self.patience < 1:
            raise ValueError("batch_size and patience must be >= 1, stn_epochs >= 0")
        if self.beta < 0 or self.lr <= 0 or self.stn_lr <= 0 or self.augment_shift < 0:
            raise ValueError("beta and augment_shift must be >= 0, learning rates > 0")
        if self.max_train_patches is not None and self.max_train_patches < 2:
            raise ValueError(f"max_train_patches must be >= 2 or None, got {self.max_train_patches}")
        check_section(self, "model")  # the ranges of stemfast.limits.SETTING_LIMITS (epochs, latent_dim, ...)

    @classmethod
    def from_dict(cls, d: dict) -> "RVAEConfig":
        """Build from a dict, ignoring (and logging) unknown keys, e.g. from a newer version."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            log.warning("RVAEConfig: ignoring unknown keys %s", unknown)
        d = dict(d)
        d.setdefault("background", "none")  # saved before the setting existed: trained on uncorrected patches
        d.setdefault("stn_downsample", 2)  # saved before the setting existed: the STN pooled by 2
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Encoding:
    """Result of :meth:`RVAE.encode` for N patches (NumPy arrays).

    Attributes
    ----------
    mu, logvar : float32 [N, L]
        Posterior mean and log-variance of the latent code.
    angle : float32 [N]
        STN orientation in degrees (counter-clockwise as displayed, y down; defined modulo
        ``360 / rotation_symmetry``); NaN for the plain VAE.
    recon_error : float32 [N]
        Masked mean squared error per patch between the reconstruction (rotated back into the
        input orientation) and the input, at the model's ``input_size``.
    recon : float32 [N, input_size, input_size] or None
        Reconstructions in the input frame (only with ``return_recon=True``).
    angle_strength : float32 [N] or None
        How strongly each patch has one orientation: the length of the STN's harmonic vector
        (:class:`~stemfast.model.modules.STN`; near 0 where the patch looks alike at every multiple
        of ``180 / rotation_symmetry`` degrees, so ``angle`` is noise there); NaN for the plain VAE.
    """

    mu: np.ndarray
    logvar: np.ndarray
    angle: np.ndarray
    recon_error: np.ndarray
    recon: np.ndarray | None = None
    angle_strength: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mu)
