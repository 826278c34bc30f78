"""Benchmark: the whole pipeline with a trained model -- sites, patches, encode, classes, scores.

What a user runs on every image once a model exists (``batch --model``): ``prepare`` (the lattice
front end + patches) and ``analyze`` (encode + k-means + defect scores) on a synthetic MoS2
micrograph. The model is trained beforehand (a fixture, not timed) with the default architecture
and a short schedule; throughput does not depend on how long it trained.

Full mode (``STEMFAST_BENCH_FULL=1``): 4096 x 4096 px (~8e4 sites), with the targets asserted:
issue 5's >= 10,000 sites/s on 2 cores (met) and issue 10's >= 40,000 (not met: ~15.5k, so full
mode fails here until it is). Quick mode: 1024 x 1024. Correctness alongside: every atom found or
predicted, and the classes separate the three sublattices (adjusted Rand index against the truth).
The CI ratio uses the yardstick of ``bench_sites.py`` (``scipy.ndimage.gaussian_filter`` with
sigma = one column spacing on the same image) over the pipeline's time, so a slower machine does
not fail it but a slower pipeline does; measured like the kernel gates (``speed_gate``, see
conftest.py: CPU time, paired, our kernels and torch on one thread). Sites/s per stage (wall
time, all threads) are recorded in ``extra_info``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from scipy import ndimage

from conftest import truth_match
from stemfast.config import load_config
from stemfast.pipeline import analyze, prepare, train_model
from stemfast.synthetic import make_mos2

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")
SIZE = 1024 if QUICK else 4096
#: issue targets (full mode, 4096 x 4096, all threads, with a trained model): issue 5's, then issue 10's
TARGETS_SITES_PER_S = {"issue 5": 10_000, "issue 10": 40_000}


@pytest.fixture(scope="module")
def setup():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    s = make_mos2(shape=(SIZE, SIZE), rotation_deg=7.0, seed=21)
    cfg = load_config(None, {"model": {"epochs": 12, "stn_epochs": 4,
                                       "max_train_patches": 3000 if QUICK else 6000, "device": "cpu",
                                       "progress": False}})
    # train on another image of the same material (as `batch --model` would use a model trained earlier)
    train = make_mos2(shape=(768, 768), rotation_deg=-12.0, seed=22)
    model = train_model([prepare(train.image, config=cfg)], config=cfg)
    yield s, cfg, model
    torch.set_num_threads(old)


def test_pipeline_throughput(benchmark, speed_gate, setup):
    s, cfg, model = setup
    img = s.image
    nn = s.meta["nn_px"]
    warm = prepare(img[:256, :256], config=cfg, patch_size=model.extra.get("patch_size"))
    analyze(warm, model, config=cfg)  # JIT, thread pools, first-call set-up

    def pipeline():
        return analyze(prepare(img, config=cfg, patch_size=model.extra.get("patch_size")), model, config=cfg)

    speed_gate("pipeline_vs_gaussian_filter", pipeline, lambda: ndimage.gaussian_filter(img, nn), benchmark,
               repeat=2, warmup=(0, 1), min_cpu=0.0)

    timings: dict = {}

    def run():
        prep = prepare(img, config=cfg, patch_size=model.extra.get("patch_size"))
        table, _summary = analyze(prep, model, config=cfg)
        timings.clear()
        timings.update(prep.timings)
        return table

    table = benchmark.pedantic(run, rounds=2 if QUICK else 1, iterations=1)
    t_ours = benchmark.stats.stats.min

    # correctness alongside: all atoms found or predicted, classes = sublattices
    d, j, recall = truth_match(table.xy, s.truth, nn)
    ok = (d <= 0.3 * nn) & (s.truth[:, 3] == 0)
    ari = adjusted_rand_score(s.truth[ok, 2].astype(int), np.asarray(table["class_id"])[j[ok]])
    assert recall >= 0.99, recall
    assert ari >= 0.9, ari
    n = len(table)
    benchmark.extra_info.update(seconds=t_ours, sites=n, sites_per_s=n / t_ours, class_ari=ari, size=SIZE,
                                stages_sites_per_s={k: round(n / v) for k, v in timings.items() if v > 0})
    print(f"\npipeline {SIZE}x{SIZE} with a trained model: {t_ours:.2f} s, {n} sites, {n / t_ours:,.0f} sites/s, "
          f"ARI {ari:.3f}; stages (s) { {k: round(v, 3) for k, v in timings.items()} }")
    if not QUICK:
        missed = {k: v for k, v in TARGETS_SITES_PER_S.items() if n / t_ours < v}
        assert not missed, f"{n / t_ours:,.0f} sites/s, below the target of {missed}"
