"""The patch model's inference pass without torch: :class:`CompiledModel`.

Encoding a patch needs ~1 ms of arithmetic at most, but importing torch and kornia costs seconds
(about 3.5 s of one core here), longer than every other stage on a 1024 x 1024 image together.
:class:`CompiledModel` runs the trained network's forward pass -- STN angle, canonical rotation,
C_k symmetrisation, encoder, decoder, rotation back, reconstruction error; the same layers as
:class:`stemfast.model.modules.RVAENet` / ``VAENet`` in eval mode -- in the compiled kernel
``rvae_forward`` (:mod:`stemfast._kernels`; C++, Numba, NumPy reference), from the weights as plain
arrays. It agrees with :meth:`stemfast.model.RVAE.encode` on the CPU to float32 rounding (~1e-6
of the latents; tested), never imports torch, and is what ``analyze`` / ``batch`` use for the
shipped model on the CPU (setting ``model.engine``). Training, fine-tuning, model files and the GPU
stay with torch.

Weights
-------
:func:`prepare_weights` turns a network ``state_dict`` (torch names and layouts, as NumPy arrays)
into the kernel's layouts (channels-last, convolution weights ``[ky][kx][cin][cout]``, the STN's
last layer folded into its harmonic pooling). The shipped model's arrays are stored next to its
torch file (``default_rvae.npz``, with its own SHA-256 in the manifest).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .settings import (BACKGROUND_QUANTILE, Encoding, RVAEConfig, background_rank, check_batch_size,
                       check_finite_patches, check_patch_shape, disc_mask)

__all__ = ["CompiledModel", "prepare_weights", "resolve_engine", "check_device", "engine_for", "engine_of",
           "device_of", "on_device", "on_backend", "combined_engine", "subtract_background", "state_arrays"]

#: patches per kernel call (bounds the temporary memory of the NumPy reference)
_CHUNK = 4096
_SYMMETRIZE = {"none": 0, "image": 1, "features": 2}


def _gpu_visible() -> bool:
    """Whether an NVIDIA GPU may be usable here, judged without importing torch (driver present and
    not hidden by ``CUDA_VISIBLE_DEVICES``)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


def resolve_engine(engine: str, device: str = "auto") -> str:
    """``"compiled"`` or ``"torch"`` for the settings ``model.engine`` and ``model.device`` (values
    checked by :class:`~stemfast.model.RVAEConfig`).

    ``auto``: the compiled engine when the model would run on the CPU (``device`` ``"cpu"``, or
    ``"auto"`` on a machine without a visible NVIDIA GPU), torch otherwise. ``compiled`` with a GPU
    ``device`` is an error (the compiled engine is CPU only).

    Examples
    --------
    >>> resolve_engine("torch")
    'torch'
    >>> resolve_engine("auto", "cpu")
    'compiled'
    """
    on_gpu = device.startswith("cuda") or (device == "auto" and _gpu_visible())
    if engine == "compiled" and device.startswith("cuda"):
        raise ValueError(f"model.engine 'compiled' runs on the CPU only; model.device is {device!r}")
    if engine == "auto":
        return "torch" if on_gpu else "compiled"
    return engine


def check_device(device: str) -> None:
    """:class:`~stemfast.errors.SettingsError` when ``device`` (the setting ``model.device``) asks for
    CUDA and no NVIDIA GPU is visible here (:func:`_gpu_visible`, without importing torch): said
    before any work (``batch``, ``analyze``, ``train``), not as a failure of every input. A GPU that
    is visible but unusable by this torch build is reported by
    :func:`stemfast.model.training.resolve_device` when the model is placed."""
    from ..errors import SettingsError

    if str(device).startswith("cuda") and not _gpu_visible():
        raise SettingsError(f"model.device is {device!r} but no NVIDIA GPU is visible here (no driver, or "
                            "CUDA_VISIBLE_DEVICES hides it): use 'auto' (the GPU where there is one) or 'cpu'")


