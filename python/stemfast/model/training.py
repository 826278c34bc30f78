"""Training of the (r)VAE: configuration, STN pretraining, VAE training, early stopping, augmentation.

Procedure (as in the rVAE literature, with an explicit spatial transformer):

1. **STN pretraining.** Pairs ``(x, rotate(x, a))`` with a random known angle ``a``. Loss =
   image-space term (the two canonicalised patches must agree inside the disc, up to the
   rotation symmetry ``360 / k``, relative to the patch energy) + anchor term
   ``1 - cos(k (theta(rotate(x, a)) - theta(x) - a))`` that pins the equivariance and rules out
   degenerate solutions.
2. The STN is frozen.
3. The VAE is trained end to end through the frozen STN: loss per patch = masked sum of squared
   errors in the *input* frame + ``beta`` * KL.

Both stages use a seeded ``DataLoader``, batch-level augmentation (random rotation, x-flip,
sub-pixel shift; one kornia warp per batch), a held-out validation split and early stopping
that restores the best weights.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from . import functional as MF
from .modules import RVAENet, VAENet
from .settings import RVAEConfig

__all__ = ["RVAEConfig", "resolve_device", "build_network", "to_model_input", "Augmenter", "EarlyStopping",
           "pretrain_stn", "train_vae", "vae_loss", "configure_threads", "autocast_context",
           "float32_inference"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- environment

def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return dev


def configure_threads(num_threads: int | None = None) -> None:
    """Set torch's intra-op threads from ``num_threads`` or ``STEMFAST_NUM_THREADS``; else leave torch's default."""
    n = num_threads
    if n is None:
        env = os.environ.get("STEMFAST_NUM_THREADS")
        n = int(env) if env else None
    if n is not None and n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 (or fp16) autocast on CUDA when ``enabled``; a null context on CPU. Training and
    fine-tuning only: inference runs in :func:`float32_inference`."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


@contextlib.contextmanager
def float32_inference(device: torch.device):
    """Full float32 for an inference pass: no autocast and, on CUDA, no TF32 in convolutions or
    matrix products (cuDNN convolutions use TF32 by default, a 10-bit mantissa). A model then gives
    the same latents, angles and errors on a GPU as on the CPU (and as the compiled engine) to
    float32 rounding, hence the same classes and scores. A null context on the CPU. The cuDNN and
    matmul flags are process-wide; they are restored on exit.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _grad_scaler(device: torch.device, enabled: bool):
    use = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=use)


# ----------------------------------------------------------------------------- data

def build_network(config: RVAEConfig) -> VAENet:
    """The ``nn.Module`` for ``config`` (``modules.RVAENet`` or ``modules.VAENet``)."""
    if config.model == "rvae":
        return RVAENet(config.input_size, config.latent_dim, config.channels, config.mask_radius,
                       config.rotation_symmetry, config.stn_channels, config.symmetrize, config.stn_downsample)
    return VAENet(config.input_size, config.latent_dim, config.channels, config.mask_radius)


def to_model_input(patches: np.ndarray, input_size: int, *, mode: str = "bilinear", background: str = "none",
                   device: torch.device | None = None, chunk: int = 4096) -> torch.Tensor:
    """Float32 ``[N, S, S]`` array -> ``(N, 1, input_size, input_size)`` tensor (:func:`functional.model_input`
    in chunks)."""
    n = len(patches)
    out = torch.empty((n, 1, input_size, input_size), dtype=torch.float32)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(patches[s:s + chunk], dtype=np.float32))[:, None]
        out[s:s + chunk] = MF.model_input(x, input_size, mode, background)
    return out if device is None else out.to(device)


def _loader(x: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    """Batches of ``x`` fetched by index lists (one tensor gather per batch, not per sample)."""
    ds = TensorDataset(x)
    if shuffle:
        gen = torch.Generator().manual_seed(seed)
        sampler = BatchSampler(RandomSampler(ds, generator=gen), batch_size, drop_last=False)
    else:
        sampler = BatchSampler(SequentialSampler(ds), batch_size, drop_last=False)
    return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)


