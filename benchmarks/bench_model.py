"""Benchmarks of stemfast.model (rVAE): training / inference throughput and the kornia warp.

Run: ``python -m pytest benchmarks/bench_model.py --benchmark-enable -o python_files='bench_*.py'``
(quick mode by default / ``STEMFAST_BENCH_QUICK=1``; full sizes with ``STEMFAST_BENCH_FULL=1``:
~11k training patches, 1e5 patches encoded). CPU runs use ``torch.set_num_threads(2)``; the CUDA
variants are skipped without a GPU. Every benchmark asserts correctness and records absolute
throughputs in ``extra_info``.

Gated (``speed_gate``, see conftest.py: CPU time, one thread on both sides, paired):

* ``model_encode_vs_network_cpu``: ``RVAE.encode`` vs the same network called directly on the same
  sub-batches, prepared beforehand -- what our encode adds around the network (reading and
  converting the chunks, resampling, the masked reconstruction error, the copies out).
* ``model_encode_vs_32px_network_cpu``: the default network (the shipped model's: 24 px input)
  against the network of shipped model 1.1 (32 px input), each on the same sites at its own input
  size -- the speed the lighter model was adopted for (round 7).
* ``model_encode_compiled_{cpp,numba}_vs_torch_cpu``: the compiled engine
  (:class:`stemfast.model.engine.CompiledModel`, kernel ``rvae_forward``) against ``RVAE.encode`` --
  the torch path it replaces for the shipped model on the CPU -- on the same patches and weights,
  with the outputs compared.

Reported, not gated (``report_ratio``; what it is relative to is in ``extra_info["reported"]``),
since they guard none of our code against itself:

* training / inference: rVAE vs the plain VAE with the same encoder / decoder (the cost of the
  STN, the canonicalisation and back-rotation warps and the C_k symmetrisation: our code both sides);
* warp: kornia ``warp_affine`` vs ``F.affine_grid`` + ``F.grid_sample`` (two third-party libraries).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from stemfast.model import RVAE, RVAEConfig
from stemfast.model import functional as MF
from stemfast.synthetic import render_site_patches
from stemfast.model.training import Augmenter, build_network, vae_loss

from conftest import paired_best_times

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
SIZE = RVAEConfig().input_size  # patches at the default model input: no resampling in the timings
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _untrained(model: str, device: str) -> RVAE:
    """Random-weight model: throughput does not depend on the weights."""
    torch.manual_seed(0)
    cfg = RVAEConfig(model=model, device=device)
    return RVAE(build_network(cfg).to(device), cfg)


def _train_steps(model: str, x: torch.Tensor, device: str, steps: int = 4):
    """A callable running ``steps`` optimiser steps (augmentation + loss + backward + Adam)."""
    torch.manual_seed(0)
    cfg = RVAEConfig(model=model, device=device)
    net = build_network(cfg).to(device).train()
    if hasattr(net, "stn"):
        net.stn.requires_grad_(False).eval()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    aug = Augmenter(rotate=True, flip=True, shift=0.5, seed=0, device=torch.device(device))
    x = x.to(device)

    def run():
        for _ in range(steps):
            loss, _, _ = vae_loss(net, aug(x), cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)

    return run


def _train_step_pps(x: torch.Tensor, device: str, steps: int = 4) -> tuple[float, float]:
    """Optimiser-step throughput (patches/s) of the rVAE and of the plain VAE, timed alternately."""
    t_rvae, t_vae = paired_best_times(_train_steps("rvae", x, device, steps), _train_steps("vae", x, device, steps),
                                      repeat=5)
    return steps * x.shape[0] / t_rvae, steps * x.shape[0] / t_vae


@pytest.fixture(scope="module")
def patches_in():
    n = 10_000 if QUICK else 100_000
    p, _, _ = render_site_patches(min(n, 20_000), SIZE, spacing=14.0 * SIZE / 35, sigma=2.6 * SIZE / 35, seed=0)
    reps = -(-n // len(p))
    return np.concatenate([p] * reps)[:n]


@pytest.mark.parametrize("device", DEVICES)
def test_bench_train_throughput(benchmark, device, report_ratio):
    """Full fit (STN pretraining + VAE training); ~11k patches of 35 px in full mode."""
    n = 2000 if QUICK else 11_000
    patches, types, _ = render_site_patches(n, 35, seed=1)
    over = dict(epochs=3, stn_epochs=2) if QUICK else {}
    cfg = RVAEConfig(device=device, progress=False, **over)
    model = benchmark.pedantic(lambda: RVAE.fit(patches, cfg), rounds=1, iterations=1)
    h = model.history
    pps = float(np.median(h["vae"]["patches_per_s"]))
    # ratio: optimiser-step throughput of the rVAE vs the plain VAE on the same 256-patch batch
    xb = MF.model_input(torch.from_numpy(patches[:256])[:, None], cfg.input_size, cfg.resample, cfg.background)
    step_pps, ref_pps = _train_step_pps(xb, device)
    stn_pps = len(h["stn"]["train"]) * h["n_train"] / h["stn_time_s"] if h["stn_time_s"] > 0 else float("nan")
    benchmark.extra_info.update({
        "device": device, "n_patches": n, "fit_time_s": h["fit_time_s"], "stn_time_s": h["stn_time_s"],
        "vae_time_s": h["vae_time_s"], "stn_epochs_run": len(h["stn"]["train"]),
        "vae_epochs_run": len(h["vae"]["train"]), "train_patches_per_s_per_epoch": pps,
        "stn_pretrain_patches_per_s": stn_pps, "train_step_patches_per_s": step_pps,
        "vae_baseline_train_step_patches_per_s": ref_pps,
        "ratio_meaning": "rVAE / plain-VAE training-step throughput (STN, warps, symmetrisation overhead)",
    })
    # correctness: the model learned (validation loss fell) and encodes
    assert h["vae"]["val"][-1] < h["vae"]["val"][0]
    enc = model.encode(patches[:500])
    assert np.all(np.isfinite(enc.mu))
    if not QUICK:
        from sklearn.cluster import KMeans
        from sklearn.metrics import adjusted_rand_score

        ari = adjusted_rand_score(types[:2000], KMeans(3, n_init=10, random_state=0).fit_predict(
            model.encode(patches[:2000]).mu))
        benchmark.extra_info["ari_train_subset"] = ari
        assert ari >= 0.9
    report_ratio(f"model_train_rvae_vs_vae_{device}", step_pps / ref_pps, benchmark,
                 meaning="rVAE / plain-VAE training-step throughput")


@pytest.mark.parametrize("device", DEVICES)
def test_bench_inference_batch256(benchmark, device, patches_in, report_ratio):
    n = 4096
    x = patches_in[:n]
    model, ref = _untrained("rvae", device), _untrained("vae", device)

    def run():
        out = model.encode(x, batch_size=256)
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    t, t_ref = paired_best_times(run, lambda: (ref.encode(x, batch_size=256), _sync(device)), repeat=3)
    benchmark.extra_info.update({
        "device": device, "batch_size": 256, "input_size": SIZE, "patches_per_s": n / t,
        "vae_baseline_patches_per_s": n / t_ref,
        "ratio_meaning": "rVAE / plain-VAE inference throughput (STN, warps, symmetrisation overhead)",
    })
    # correctness: batch size does not change the result
    big = model.encode(x[:1000], batch_size=1000)
    np.testing.assert_allclose(out.mu[:1000], big.mu, rtol=1e-3, atol=1e-4)
    assert np.all(np.isfinite(out.recon_error))
    report_ratio(f"model_infer256_rvae_vs_vae_{device}", t_ref / t, benchmark,
                 meaning="rVAE / plain-VAE inference throughput")


@pytest.mark.parametrize("device", DEVICES)
def test_bench_warp_kornia_vs_grid_sample(benchmark, device, report_ratio):
    b = 256
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, SIZE, SIZE, generator=g).to(device)
    a = (torch.rand(b, generator=g) * 360).to(device)

    def kornia_warp():
        y = MF.rotate_patches(x, a)
        _sync(device)
        return y

    def torch_warp():
        y = MF.rotate_patches_reference(x, a)
        _sync(device)
        return y

    y = benchmark(kornia_warp)
    t_k, t_t = paired_best_times(kornia_warp, torch_warp, repeat=50)
    torch.testing.assert_close(y, torch_warp(), atol=1e-5, rtol=1e-5)  # same convention (align_corners=True)
    benchmark.extra_info.update({
        "device": device, "batch": b, "kornia_patches_per_s": b / t_k, "grid_sample_patches_per_s": b / t_t,
        "ratio_meaning": "kornia warp_affine speed / (affine_grid + grid_sample) speed",
    })
    report_ratio(f"model_warp_kornia_vs_grid_sample_{device}", t_t / t_k, benchmark,
                 meaning="kornia warp_affine / (affine_grid + grid_sample) speed")


@pytest.mark.parametrize("device", DEVICES)
def test_bench_inference_many(benchmark, device, patches_in, report_ratio):
    """Encode 1e5 patches (quick: 1e4) in 1024-patch chunks; records patches/s (no timing assert)."""
    model = _untrained("rvae", device)
    n = len(patches_in)

    def run():
        out = model.encode(patches_in, batch_size=1024)
        _sync(device)
        return out

    t0 = time.perf_counter()
    out = benchmark.pedantic(run, rounds=1, iterations=1)
    dt = time.perf_counter() - t0
    # reference: the same chunks through the plain VAE (no STN, no warps)
    ref = _untrained("vae", device)
    t1 = time.perf_counter()
    ref.encode(patches_in, batch_size=1024)
    _sync(device)
    dt_ref = time.perf_counter() - t1
    benchmark.extra_info.update({
        "device": device, "n_patches": n, "seconds": dt, "patches_per_s": n / dt,
        "vae_baseline_patches_per_s": n / dt_ref,
        "ratio_meaning": "rVAE / plain-VAE inference throughput",
    })
    # correctness: streamed results equal a separate encode of a slice from the middle
    s = slice(n // 2, n // 2 + 333)
    part = model.encode(patches_in[s], batch_size=333)
    np.testing.assert_allclose(out.mu[s], part.mu, rtol=1e-3, atol=1e-4)
    period = 360.0 / model.config.rotation_symmetry
    dth = (out.angle[s] - part.angle + period / 2) % period - period / 2
    assert np.abs(dth).max() < 1e-2
    assert out.mu.shape == (n, 4) and np.all(np.isfinite(out.recon_error))
    report_ratio(f"model_infer_many_rvae_vs_vae_{device}", dt_ref / dt, benchmark,
                 meaning="rVAE / plain-VAE inference throughput")


def test_bench_encode_vs_network(benchmark, patches_in, speed_gate):
    """Our encode vs the bare network on the same sub-batches (CPU, one thread both sides)."""
    model = _untrained("rvae", "cpu")
    x = patches_in[:4096]
    net, step = model.network.eval(), 512
    assert x.shape[1] == model.config.input_size  # no resampling: the network sees the same tensors
    batches = [torch.from_numpy(np.ascontiguousarray(x[a:a + step], dtype=np.float32))[:, None]
               for a in range(0, len(x), step)]

    cfg = model.config

    def plain():  # the network on the model's own input (the patch background taken out, model_input)
        with torch.inference_mode():
            return [net(MF.model_input(b, cfg.input_size, cfg.resample, cfg.background)).mu for b in batches]

    info = speed_gate("model_encode_vs_network_cpu", lambda: model.encode(x), plain, benchmark, repeat=3,
                      min_cpu=1.0)
    out = benchmark.pedantic(lambda: model.encode(x), rounds=1, iterations=1)  # all threads
    benchmark.extra_info.update(n_patches=len(x), encode_patches_per_s_1thread=len(x) / info["t_ours_cpu_s"]
                                if "t_ours_cpu_s" in info else None)
    mu_ref = torch.cat(plain()).numpy()
    np.testing.assert_allclose(info["result_ours"].mu, mu_ref, rtol=1e-4, atol=1e-5)  # one thread
    np.testing.assert_allclose(out.mu, mu_ref, rtol=1e-3, atol=1e-4)  # all threads (other sub-batches)
    assert np.all(np.isfinite(out.recon_error))


def test_bench_encode_vs_32px_network(benchmark, speed_gate):
    """The default network vs model 1.1's (32 px, STN pooled by 2) on the same 4096 sites: what the
    smaller input buys (CPU, one thread both sides, inference as ``encode`` runs it)."""
    n, step = 4096, 512
    cfg, old = RVAEConfig(), RVAEConfig(input_size=32, stn_downsample=2)
    assert cfg.input_size < old.input_size
    torch.manual_seed(0)
    nets = [build_network(c).eval() for c in (cfg, old)]
    p, _, _ = render_site_patches(n, 35, seed=0)  # one set of sites, resampled to each input
    xs = [MF.model_input(torch.from_numpy(p)[:, None], c.input_size, c.resample, c.background) for c in (cfg, old)]

    def run(k):
        def go():
            with torch.inference_mode():
                return [nets[k](xs[k][a:a + step]).mu for a in range(0, n, step)]
        return go

    info = speed_gate("model_encode_vs_32px_network_cpu", run(0), run(1), benchmark, repeat=3, min_cpu=1.0)
    benchmark.pedantic(run(0), rounds=1, iterations=1)
    benchmark.extra_info.update(n_patches=n, input_size=cfg.input_size, reference_input_size=old.input_size)
    mu = torch.cat(info["result_ours"]).numpy()
    assert mu.shape == (n, cfg.latent_dim) and np.all(np.isfinite(mu))
    for net, c in zip(nets, (cfg, old)):  # the grid each STN's weight map lives on
        assert net.stn.radial_basis.shape[-1] == c.input_size // c.stn_downsample


# ----------------------------------------------------------------------------- where encode time goes


def _stage_times(net, x: torch.Tensor, repeat: int = 5) -> dict[str, float]:
    """Best wall time (s) of each stage of the rVAE forward pass on ``x`` (inference mode)."""
    from conftest import best_time

    with torch.inference_mode():
        angle, _ = net.stn(x * net.mask)
        xc = MF.canonicalize(x, angle, padding_mode="border")
        mu, _ = net.encoder(MF.symmetrize(xc, net.stn.symmetry) * net.mask)
        y = net.decoder(mu)
        return {
            "stn": best_time(lambda: net.stn(x * net.mask), repeat=repeat),
            "canonicalize_warp": best_time(lambda: MF.canonicalize(x, angle, padding_mode="border"), repeat=repeat),
            "symmetrize_warps": best_time(lambda: MF.symmetrize(xc, net.stn.symmetry), repeat=repeat),
            "encoder": best_time(lambda: net.encoder(xc), repeat=repeat),
            "decoder": best_time(lambda: net.decoder(mu), repeat=repeat),
            "back_rotation_warp": best_time(lambda: MF.uncanonicalize(y, angle), repeat=repeat),
        }


def test_bench_encode_breakdown(benchmark, patches_in, report_ratio):
    """Encode cost of the rVAE against its bare conv encoder, with the per-stage shares and the
    CPU variants tried (bf16 autocast, channels-last, one intra-op thread per worker vs two).

    The gated ratio is (bare encoder time) / (full encode time) on the same 2048 patches: how much
    the STN, the warps, the symmetrisation and the decoder cost on top of the encoder; a slowdown
    anywhere in our encode path lowers it.
    """
    n = 2048
    x = patches_in[:n]
    model = _untrained("rvae", "cpu")
    net = model.network
    xt = torch.from_numpy(np.ascontiguousarray(x))[:, None]

    def full():
        return model.encode(x, batch_size=1024)

    def bare():
        with torch.inference_mode():
            for s in range(0, n, 512):
                net.encoder(xt[s:s + 512])

    out = benchmark.pedantic(full, rounds=1, iterations=1, warmup_rounds=1)
    # like with like: both on one thread (encode then runs its 512-patch sub-batches in line, as each
    # of its workers does with more threads); per-stage shares on one sub-batch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_full, t_bare = paired_best_times(full, bare, repeat=3)
        st = _stage_times(net, xt[:512])
        with torch.inference_mode():
            xc = xt[:512]
            t_f32, t_bf16 = paired_best_times(lambda: net.encoder(xc),
                                              lambda: _bf16(lambda: net.encoder(xc)), repeat=3)
            enc_cl = _channels_last_copy(net.encoder)
            xcl = xc.contiguous(memory_format=torch.channels_last)
            t_cont, t_cl = paired_best_times(lambda: net.encoder(xc), lambda: enc_cl(xcl), repeat=3)
    finally:
        torch.set_num_threads(old)
    total = sum(st.values())
    benchmark.extra_info.update({
        "n_patches": n, "encode_patches_per_s": n / t_full, "bare_encoder_patches_per_s": n / t_bare,
        "stage_share_one_thread": {k: round(v / total, 3) for k, v in st.items()},
        "encoder_bf16_autocast_speedup_cpu": t_f32 / t_bf16,
        "encoder_channels_last_speedup_cpu": t_cont / t_cl,
        "ratio_meaning": "bare conv encoder time / full rVAE encode time (STN, warps, C3 average, decoder on top)",
    })
    print("\n[encode] stage shares (1 thread, 512 patches): "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in st.items())
          + f"; bf16 autocast x{t_f32 / t_bf16:.2f}, channels-last x{t_cont / t_cl:.2f} (encoder, CPU)")
    assert out.mu.shape == (n, 4) and np.all(np.isfinite(out.mu))
    report_ratio("model_encode_vs_bare_encoder_cpu", t_bare / t_full, benchmark,
                 meaning="bare conv encoder time / full rVAE encode time (the gate is model_encode_vs_network_cpu)")


def _bf16(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def _channels_last_copy(module):
    import copy

    return copy.deepcopy(module).to(memory_format=torch.channels_last)


def test_bench_shipped_model_vs_training(benchmark, report_ratio):
    """One 256 x 256 image from pixels to scores: with the shipped pretrained model (load + checks +
    encode) vs training a model on the image first (the old default; quick mode trains 3 epochs,
    the real default trains up to 30, so the true gain is larger)."""
    from stemfast.config import apply_overrides
    from stemfast.model import shipped
    from stemfast.pipeline import PipelineConfig, run_image
    from stemfast.synthetic import make_mos2

    if not shipped.MODEL_PATH.is_file():
        pytest.skip("no shipped model in the package data")
    img = make_mos2(shape=(256, 256), seed=4).image
    cfg = apply_overrides(PipelineConfig(), {"model.epochs": 3, "model.stn_epochs": 2, "model.progress": False})

    def with_shipped():
        return run_image(img, config=cfg)

    def with_training():
        return run_image(img, config=cfg, train=True)

    table, _, model = benchmark.pedantic(with_shipped, rounds=1, iterations=1, warmup_rounds=1)
    t_ship, t_train = paired_best_times(with_shipped, with_training, repeat=2, warmup=0)
    benchmark.extra_info.update({
        "n_sites": len(table), "shipped_s": t_ship, "train_s": t_train,
        "ratio_meaning": "run_image time training a model (3 epochs) / with the shipped model",
    })
    assert model.extra["shipped"]["name"] and np.isfinite(np.asarray(table["anomaly_score"])).all()
    report_ratio("model_run_image_shipped_vs_train_cpu", t_train / t_ship, benchmark,
                 meaning="run_image training a model (3 epochs) / with the shipped model")


# ----------------------------------------------------------------------------- the compiled engine


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_bench_encode_compiled_vs_torch(benchmark, patches_in, speed_gate, backend):
    """The compiled engine vs torch's encode of the same model on the same 4096 patches (CPU, one
    thread both sides): what ``analyze`` / ``batch`` use for the shipped model (model.engine)."""
    from stemfast.backend import available_backends
    from stemfast.model.engine import CompiledModel

    if backend not in available_backends():
        pytest.skip(f"backend {backend} not available")
    model = _untrained("rvae", "cpu")
    cm = CompiledModel(model.network.state_dict(), model.config, backend=backend)
    x = patches_in[:4096]
    cm.encode(x[:64])  # compile / load the kernel outside the timing
    info = speed_gate(f"model_encode_compiled_{backend}_vs_torch_cpu", lambda: cm.encode(x), lambda: model.encode(x),
                      benchmark, repeat=3, min_cpu=1.0)
    out = benchmark.pedantic(lambda: cm.encode(x), rounds=1, iterations=1)  # all threads
    ref = info["result_reference"]
    for enc in (info["result_ours"], out):
        np.testing.assert_allclose(enc.mu, ref.mu, rtol=0, atol=2e-4 * float(np.abs(ref.mu).max()))
        np.testing.assert_allclose(enc.recon_error, ref.recon_error, rtol=1e-3, atol=1e-7)
    benchmark.extra_info.update(n_patches=len(x), backend=backend)