def engine_for(config) -> str:
    """:func:`resolve_engine` of a run's settings (a PipelineConfig, its ``model`` section)."""
    m = getattr(config, "model", None)
    return resolve_engine(getattr(m, "engine", "auto"), getattr(m, "device", "auto"))


def engine_of(model) -> str:
    """What runs ``model``'s inference: ``"compiled"`` for a :class:`CompiledModel`, ``"torch"`` for
    anything else (an :class:`~stemfast.model.RVAE`)."""
    return "compiled" if (getattr(model, "extra", None) or {}).get("engine") == "compiled" else "torch"


def device_of(model) -> str | None:
    """Where ``model``'s inference runs: ``"cpu"`` for the compiled engine, else the torch device
    (``"cpu"``, ``"cuda:0"``...; an encode worker's model reports its child's), None when unknown."""
    if engine_of(model) == "compiled":
        return "cpu"
    dev = getattr(model, "device", None)
    return str(dev) if dev is not None else None


def on_device(model, device: str):
    """``model`` on ``device`` (the setting ``model.device``): a torch model
    (:class:`~stemfast.model.RVAE`) is moved there, in place (nothing moves when it is there
    already); a model that cannot move (the compiled engine, an encode worker's stand-in) is
    returned as it is."""
    to = getattr(model, "to", None)
    return to(device) if callable(to) else model


def on_backend(model, backend: str | None):
    """``model`` running its kernels on ``backend``, the run's setting ``sites.backend`` (``cpp`` /
    ``numba`` / ``numpy``): the kernel backend is one setting for the whole run, and the compiled
    engine has none of its own (``model.engine`` picks the engine, ``model.device`` torch's device).

    A :class:`CompiledModel` on another backend is returned as a copy on ``backend`` (the weights
    shared); ``backend`` None (the run sets none: ``STEMFAST_BACKEND`` or the fastest) leaves the
    model's own (None for the ones the package loads: the same default). A torch model or an encode
    worker's stand-in runs no kernels: returned as it is.

    Examples
    --------
    >>> m = on_backend(CompiledModel(state, config), "numpy")  # doctest: +SKIP
    >>> m.backend  # doctest: +SKIP
    'numpy'
    """
    if backend is None or not isinstance(model, CompiledModel) or model.backend == backend:
        return model
    import copy

    out = copy.copy(model)
    out.backend = backend
    return out


def combined_engine(names) -> str | None:
    """One label for the engines (or devices, :func:`device_of`) that ran a set of images:
    ``"compiled"`` or ``"torch"`` when all agree, ``"compiled and torch"`` when they do not (e.g.
    Dask workers whose package could not use the compiled engine), None when none ran.

    >>> combined_engine(["compiled", None, "compiled"]), combined_engine(["torch", "compiled"])
    ('compiled', 'compiled and torch')
    """
    seen = sorted({str(n) for n in names if n})
    return " and ".join(seen) if seen else None


def subtract_background(x: np.ndarray, quantile: float = BACKGROUND_QUANTILE) -> np.ndarray:
    """Each patch of ``x (N, S, S)`` minus its ``quantile`` pixel value (as
    :func:`stemfast.model.functional.subtract_background`: the k-th smallest value, ``k =
    max(1, round(quantile * S * S))``)."""
    from .._kernels.numpy_ref.model import subtract_rank  # what rvae_forward's background_rank does

    return subtract_rank(x, background_rank(x.shape[1] * x.shape[2], quantile))


def _conv_w(w: np.ndarray) -> np.ndarray:
    """torch ``(cout, cin, k, k)`` -> ``[ky][kx][cin][cout]``."""
    return np.ascontiguousarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0))


