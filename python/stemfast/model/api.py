"""User-facing rotation-invariant patch model: :class:`RVAE` (fit / encode / save / load)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import zipfile
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_open
from ..errors import ModelFileError
from . import functional as MF
from .modules import RVAENet, VAENet
from .settings import Encoding, check_batch_size, check_finite_patches, check_patch_shape
from .training import (RVAEConfig, autocast_context, build_network, configure_threads, fit_network,
                       float32_inference,
                       resolve_device)

__all__ = ["RVAE", "Encoding", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

_MICRO_BATCH_CPU = 512  # at most this many patches per network call in encode on CPU (see RVAE.encode)
_MIN_MICRO_BATCH_CPU = 128  # smaller sub-batches cost more per patch (per-operation overhead)
_CHUNK_CPU = 1024  # default encode / canonicalize chunk on the CPU
# on a GPU one network call per chunk: the small model is bound by kernel launches and the copies
# back, not by arithmetic, so chunks 8x the CPU's (~0.2 MB of activations per patch at peak: ~1.6 GB)
_CHUNK_GPU = 8192


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0  # encode calls running with torch's intra-op threads lowered to 1
_THREADS_SAVED = 1  # torch's setting before the first of them


@contextlib.contextmanager
def _worker_pool(workers: int):
    """``workers`` threads with torch's intra-op threads set to 1 meanwhile (None for one worker).

    Concurrent callers (several encode calls in threads of one process) share one save / restore
    of torch's setting: the first lowers it, the last restores it.
    """
    global _THREADS_USERS, _THREADS_SAVED
    if workers <= 1:
        yield None
        return
    from concurrent.futures import ThreadPoolExecutor

    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="stemfast-encode") as pool:
            yield pool
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def _check_patches(patches: Any, *, finite: bool = False) -> Any:
    """``patches`` as an array-like ``[N, S, S]`` (:func:`~stemfast.model.settings.check_patch_shape`);
    ``finite``: every patch is checked for NaN / inf now (read in chunks), as training needs
    (:meth:`RVAE.encode` checks each chunk as it reads it)."""
    if not hasattr(patches, "shape") or not hasattr(patches, "__getitem__"):
        patches = np.asarray(patches)
    check_patch_shape(patches.shape)
    if finite:
        for a in range(0, patches.shape[0], _CHUNK_CPU):
            check_finite_patches(np.asarray(patches[a:a + _CHUNK_CPU]), a)
    return patches


#: the key of the weights' checksum in a model file (:meth:`RVAE.save`; files saved before have none)
_CHECKSUM_KEY = "weights_sha256"


def weights_sha256(state_dict: dict) -> str:
    """SHA-256 of a network's ``state_dict``: every tensor's name, dtype, shape and bytes, in name order.

    torch does not check a model file's zip CRCs, so a flipped byte in the weights loads silently;
    :meth:`RVAE.save` stores this and :meth:`RVAE.load` recomputes it.
    """
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _plain(obj: Any, where: str = "extra") -> Any:
    """Convert to plain Python containers (what ``torch.load(weights_only=True)`` accepts)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v, where) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return _plain(asdict(obj), where)
    raise TypeError(f"cannot store {type(obj).__name__} in {where}: use numbers, strings, lists, dicts or arrays")


