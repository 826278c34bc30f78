"""Subcommands of the model half of the pipeline: ``batch``, ``analyze``, ``train``, ``bench``.

``SUBCOMMANDS`` is read by :mod:`stemfast.cli`: each entry is a function ``add(subparsers)``
registering one subcommand (with ``func`` set to a handler ``(args) -> exit status``). Heavy
modules (torch, matplotlib) are imported inside the handlers, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import EXIT_ERROR, EXIT_OK, EXIT_SKIPPED, SettingsError, report_cli_error

log = logging.getLogger("stemfast.cli")


def _add_settings(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """--config and the common setting overrides (defined once: :func:`stemfast.cli_options.add_settings_options`)."""
    from .cli_options import add_settings_options

    add_settings_options(p, model=model, title="settings")


def _exit_epilog() -> str:
    from .cli_options import exit_status_epilog

    return exit_status_epilog()


def _guarded(fn, args) -> int:
    """Run a command handler; expected failures become a message and an exit status (no traceback)."""
    try:
        return fn(args)
    except BaseException as exc:  # noqa: BLE001
        log.debug("%s failed", getattr(fn, "__name__", "command"), exc_info=True)
        code = report_cli_error(exc)
        if code is None:
            raise
        return code


# ----------------------------------------------------------------------------- batch


def add_batch(sub) -> None:
    from .cli_batch import EPILOG, add_batch_arguments, run_batch_from_args

    p = sub.add_parser(
        "batch", help="analyse every micrograph of a folder with one model (figures, tables, HTML report)",
        description="Analyse every micrograph of a folder with one model: sites, classes, defect candidates, "
                    "figures and a report. Reruns skip finished inputs; an interrupted run resumes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    p.set_defaults(func=run_batch_from_args)


# ----------------------------------------------------------------------------- analyze


def add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="analyse one micrograph (the batch pipeline on one file)",
        description="Run one micrograph through the same code path as `stemfast batch`: OUT/<name>/sites.csv, "
                    "classes.png, defects.png, summary.json, plus OUT/model.pt (the pretrained model shipped "
                    "with stemfast unless --model, --train or --finetune) and OUT/report.html.",
        epilog=_exit_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="micrograph file (2-D image or time series)")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="results folder (default: FILE stem + '.stemfast' next to the current folder)")
    p.add_argument("--model", default=None, metavar="MODEL.pt",
                   help="use this trained model (default: the pretrained model shipped with stemfast)")
    from .cli_batch import add_model_choice_arguments

    add_model_choice_arguments(p)
    p.add_argument("--force", action="store_true", help="redo even when finished results exist")
    _add_settings(p)
    _add_inputs(p)
    p.set_defaults(func=cmd_analyze)


def _add_inputs(p) -> None:
    from .cli_options import add_input_options

    add_input_options(p)


def cmd_analyze(args) -> int:
    return _guarded(_cmd_analyze, args)


def _cmd_analyze(args) -> int:
    from .batch import run_batch
    from .cli_batch import print_report
    from .cli_options import config_from_args
    from .cli_options import read_options_from_args

    try:
        config = config_from_args(args)
        read_options = read_options_from_args(args)
    except SettingsError as exc:
        return report_cli_error(exc)
    path = Path(args.file)
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return EXIT_ERROR
    out = Path(args.output) if args.output else Path(path.stem + ".stemfast")
    report = run_batch([path], out, config=config, model_path=args.model, force=args.force,
                       read_options=read_options, train=args.train, finetune=args.finetune or 0)
    print_report(report)
    return report.exit_code


# ----------------------------------------------------------------------------- train


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on the sites of one or more micrographs",
        description="Find the sites of the images, cut their patches and train one (r)VAE on a sample of them; "
                    "the model (with its patch size and settings) is written to MODEL.pt for "
                    "`stemfast batch --model` / `stemfast analyze --model`.",
        epilog=_exit_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="micrograph files or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.pt", help="model file to write")
    p.add_argument("--train-frames", type=int, default=4, metavar="N", help="frames per stack used (default 4)")
    p.add_argument("--max-inputs", type=int, default=64, metavar="N",
                   help="use at most N of the inputs, evenly spread (default 64)")
    _add_settings(p)
    _add_inputs(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    return _guarded(_cmd_train, args)


def _cmd_train(args) -> int:
    from . import __version__
    from .batch import discover_inputs, train_batch_model
    from .cli_options import config_from_args
    from .cli_options import read_options_from_args
    from .config import config_hash, config_to_dict

    try:
        config = config_from_args(args)
        read_options = read_options_from_args(args)
    except SettingsError as exc:
        return report_cli_error(exc)
    problems: list = []
    entries = discover_inputs([Path(p) for p in args.images], problems=problems)
    for q, reason in problems:
        print(f"skipped: {q}: {reason}", file=sys.stderr)
    if not entries:
        print("error: no micrographs found", file=sys.stderr)
        return EXIT_ERROR
    skipped = []

    def on_skip(e, reason):
        log.error("%s: skipped: %s", e.rel, reason)
        skipped.append((e.rel, reason))

    model, info = train_batch_model(entries, config, max_train_inputs=args.max_inputs,
                                    train_frames=args.train_frames, on_skip=on_skip, read_options=read_options)
    if model is None:
        print("error: no image had a lattice: nothing to train on", file=sys.stderr)
        return EXIT_ERROR
    extra = {"patch_size": int(info["patch_size"]), "norm": info["norm"],
             "config": json.loads(json.dumps(config_to_dict(config), default=str)),
             "config_hash": config_hash(config), "stemfast_version": __version__,
             "n_train_patches": info.get("n_patches"), "train_inputs": info["inputs"]}
    out = model.save(Path(args.output), extra=extra)
    print(f"trained {config.model.model} on {info.get('n_patches')} patches of {len(info['inputs'])} inputs "
          f"(patch {info['patch_size']} px) in {info.get('train_s', 0.0):.1f} s -> {out}")
    for rel, reason in skipped:
        print(f"skipped: {rel}: {reason}", file=sys.stderr)
    return EXIT_SKIPPED if (skipped or problems) else EXIT_OK


# ----------------------------------------------------------------------------- bench


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="per-stage throughput on a synthetic MoS2 image",
        description="Render a synthetic MoS2 HAADF image (stemfast.synth.make_mos2), run every stage of the "
                    "pipeline on it and print seconds and sites/s per stage (model training reported "
                    "separately). The model is the shipped pretrained one unless --train.")
    p.add_argument("--size", type=int, default=4096, help="image side in px (default 4096)")
    p.add_argument("--frames", type=int, default=1, help="frames of a time series (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic image")
    p.add_argument("--train-patches", type=int, default=5000, metavar="N",
                   help="patches the model is trained on (default 5000; model.max_train_patches)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--train", action="store_true", help="train a model on the image instead of the shipped one")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the first call too (by default a small crop is run first, so JIT compilation "
                        "and start-up costs are not counted)")
    _add_settings(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    return _guarded(_cmd_bench, args)


def _cmd_bench(args) -> int:
    import numpy as np

    from .batch.common import peak_memory_mib
    from .cli_options import config_from_args
    from .config import apply_overrides
    from .pipeline import analyze, prepare, train_model
    from .report import format_stage_table, stage_table_rows
    from .synth import make_mos2

    try:
        config = config_from_args(args)
    except SettingsError as exc:
        return report_cli_error(exc)
    o = {"model.max_train_patches": args.train_patches}
    if args.epochs is None and not args.config:
        o["model.epochs"] = 3  # a throughput run, not a quality run
    config = apply_overrides(config, o)
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
        from .model.shipped import default_model

        model = default_model(config)  # None (with a warning) when it cannot be used: trained below
    if not args.no_warmup:  # JIT compilation, thread pools, first-call set-up: not part of the timings
        crop = np.ascontiguousarray(frames[0][: min(args.size, 256), : min(args.size, 256)])
        wp = prepare(crop, config=config, pixel_size=px, unit="nm")
        if len(wp.patches) >= 2:
            from .config import apply_overrides as _ao

            wm = model or train_model([wp], config=_ao(config, {"model.epochs": 1, "model.stn_epochs": 1}))
            analyze(wp, wm, config=config)
    for i, img in enumerate(frames):
        prep = prepare(np.asarray(img), config=config, pixel_size=px, unit="nm",
                       patch_size=(model.extra.get("patch_size") if model is not None else None))
        if model is None:
            t0 = time.perf_counter()
            model = train_model([prep], config=config)
            train_s = time.perf_counter() - t0
        table, _summary = analyze(prep, model, config=config)
        n_sites += len(table)
        for k, v in prep.timings.items():
            secs[k] = secs.get(k, 0.0) + float(v)
    rows = stage_table_rows(secs, n_sites)
    print(format_stage_table(rows))
    tag = (model.extra.get("shipped") or {}) if model is not None else {}
    if tag and not train_s:
        print(f"model: shipped {tag.get('name')} {tag.get('version')} (no training); "
              f"peak memory {peak_memory_mib():.0f} MiB")
    else:
        print(f"model training: {train_s:.1f} s ({config.model.model}, {config.model.epochs} epochs max, "
              f"<= {config.model.max_train_patches} patches); peak memory {peak_memory_mib():.0f} MiB")
    if args.json:
        from .atomic import write_json

        write_json(args.json, {"size": args.size, "frames": args.frames, "n_sites": n_sites, "stages": rows,
                               "train_s": train_s, "peak_memory_mib": peak_memory_mib()})
    return EXIT_OK


SUBCOMMANDS: list = [add_train, add_analyze, add_batch, add_bench]
