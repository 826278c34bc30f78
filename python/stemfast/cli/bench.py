"""``stemfast bench``: per-stage throughput on a synthetic MoS2 image."""
from __future__ import annotations

import time

from .options import (EXIT_OK, AtLeast, add_settings_options, config_from_args, guarded, settings_given,
                      synthetic_min_side)

__all__ = ["add", "cmd_bench", "BENCH_FALLBACKS"]

#: The bench's settings where the user sets none (--config, --set, --epochs, --train-patches): a
#: throughput run, not a quality run.
BENCH_FALLBACKS = {"model.epochs": 3, "model.max_train_patches": 5000}


def add(sub) -> None:
    """Register ``stemfast bench``."""
    p = sub.add_parser(
        "bench", help="per-stage throughput on a synthetic MoS2 image",
        description="Render a synthetic MoS2 HAADF image (stemfast.synthetic.make_mos2), run every stage of the "
                    "pipeline on it and print seconds and sites/s per stage (model training reported "
                    "separately). The model is the shipped pretrained one unless --train.")
    p.add_argument("--size", type=AtLeast(synthetic_min_side), default=4096,
                   help="image side in px, %(type)s (default 4096)")
    p.add_argument("--frames", type=AtLeast(1), default=1, help="frames of a time series, %(type)s (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic image")
    p.add_argument("--train-patches", type=int, default=None, metavar="N",
                   help=f"patches the model is trained on (model.max_train_patches; default "
                        f"{BENCH_FALLBACKS['model.max_train_patches']} unless --config or --set sets it; "
                        f"model.epochs likewise defaults to {BENCH_FALLBACKS['model.epochs']})")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--train", action="store_true", help="train a model on the image instead of the shipped one")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the first call too (by default a small crop is run first, so JIT compilation "
                        "and start-up costs are not counted)")
    add_settings_options(p, title="settings")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    """``stemfast bench``: per-stage throughput on a synthetic image."""
    return guarded(_cmd_bench, args)


def _cmd_bench(args) -> int:
    import numpy as np

    from ..batch.common import peak_memory_mib
    from ..config import apply_overrides
    from ..patchextent import plan_for
    from ..pipeline import analyze, prepare, train_model
    from ..report import format_stage_table, stage_table_rows
    from ..synthetic import make_mos2

    config = config_from_args(args)
    given = settings_given(args)  # the user's settings win over the bench's fallbacks
    o = {k: v for k, v in BENCH_FALLBACKS.items() if k not in given}
    config = apply_overrides(config, o) if o else config
    t0 = time.perf_counter()
    synth = make_mos2(shape=(args.size, args.size), n_frames=args.frames, seed=args.seed)
    t_synth = time.perf_counter() - t0
    frames = synth.image if synth.image.ndim == 3 else synth.image[None]
    px = synth.meta.get("pixel_size_A", 0.12) / 10.0
    print(f"bench: {args.frames} x {args.size} x {args.size} px synthetic MoS2 (rendered in {t_synth:.1f} s), "
          f"{len(synth.truth)} true sites per frame")
    secs: dict[str, float] = {}
    n_sites = 0
    model = None
    train_s = 0.0
    if not args.train:
        from ..model.shipped import shipped_for_run

        model = shipped_for_run(config)  # None (with a warning) when it cannot be used: trained below
    if not args.no_warmup:  # JIT compilation, thread pools, first-call set-up: not part of the timings
        crop = np.ascontiguousarray(frames[0][: min(args.size, 256), : min(args.size, 256)])
        wp = prepare(crop, config=config, pixel_size=px, unit="nm")
        if len(wp.patches) >= 2:
            from ..config import apply_overrides as _ao

            wm = model or train_model([wp], config=_ao(config, {"model.epochs": 1, "model.stn_epochs": 1}))
            analyze(wp, wm, config=config)
    for i, img in enumerate(frames):
        t_frame = time.perf_counter()
        prep = prepare(np.asarray(img), config=config, pixel_size=px, unit="nm",
                       patch_size=plan_for(model, config).fixed_px)
        if model is None:
            t0 = time.perf_counter()
            model = train_model([prep], config=config)
            train_s = time.perf_counter() - t0
        table, _summary = analyze(prep, model, config=config)
        wall = time.perf_counter() - t_frame - (train_s if i == 0 else 0.0)
        n_sites += len(table)
        for k, v in prep.timings.items():
            secs[k] = secs.get(k, 0.0) + float(v)
        # what no stage timer holds (tables, the lattice's summary and checks, ...): the total is the wall time
        secs["other"] = secs.get("other", 0.0) + max(0.0, wall - sum(float(v) for v in prep.timings.values()))
    rows = stage_table_rows(secs, n_sites)
    print(format_stage_table(rows))
    tag = (model.extra.get("shipped") or {}) if model is not None else {}
    if tag and not train_s:
        from ..model.engine import device_of, engine_of

        print(f"model: shipped {tag.get('name')} {tag.get('version')} (no training, "
              f"{engine_of(model)} engine on {device_of(model)}); "
              f"peak memory {peak_memory_mib():.0f} MiB")
    else:
        print(f"model training: {train_s:.1f} s ({config.model.model}, {config.model.epochs} epochs max, "
              f"<= {config.model.max_train_patches} patches); peak memory {peak_memory_mib():.0f} MiB")
    if args.json:
        from ..atomic import write_json

        write_json(args.json, {"size": args.size, "frames": args.frames, "n_sites": n_sites, "stages": rows,
                               "train_s": train_s, "peak_memory_mib": peak_memory_mib()})
    return EXIT_OK