def _stn_kernel(sd: Mapping[str, np.ndarray], config: RVAEConfig) -> tuple[np.ndarray, np.ndarray]:
    """The STN's last 1x1 layer folded into its harmonic pooling (as ``STN.forward``): ``(2, h w C)``
    weights in channels-last order and the bias terms ``(2,)``, computed in float32 as torch does."""
    s = config.input_size
    k = config.rotation_symmetry
    h = s // config.stn_downsample
    c = (h - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float64)
    dx, dy = xx - c, yy - c
    r = np.sqrt(dx * dx + dy * dy).astype(np.float32) * np.float32(s / h)
    phi = np.arctan2(-dy, dx).astype(np.float32)
    radial = np.asarray(sd["stn.radial_weight"], np.float32)
    n_rad = radial.shape[0]
    rmax = s / 2.0
    centres = np.linspace(0.0, rmax, n_rad).astype(np.float32)
    width = rmax / max(n_rad - 1, 1)
    basis = np.exp(-((r[None] - centres[:, None, None]) ** 2) / np.float32(2 * width**2)).astype(np.float32)
    basis = np.where((basis > 1e-6) & (r[None] <= rmax), basis, np.float32(0.0))
    rho = np.einsum("j,jhw->hw", radial, basis).astype(np.float32)
    kern = np.stack([np.cos(k * phi), np.sin(k * phi)]).astype(np.float32) * rho[None]  # (2, h, w)
    wc = np.asarray(sd["stn.features.5.weight"], np.float32)[0, :, 0, 0]  # (C,)
    full = (wc[None, None, :, None] * kern.transpose(1, 2, 0)[:, :, None, :]).reshape(-1, 2)  # (h, w, C, 2)
    bias = sd.get("stn.features.5.bias")
    kb = (np.float32(np.asarray(bias, np.float32)[0]) * kern.sum((1, 2))) if bias is not None else np.zeros(2)
    return np.ascontiguousarray(full.T, np.float32), np.asarray(kb, np.float32)