def _safe_globals():
    """Allow ``TorchVersion`` (a harmless ``str`` subclass) in files from early versions of :meth:`RVAE.save`."""
    try:
        from torch.torch_version import TorchVersion

        return torch.serialization.safe_globals([TorchVersion])
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def _check_zip(path: Any) -> None:
    """:class:`~stemfast.errors.ModelFileError` when a part of the zip file ``path`` (what ``torch.save``
    writes) fails its CRC-32: ``torch.load`` does not check them, so one flipped byte in the weights
    would load. Not a zip file, or one zipfile cannot read: left to ``torch.load`` to report."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
        return
    if bad is not None:
        raise ModelFileError(f"{bad} in the file fails its CRC check: a damaged file")


def _load_weights(net: VAENet, state: dict, path: Any) -> None:
    """Load a model file's ``state`` weights into ``net`` (built from its settings), after checking
    them (:class:`~stemfast.errors.ModelFileError` with the reason): against the checksum saved with
    them, finite, and of the names and shapes the settings give."""
    sd = state.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError("the file holds no weights (no state_dict of tensors)")
    stored = state.get(_CHECKSUM_KEY)
    if stored is None:
        log.debug("%s: no weights checksum (saved by an earlier stemfast); weights not verified", path)
    elif weights_sha256(sd) != stored:
        raise ModelFileError("the weights do not match the checksum saved with them: a damaged or altered file")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelFileError(f"the weights are not finite (NaN or inf in {', '.join(bad[:3])}"
                             f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): a model whose training diverged")
    want = net.state_dict()
    problems = [f"{k} is {list(sd[k].shape)} in the file, {list(v.shape)} for its settings"
                for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    problems += [f"{k} is missing" for k in want if k not in sd]
    problems += [f"{k} is not in this model" for k in sd if k not in want]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelFileError(f"the weights do not fit the settings saved with them: {problems[0]}{more}")
    net.load_state_dict(sd)


class RVAE:
    """Rotation-invariant VAE on site-centred patches (or the plain VAE with ``model="vae"``).

    Create with :meth:`fit` or :meth:`load`. Patches ``[N, S, S]`` of any size S are resampled to
    ``config.input_size`` and masked by a disc; the rVAE canonicalises each patch with a
    pretrained spatial transformer (angle convention: :mod:`stemfast.model.functional`).

    Examples
    --------
    >>> from stemfast.synthetic import render_site_patches
    >>> patches, types, _ = render_site_patches(600, 35, seed=0)
    >>> model = RVAE.fit(patches, epochs=2, stn_epochs=1)
    >>> enc = model.encode(patches)
    >>> enc.mu.shape, enc.angle.shape
    ((600, 4), (600,))
    """

    def __init__(self, network: VAENet, config: RVAEConfig, *, history: dict | None = None,
                 extra: dict | None = None) -> None:
        self.network = network.eval()
        self.config = config
        self.history: dict = history or {}
        self.extra: dict = dict(extra or {})
        self.device = next(network.parameters()).device

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, patches: np.ndarray, config: RVAEConfig | None = None, *, extra: dict | None = None,
            progress: bool | None = None, **overrides: Any) -> "RVAE":
        """Train a model on ``patches`` (float32 ``[N, S, S]``, robust-normalised).

        Parameters
        ----------
        patches : array [N, S, S]
        config : RVAEConfig, optional
            Defaults to ``RVAEConfig()``; keyword ``overrides`` replace single fields
            (``RVAE.fit(p, epochs=10, model="vae")``).
        extra : dict, optional
            Caller metadata saved with the model (e.g. patch normalisation). ``patch_size`` (the
            size the patches were cut at in the image, which ``run_image`` and ``batch`` cut for this
            model) defaults to S; :func:`stemfast.pipeline.train_model` passes None with a
            ``patch_extent`` record instead where every image was cut by its own spacing
            (:mod:`stemfast.patchextent`).

        Raises
        ------
        ValueError
            Patches that are not ``[N, S, S]`` with ``S >= 4``, fewer than 2, or with a NaN / inf.
        progress : bool, optional
            Force the tqdm bar on / off (default: ``config.progress``).
        """
        config = config or RVAEConfig()
        if overrides:
            config = replace(config, **overrides)
        patches = _check_patches(patches, finite=True)
        if len(patches) < 2:
            raise ValueError(f"need at least 2 patches to train, got {len(patches)}")
        t0 = time.perf_counter()
        net, history = fit_network(patches, config, progress=progress)
        log.info("trained %s on %d patches (%d px -> %d px) in %.1f s", config.model, len(patches),
                 patches.shape[1], config.input_size, time.perf_counter() - t0)
        ex = {"patch_size": int(patches.shape[1])}
        ex.update(extra or {})
        return cls(net, config, history=history, extra=ex)

    def finetune(self, patches: np.ndarray, *, steps: int, lr: float | None = None,
                 batch_size: int | None = None, seed: int | None = None) -> "RVAE":
        """A copy of this model adapted to ``patches`` by ``steps`` optimiser steps (this model is unchanged).

        The STN stays frozen (the orientation convention is kept); encoder and decoder train with
        the model's loss (masked SSE + ``beta`` KL) and augmentation, Adam at ``lr`` (default a
        quarter of ``config.lr``: adapt, do not retrain). Seeded (``seed`` default
        ``config.seed``). ``extra`` records the base model (``finetuned_from``) and ``steps``.

        Examples
        --------
        >>> from stemfast.synthetic import render_site_patches
        >>> patches, _, _ = render_site_patches(300, 35, seed=0)
        >>> base = RVAE.fit(patches, epochs=1, stn_epochs=1)
        >>> tuned = base.finetune(patches, steps=3)
        >>> tuned.extra["finetune_steps"]
        3
        """
        import copy

        from .training import Augmenter, to_model_input, vae_loss

        patches = _check_patches(patches, finite=True)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if len(patches) < 1:
            raise ValueError("need at least one patch to fine-tune on")
        cfg = self.config
        lr = cfg.lr * 0.25 if lr is None else float(lr)
        bs = int(batch_size or cfg.batch_size)
        seed = cfg.seed if seed is None else int(seed)
        configure_threads(cfg.num_threads)
        net = copy.deepcopy(self.network).to(self.device)
        x = to_model_input(patches, cfg.input_size, mode=cfg.resample, background=cfg.background)
        t0 = time.perf_counter()
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed + 31)
            aug = Augmenter(rotate=cfg.augment_rotate, flip=cfg.augment_flip, shift=cfg.augment_shift,
                            seed=seed + 32, device=self.device)
            params = [p for n, p in net.named_parameters() if not n.startswith("stn.")]
            for p in net.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            net.train()
            if hasattr(net, "stn"):
                net.stn.eval()
            for _ in range(int(steps)):
                idx = torch.randint(0, len(x), (min(bs, len(x)),), generator=gen)
                xb = aug(x[idx].to(self.device))
                with autocast_context(self.device, cfg.amp):
                    loss, _, _ = vae_loss(net, xb, cfg.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        tag = self.extra.get("shipped") or {}
        extra = {k: v for k, v in self.extra.items() if k not in ("sha256",)}
        extra.update({"finetuned_from": {"name": tag.get("name", "model"), "version": tag.get("version"),
                                         "sha256": self.extra.get("sha256")},
                      "finetune_steps": int(steps), "finetune_lr": lr})
        log.info("fine-tuned on %d patches for %d steps in %.1f s (loss %.3g -> %.3g)", len(patches), steps,
                 time.perf_counter() - t0, losses[0] if losses else float("nan"),
                 losses[-1] if losses else float("nan"))
        history = {"finetune": {"loss": losses}}
        return RVAE(net, cfg, history=history, extra=extra)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode(self, patches: np.ndarray, *, batch_size: int | None = None, return_recon: bool = False) -> Encoding:
        """Encode ``patches [N, S, S]`` in chunks of ``batch_size`` (memory bounded by the chunks;
        default 1024 on the CPU, 8192 on a GPU).

        Any array-like with ``shape`` and slicing works (NumPy, memmap, h5py / zarr datasets); it
        is read one chunk at a time, only the chunks being encoded are held as tensors (one, or a
        few with several CPU threads) and only the small outputs accumulate.

        On the CPU the network runs on sub-batches of at most 512 patches; with
        ``n = torch.get_num_threads() > 1`` they run on ``n`` Python threads with one intra-op thread
        each (torch's setting is restored afterwards): the sub-batches are independent, while the
        model's small convolutions and warps gain little from intra-op threads (an OpenMP barrier
        per operation, costly when the cores are shared). Up to ``2 n`` sub-batches are in flight,
        so the next chunk is read while they run. Results do not depend on ``batch_size`` or the
        threads beyond float rounding.

        Inference runs in float32 on every device (:func:`~stemfast.model.training.float32_inference`:
        no autocast, no TF32; the setting ``amp`` applies to training), so a GPU gives the CPU's
        latents, angles and errors to float rounding, hence the same classes and scores.
        """
        patches = _check_patches(patches)
        batch_size = self._chunk_size(batch_size)
        configure_threads(self.config.num_threads)
        n = patches.shape[0]
        s = self.config.input_size
        L = self.config.latent_dim
        mu = np.empty((n, L), np.float32)
        logvar = np.empty((n, L), np.float32)
        angle = np.full(n, np.nan, np.float32)
        strength = np.full(n, np.nan, np.float32)
        err = np.empty(n, np.float32)
        recon = np.empty((n, s, s), np.float32) if return_recon else None
        net = self.network.eval()
        mask = net.mask
        cpu = self.device.type == "cpu"
        workers = max(1, torch.get_num_threads()) if cpu else 1

        def run(i: int, xs: torch.Tensor) -> None:
            # inference mode and autocast are thread-local: enter them in every worker
            with torch.inference_mode(), float32_inference(self.device):
                out = net(xs)
            j = i + xs.shape[0]
            y = out.recon.float() * mask
            err[i:j] = MF.masked_mse(y, xs, mask).cpu().numpy()  # the mask applies to the difference
            mu[i:j] = out.mu.float().cpu().numpy()
            logvar[i:j] = out.logvar.float().cpu().numpy()
            if out.angle is not None:
                angle[i:j] = out.angle.float().cpu().numpy()
            if out.angle_strength is not None:
                strength[i:j] = out.angle_strength.float().cpu().numpy()
            if recon is not None:
                recon[i:j] = y[:, 0].cpu().numpy()

        with _worker_pool(workers) as pool:
            pending: deque = deque()
            for a in range(0, n, batch_size):
                b = min(n, a + batch_size)
                x = self._chunk(patches, a, b)
                if pool is None:  # GPU, or one CPU thread
                    step = b - a if not cpu else _MICRO_BATCH_CPU
                    for s0 in range(0, b - a, step):
                        run(a + s0, x[s0:s0 + step])
                    continue
                # sub-batches of 128..512 patches, spread over the workers; while they run, the next
                # chunk is read (at most 2 * workers sub-batches in flight)
                step = min(_MICRO_BATCH_CPU, max(_MIN_MICRO_BATCH_CPU, -(-(b - a) // workers)))
                for s0 in range(0, b - a, step):
                    pending.append(pool.submit(run, a + s0, x[s0:s0 + step]))
                    while len(pending) > 2 * workers:
                        pending.popleft().result()
            while pending:
                pending.popleft().result()
        return Encoding(mu=mu, logvar=logvar, angle=angle, recon_error=err, recon=recon, angle_strength=strength)

    @torch.inference_mode()
    def canonicalize(self, patches: np.ndarray, *, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Masked canonical-frame patches ``[N, input_size, input_size]`` and STN angles ``[N]`` (degrees).

        For the plain VAE the patches are only resampled and masked and the angles are NaN. Chunks
        and precision as in :meth:`encode`.
        """
        patches = _check_patches(patches)
        batch_size = self._chunk_size(batch_size)
        n = patches.shape[0]
        s = self.config.input_size
        out = np.empty((n, s, s), np.float32)
        ang = np.full(n, np.nan, np.float32)
        net = self.network.eval()
        for a in range(0, n, batch_size):
            b = min(n, a + batch_size)
            x = self._chunk(patches, a, b)
            if isinstance(net, RVAENet):
                with float32_inference(self.device):
                    xc, t = net.canonical(x)
                ang[a:b] = t.float().cpu().numpy()
            else:
                xc = x * net.mask
            out[a:b] = xc[:, 0].float().cpu().numpy()
        return out, ang

    def _chunk_size(self, batch_size: int | None) -> int:
        if batch_size is None:
            return _CHUNK_CPU if self.device.type == "cpu" else _CHUNK_GPU
        return check_batch_size(batch_size)

    def _chunk(self, patches: Any, a: int, b: int) -> torch.Tensor:
        x = np.ascontiguousarray(patches[a:b], dtype=np.float32)
        check_finite_patches(x, a)  # NaN would come out as NaN latents (the compiled engine: plausible ones)
        x = torch.from_numpy(x)[:, None]
        x = x.to(self.device, non_blocking=True)
        return MF.model_input(x, self.config.input_size, self.config.resample, self.config.background)

    # ------------------------------------------------------------------ persistence
    def state(self, extra: dict | None = None) -> dict:
        """Everything :meth:`save` writes, as a dict of plain containers and tensors."""
        from .. import __version__

        ex = dict(self.extra)
        ex.update(extra or {})
        sd = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        return {
            "format": "stemfast.model.RVAE",
            "format_version": FORMAT_VERSION,
            "stemfast_version": str(__version__),
            "torch_version": str(torch.__version__),
            "config": _plain(asdict(self.config), "config"),
            "state_dict": sd,
            _CHECKSUM_KEY: weights_sha256(sd),
            "extra": _plain(ex),
            "history": _plain(self.history, "history"),
        }

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the model to ``path`` atomically (temp file in the same folder + ``os.replace``).

        ``extra`` (merged into :attr:`extra`) holds caller metadata such as the patch
        normalisation; values must be numbers, strings, lists, dicts or arrays. The file holds the
        SHA-256 of the weights (:func:`weights_sha256`), which :meth:`load` checks.
        """
        path = Path(path)
        state = self.state(extra)
        with atomic_open(path, "wb") as fh:
            torch.save(state, fh)
        if extra:
            self.extra.update(extra)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device | None = None) -> "RVAE":
        """Load a model written by :meth:`save` onto ``map_location`` (default: CUDA when available, else CPU).

        Raises
        ------
        ValueError
            Not a stemfast model file, or one written by a newer stemfast.
        stemfast.errors.ModelFileError
            A damaged file: a part failing its zip CRC-32 (torch.load does not check them), or weights
            that differ from the checksum saved with them (files saved before it was stored have
            only their CRCs checked); weights that are not finite, or do not fit the file's settings.
        """
        _check_zip(path)
        with open(path, "rb") as fh, _safe_globals():
            state = torch.load(fh, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "stemfast.model.RVAE":
            raise ValueError(f"{path} is not a stemfast RVAE model file")
        if int(state.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer stemfast (format {state['format_version']})")
        config = RVAEConfig.from_dict(state["config"])
        device = resolve_device("auto" if map_location is None else map_location)
        net = build_network(config)
        _load_weights(net, state, path)
        net = net.to(device)
        if isinstance(net, RVAENet):
            for p in net.stn.parameters():
                p.requires_grad_(False)
        extra = state.get("extra") or {}
        ps = extra.get("patch_size") if isinstance(extra, dict) else None
        if ps is not None and (isinstance(ps, bool) or not isinstance(ps, int) or ps < 1):
            raise ModelFileError(f"its patch_size is {ps!r}, not a whole number of pixels >= 1")
        return cls(net, config, history=state.get("history") or {}, extra=extra)

    def to(self, device: str | torch.device) -> "RVAE":
        """Move the network to ``device`` (in place); returns self. :attr:`device` is then the
        parameters' device, as after construction (``"cuda"`` gives ``cuda:0``)."""
        self.network.to(resolve_device(device))
        self.device = next(self.network.parameters()).device
        return self

    def __repr__(self) -> str:
        c = self.config
        return (f"RVAE(model={c.model!r}, latent_dim={c.latent_dim}, input_size={c.input_size}, "
                f"rotation_symmetry={c.rotation_symmetry}, device={str(self.device)!r})")