class Augmenter:
    """Random rotation / x-flip / sub-pixel shift of a batch ``(B, 1, S, S)``, one kornia warp (border padding).

    Draws from its own seeded generator (on the batch's device) so runs are reproducible.
    """

    def __init__(self, *, rotate: bool, flip: bool, shift: float, seed: int, device: torch.device) -> None:
        self.rotate, self.flip, self.shift = rotate, flip, float(shift)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    @property
    def active(self) -> bool:
        return self.rotate or self.flip or self.shift > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        b = x.shape[0]
        u = torch.rand(b, 4, generator=self.gen, device=self.device)
        angle = u[:, 0] * 360.0 if self.rotate else torch.zeros(b, device=self.device)
        flip = (u[:, 1] < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool, device=self.device)
        shift = (u[:, 2:] * 2.0 - 1.0) * self.shift
        m = MF.augment_matrix(angle, flip, shift, x.shape[-2:])
        # border padding: with the sub-pixel shift, disc-edge samples can fall just outside the patch
        return MF.warp_patches(x, m, padding_mode="border")


class EarlyStopping:
    """Track the best validation loss; ``step`` returns True when training should stop.

    Keeps a CPU copy of the best ``state_dict`` (``restore`` loads it back).
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.best_epoch = -1
        self.bad = 0
        self.state: dict | None = None

    def step(self, value: float, epoch: int, module: torch.nn.Module) -> bool:
        if value < self.best - self.min_delta * abs(self.best if math.isfinite(self.best) else 0.0):
            self.best, self.best_epoch, self.bad = value, epoch, 0
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


# ----------------------------------------------------------------------------- losses

def vae_loss(net: VAENet, x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the batch of (masked SSE in the input frame + beta * KL); also returns the two terms."""
    out = net(x)
    mask = net.mask
    recon = MF.masked_mse(out.recon, x * mask, mask) * mask.sum()
    kl = MF.kl_divergence(out.mu, out.logvar)
    return (recon + beta * kl).mean(), recon.mean(), kl.mean()