def prepare_weights(state: Mapping[str, Any], config: RVAEConfig) -> dict:
    """The arguments of the ``rvae_forward`` kernel for a network's ``state_dict`` (arrays under the
    torch module names of :class:`stemfast.model.modules.RVAENet` / ``VAENet``) and its settings.

    Returns ``{"mask", "stn", "enc", "dec", "symmetry", "symmetrize", "stn_downsample"}``.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in state.items()}
    s = config.input_size
    s0 = s // 8
    c3 = config.channels[2]
    hw = sd["encoder.head.weight"]  # (2L, C3 s0 s0) over (c, y, x)
    head_w = hw.reshape(hw.shape[0], c3, s0, s0).transpose(2, 3, 1, 0).reshape(-1, hw.shape[0])  # [in][out]
    fw, fb = sd["decoder.fc.0.weight"], sd["decoder.fc.0.bias"]  # (C3 s0 s0, L) over (c, y, x)
    fc_w = fw.reshape(c3, s0, s0, -1).transpose(3, 1, 2, 0).reshape(fw.shape[1], -1)  # [in][out]
    fc_b = fb.reshape(c3, s0, s0).transpose(1, 2, 0).reshape(-1)
    enc = (_conv_w(sd["encoder.net.0.weight"]), sd["encoder.net.0.bias"], _conv_w(sd["encoder.net.2.weight"]),
           sd["encoder.net.2.bias"], _conv_w(sd["encoder.net.4.weight"]), sd["encoder.net.4.bias"],
           head_w, sd["encoder.head.bias"])
    dec = (fc_w, fc_b, _conv_w(sd["decoder.net.0.weight"]), sd["decoder.net.0.bias"],
           _conv_w(sd["decoder.net.3.weight"]), sd["decoder.net.3.bias"], _conv_w(sd["decoder.net.6.weight"]),
           sd["decoder.net.6.bias"])
    rvae = config.model == "rvae"
    stn: tuple = ()
    k = config.rotation_symmetry
    if rvae:
        kern, kb = _stn_kernel(sd, config)
        stn = (_conv_w(sd["stn.features.1.weight"]), sd["stn.features.1.bias"], _conv_w(sd["stn.features.3.weight"]),
               sd["stn.features.3.bias"], kern, kb)
    cont = lambda t: tuple(np.ascontiguousarray(a, np.float32) for a in t)  # noqa: E731
    return {"mask": disc_mask(s, config.mask_radius), "stn": cont(stn), "enc": cont(enc), "dec": cont(dec),
            "symmetry": int(k), "symmetrize": _SYMMETRIZE[config.symmetrize] if rvae and k > 1 else 0,
            "stn_downsample": int(config.stn_downsample)}


def state_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` weights file (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}


class CompiledModel:
    """A trained patch model run by the compiled ``rvae_forward`` kernel (no torch).

    Parameters
    ----------
    state : mapping of str to array
        The network's ``state_dict`` as arrays (torch names and layouts).
    config : RVAEConfig
        Its settings (architecture and input normalisation).
    extra : dict
        Metadata as :attr:`stemfast.model.RVAE.extra` (e.g. the shipped model's name and version).
    backend : str or None
        Kernel backend (``cpp`` / ``numba`` / ``numpy``; None: the session's, :func:`stemfast.backend.get_kernels`).

    Examples
    --------
    >>> m = CompiledModel(state, config)  # doctest: +SKIP
    >>> enc = m.encode(patches)  # patches (N, S, S) float32 -> Encoding  # doctest: +SKIP
    """

    def __init__(self, state: Mapping[str, Any], config: RVAEConfig, *, extra: dict | None = None,
                 backend: str | None = None) -> None:
        if config.model not in ("rvae", "vae"):
            raise ValueError(f"unknown model type {config.model!r}")
        self.config = config
        self.extra = dict(extra or {})
        self.backend = backend
        self._w = prepare_weights(state, config)

    def encode(self, patches: Any, *, batch_size: int = _CHUNK, return_recon: bool = False) -> Encoding:
        """Encode ``patches [N, S, S]`` as :meth:`stemfast.model.RVAE.encode` does (same outputs,
        float32 rounding apart), in chunks of ``batch_size``; refused as there (ValueError): a shape
        other than ``[N, S, S]`` with ``S >= 4``, ``batch_size < 1``, a patch with NaN or inf."""
        from ..backend import get_kernels
        from ..patches import resample_weights

        if not hasattr(patches, "shape") or not hasattr(patches, "__getitem__"):
            patches = np.asarray(patches)
        shape = patches.shape
        check_patch_shape(shape)
        batch_size = check_batch_size(batch_size)
        k = get_kernels(self.backend)
        cfg = self.config
        s = cfg.input_size
        n = int(shape[0])
        n_lat = cfg.latent_dim
        mu = np.empty((n, n_lat), np.float32)
        logvar = np.empty((n, n_lat), np.float32)
        angle = np.empty(n, np.float32)
        strength = np.empty(n, np.float32)
        err = np.empty(n, np.float32)
        recon = np.empty((n, s, s), np.float32) if return_recon else None
        if shape[1] != s and cfg.resample != "bilinear":
            raise ValueError(f"the compiled engine resamples patches bilinearly only (resample={cfg.resample!r})")
        wr = resample_weights(int(shape[1]), s).astype(np.float32) if shape[1] != s else None
        w = self._w
        bg_rank = background_rank(s * s) if cfg.background == "patch" else 0
        empty = np.empty((0, 0, 0), np.float32)
        for a in range(0, n, batch_size):
            b = min(n, a + batch_size)
            x = np.asarray(patches[a:b], np.float32)
            check_finite_patches(x, a)
            if wr is not None:
                x = np.einsum("ij,njk,lk->nil", wr, x, wr, optimize=True).astype(np.float32)
            x = np.ascontiguousarray(x, np.float32)
            out = recon[a:b] if recon is not None else empty
            res = k.rvae_forward(x, w["mask"], w["stn"], w["enc"], w["dec"], w["symmetry"], w["symmetrize"],
                                 w["stn_downsample"], bg_rank, out)  # the background is taken out in the kernel
            mu[a:b], logvar[a:b], angle[a:b], strength[a:b], err[a:b] = res
        return Encoding(mu=mu, logvar=logvar, angle=angle, recon_error=err, recon=recon, angle_strength=strength)

    def close(self) -> None:
        """Nothing to release (the interface of :class:`stemfast.encode_worker.WorkerModel`)."""

    def __repr__(self) -> str:
        return f"CompiledModel({self.config.model}, input_size={self.config.input_size}, backend={self.backend})"
