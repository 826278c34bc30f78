"""``stemfast train``: train a model on the sites of one or more micrographs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .options import (EXIT_ERROR, EXIT_OK, EXIT_SKIPPED, add_input_options, add_settings_options, config_from_args,
                      exit_status_epilog, guarded, read_options_from_args)

__all__ = ["add", "cmd_train"]

log = logging.getLogger("stemfast.cli")


def add(sub) -> None:
    """Register ``stemfast train``."""
    p = sub.add_parser(
        "train", help="train a model on the sites of one or more micrographs",
        description="Find the sites of the images, cut their patches and train one (r)VAE on a sample of them; "
                    "the model (with how its patches were cut and its settings) is written to MODEL.pt for "
                    "`stemfast batch --model` / `stemfast analyze --model`.",
        epilog=exit_status_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="micrograph files or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.pt", help="model file to write")
    p.add_argument("--train-frames", type=int, default=4, metavar="N", help="frames per stack used (default 4)")
    p.add_argument("--max-inputs", type=int, default=64, metavar="N",
                   help="use at most N of the inputs, evenly spread (default 64)")
    add_settings_options(p, title="settings")
    add_input_options(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    """``stemfast train``: a model trained on a sample of the inputs' patches."""
    return guarded(_cmd_train, args)


def _check_output_file(output: str) -> None:
    """``-o`` names the model file to write: a folder (an existing one, or a name ending in a separator)
    is a :class:`~stemfast.errors.SettingsError` before any training (it failed after it, the model lost)."""
    from ..errors import SettingsError

    if Path(output).is_dir() or output.endswith(("/", os.sep)):
        raise SettingsError(f"-o {output}: is a folder; -o names the model file to write "
                            f"(e.g. -o {Path(output) / 'model.pt'})")


def _cmd_train(args) -> int:
    from .. import __version__
    from ..batch import discover_inputs, train_batch_model
    from ..batch.runner import BatchOptions
    from ..config import config_hash, config_to_dict
    from ..model.engine import check_device

    config = config_from_args(args)
    check_device(config.model.device)  # before the patches are cut
    _check_output_file(args.output)
    BatchOptions(max_train_inputs=args.max_inputs, train_frames=args.train_frames)  # their checks: SettingsError
    read_options = read_options_from_args(args)
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
    extra = {"patch_size": info["patch_size"], "patch_extent": info["patch_extent"], "norm": info["norm"],
             "config": json.loads(json.dumps(config_to_dict(config), default=str)),
             "config_hash": config_hash(config), "stemfast_version": __version__,
             "n_train_patches": info.get("n_patches"), "train_inputs": info["inputs"]}
    out = model.save(Path(args.output), extra=extra)
    print(f"trained {config.model.model} on {info.get('n_patches')} patches of {len(info['inputs'])} inputs "
          f"({_cut_words(info)}) in {info.get('train_s', 0.0):.1f} s -> {out}")
    for rel, reason in skipped:
        print(f"skipped: {rel}: {reason}", file=sys.stderr)
    return EXIT_SKIPPED if (skipped or problems) else EXIT_OK


def _cut_words(info: dict) -> str:
    """How the training patches were cut, for the closing line (:mod:`stemfast.patchextent`)."""
    rec = info.get("patch_extent") or {}
    span = f"{rec['spacings']:.2f} site spacings" if rec.get("spacings") else "spacings unknown"
    if info.get("patch_size"):
        return f"patch {info['patch_size']} px, fixed: {span}"
    return f"patches cut per image by its spacing: {span}"