def stn_pair_loss(net: RVAENet, x: torch.Tensor, angle: torch.Tensor, anchor_weight: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """STN pretraining loss on pairs ``(x, rotate(x, angle))``; returns (total, image term, anchor term).

    Image term: masked MSE between the canonicalised patch and the canonicalised rotated patch,
    minimised over the ``k`` symmetric copies (rotations by ``360 / k``), divided by the mean
    squared intensity in the disc. Patches are rotated whole and masked after each warp, as in
    :meth:`stemfast.model.modules.RVAENet.encode_branches` (no zeros blended into the disc edge).
    Anchor term: ``1 - cos(k (theta_b - theta_a - angle))``.
    """
    mask = net.mask
    k = net.stn.symmetry
    xa = x * mask
    xb = MF.rotate_patches(x, angle)  # rotated copy of the full patch; masked after every warp
    ta, _ = net.stn(xa)
    tb, _ = net.stn(xb * mask)
    ca = MF.canonicalize(x, ta) * mask
    cb = MF.canonicalize(xb, tb, padding_mode="border")  # rotated again below (as in RVAE.encode_branches)
    energy = (xa.float() ** 2 * mask).flatten(1).sum(1) / mask.sum() + 1e-6
    errs = [MF.masked_mse(ca, cb * mask, mask)]
    for m in range(1, k):
        errs.append(MF.masked_mse(ca, MF.rotate_all(cb, 360.0 * m / k) * mask, mask))
    image = (torch.stack(errs).min(0).values / energy).mean()
    d = torch.deg2rad(tb.float() - ta.float() - angle.float()) * k
    anchor = (1.0 - torch.cos(d)).mean()
    return image + anchor_weight * anchor, image, anchor


# ----------------------------------------------------------------------------- loops

def _bar(total: int, desc: str, enabled: bool | None):
    """The epochs' progress (:func:`stemfast.logutil.progress`): forced on or off by ``enabled``, else
    (None) a bar on a terminal, log lines elsewhere, none with ``STEMFAST_PROGRESS=0``."""
    from ..logutil import progress

    return progress(total=total, desc=desc, leave=False, **({} if enabled is None else {"disable": not enabled}))


def pretrain_stn(net: RVAENet, train: torch.Tensor, val: torch.Tensor, config: RVAEConfig, *,
                 device: torch.device, history: dict, progress: bool | None = False) -> None:
    """Stage 1: pretrain ``net.stn`` on rotated pairs, with early stopping; leaves it frozen (stage 2)."""
    stn = net.stn
    opt = torch.optim.Adam(stn.parameters(), lr=config.stn_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.stn_epochs, 1))
    aug = Augmenter(rotate=config.augment_rotate, flip=config.augment_flip, shift=config.augment_shift,
                    seed=config.seed + 11, device=device)
    gen = torch.Generator(device=device).manual_seed(config.seed + 12)
    scaler = _grad_scaler(device, config.amp)
    stopper = EarlyStopping(config.patience, config.min_delta)
    loader = _loader(train, config.batch_size, shuffle=True, seed=config.seed + 13)
    hist = history.setdefault("stn", {"train": [], "val": [], "val_image": [], "val_anchor": []})
    bar = _bar(config.stn_epochs, "STN pretraining", progress)
    for epoch in range(config.stn_epochs):
        t0 = time.perf_counter()
        stn.train()
        tot, n = 0.0, 0
        for (xb,) in loader:
            xb = aug(xb.to(device, non_blocking=True))
            angle = torch.rand(xb.shape[0], generator=gen, device=device) * 360.0
            with autocast_context(device, config.amp):
                loss, _, _ = stn_pair_loss(net, xb, angle, config.anchor_weight)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            tot += float(loss.detach()) * xb.shape[0]
            n += xb.shape[0]
        sched.step()
        vl, vi, va = _stn_eval(net, val, config, device)
        hist["train"].append(tot / max(n, 1))
        hist["val"].append(vl)
        hist["val_image"].append(vi)
        hist["val_anchor"].append(va)
        log.debug("STN epoch %d: train %.4f val %.4f (image %.4f anchor %.4f) %.1fs", epoch, tot / max(n, 1),
                  vl, vi, va, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{tot / max(n, 1):.4f}", val=f"{vl:.4f}")
        if stopper.step(vl, epoch, stn):
            log.info("STN pretraining: early stop at epoch %d (best %d)", epoch, stopper.best_epoch)
            break
    bar.close()
    stopper.restore(stn)
    for p in stn.parameters():
        p.requires_grad_(False)
    stn.eval()
    log.info("STN pretraining: best val loss %.4f at epoch %d", stopper.best, stopper.best_epoch)


@torch.no_grad()
def _stn_eval(net: RVAENet, val: torch.Tensor, config: RVAEConfig, device: torch.device) -> tuple[float, float, float]:
    net.stn.eval()
    gen = torch.Generator(device=device).manual_seed(config.seed + 14)  # same angles every epoch
    tot = np.zeros(3)
    n = 0
    for s in range(0, len(val), 1024):
        xb = val[s:s + 1024].to(device)
        angle = torch.rand(xb.shape[0], generator=gen, device=device) * 360.0
        with autocast_context(device, config.amp):
            terms = stn_pair_loss(net, xb, angle, config.anchor_weight)
        tot += np.array([float(t) for t in terms]) * xb.shape[0]
        n += xb.shape[0]
    tot /= max(n, 1)
    return float(tot[0]), float(tot[1]), float(tot[2])


@torch.no_grad()
def _vae_eval(net: VAENet, val: torch.Tensor, config: RVAEConfig, device: torch.device) -> tuple[float, float, float]:
    net.eval()
    tot = np.zeros(3)
    n = 0
    for s in range(0, len(val), 1024):
        xb = val[s:s + 1024].to(device)
        with autocast_context(device, config.amp):
            terms = vae_loss(net, xb, config.beta)
        tot += np.array([float(t) for t in terms]) * xb.shape[0]
        n += xb.shape[0]
    tot /= max(n, 1)
    return float(tot[0]), float(tot[1]), float(tot[2])


def train_vae(net: VAENet, train: torch.Tensor, val: torch.Tensor, config: RVAEConfig, *,
              device: torch.device, history: dict, progress: bool | None = False) -> None:
    """Stage 3: train encoder / decoder (through the frozen STN for the rVAE) with early stopping."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs, 1))
    scaler = _grad_scaler(device, config.amp)
    aug = Augmenter(rotate=config.augment_rotate, flip=config.augment_flip, shift=config.augment_shift,
                    seed=config.seed + 21, device=device)
    stopper = EarlyStopping(config.patience, config.min_delta)
    loader = _loader(train, config.batch_size, shuffle=True, seed=config.seed + 23)
    hist = history.setdefault("vae", {"train": [], "val": [], "val_recon": [], "val_kl": [],
                                      "epoch_time_s": [], "patches_per_s": []})
    bar = _bar(config.epochs, f"{config.model.upper()} training", progress)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        net.train()
        if hasattr(net, "stn"):
            net.stn.eval()
        tot, n = 0.0, 0
        beta = config.beta * min(1.0, (epoch + 1) / config.kl_warmup) if config.kl_warmup else config.beta
        for (xb,) in loader:
            xb = aug(xb.to(device, non_blocking=True))
            with autocast_context(device, config.amp):
                loss, _, _ = vae_loss(net, xb, beta)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            tot += float(loss.detach()) * xb.shape[0]
            n += xb.shape[0]
        sched.step()
        dt = time.perf_counter() - t0
        vl, vr, vk = _vae_eval(net, val, config, device)
        hist["train"].append(tot / max(n, 1))
        hist["val"].append(vl)
        hist["val_recon"].append(vr)
        hist["val_kl"].append(vk)
        hist["epoch_time_s"].append(dt)
        hist["patches_per_s"].append(n / dt if dt > 0 else float("nan"))
        log.debug("%s epoch %d: train %.3f val %.3f (recon %.3f kl %.3f) %.1fs", config.model, epoch,
                  tot / max(n, 1), vl, vr, vk, dt)
        bar.update(1)
        bar.set_postfix(loss=f"{tot / max(n, 1):.3f}", val=f"{vl:.3f}")
        if epoch + 1 >= config.kl_warmup and stopper.step(vl, epoch, net):
            log.info("%s training: early stop at epoch %d (best %d)", config.model, epoch, stopper.best_epoch)
            break
    bar.close()
    if stopper.state is None:  # stopped inside the warm-up (epochs <= kl_warmup): keep the last weights
        stopper.step(vl if config.epochs else math.inf, config.epochs - 1, net)
    stopper.restore(net)
    net.eval()
    log.info("%s training: best val loss %.3f at epoch %d", config.model, stopper.best, stopper.best_epoch)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train / validation split (at least one validation patch when val_fraction > 0)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_network(patches: np.ndarray, config: RVAEConfig, *, progress: bool | None = None) -> tuple[VAENet, dict]:
    """Full training run on ``patches [N, S, S]``: returns the trained network (eval mode) and its history.

    Seeded from ``config.seed`` (initialisation, subsampling, split, shuffling, augmentation,
    reparameterisation noise); the caller's global torch RNG state is restored afterwards.
    """
    configure_threads(config.num_threads)
    device = resolve_device(config.device)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        return _fit(patches, config, device, config.progress if progress is None else progress)


def _fit(patches: np.ndarray, config: RVAEConfig, device: torch.device, show: bool | None) -> tuple[VAENet, dict]:
    n = len(patches)
    rng = np.random.default_rng(config.seed)
    if config.max_train_patches is not None and n > config.max_train_patches:
        idx = np.sort(rng.choice(n, config.max_train_patches, replace=False))
        log.info("training on a random subsample of %d of %d patches", len(idx), n)
        patches = patches[idx]
        n = len(idx)
    x = to_model_input(patches, config.input_size, mode=config.resample, background=config.background)
    tr, va = split_indices(n, config.val_fraction, config.seed + 1)
    xt = x[tr]
    xv = x[va] if len(va) else xt  # no validation split: monitor the training set (unaugmented)
    if device.type == "cuda":
        xt, xv = xt.to(device), xv.to(device)
    net = build_network(config).to(device)
    history: dict = {"n_train": int(len(tr)), "n_val": int(len(va)), "device": str(device)}
    t0 = time.perf_counter()
    if isinstance(net, RVAENet) and config.stn_epochs > 0:
        pretrain_stn(net, xt, xv, config, device=device, history=history, progress=show)
    elif isinstance(net, RVAENet):
        log.warning("stn_epochs=0: the STN is not pretrained (random orientations)")
        for p in net.stn.parameters():
            p.requires_grad_(False)
    history["stn_time_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    train_vae(net, xt, xv, config, device=device, history=history, progress=show)
    history["vae_time_s"] = time.perf_counter() - t1
    history["fit_time_s"] = time.perf_counter() - t0
    net.eval()
    return net, history
