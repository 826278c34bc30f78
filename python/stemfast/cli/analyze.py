"""``stemfast analyze``: one micrograph through the batch pipeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (EXIT_ERROR, add_companion_options, add_input_options, add_model_choice_arguments, add_settings_options,
                      companions_from_args, config_from_args, exit_status_epilog, guarded, typed_settings,
                      read_options_from_args, start_encode_worker_early)

__all__ = ["add", "cmd_analyze"]


def add(sub) -> None:
    """Register ``stemfast analyze``."""
    p = sub.add_parser(
        "analyze", help="analyse one micrograph (the batch pipeline on one file)",
        description="Run one micrograph through the same code path as `stemfast batch`: OUT/<name>/sites.csv, "
                    "classes.png, defects.png, summary.json, plus OUT/model.pt (the pretrained model shipped "
                    "with stemfast unless --model, --train or --finetune) and OUT/report.html. A second detector's "
                    "image of the same scan joins the defect scores: the file beside FILE whose name differs in "
                    "the detector's name alone (s_HAADF.dm4 and s_MAADF.dm4), where it is of the same scan, or "
                    "the one --companion names; --no-companion: FILE alone.",
        epilog=exit_status_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="micrograph file (2-D image or time series)")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="results folder (default: ./STEM.stemfast, FILE's stem in the current folder)")
    add_model_choice_arguments(p)
    p.add_argument("--force", action="store_true", help="redo even when finished results exist")
    add_settings_options(p, title="settings")
    add_input_options(p)
    add_companion_options(p, single_file=True)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    """``stemfast analyze``: :func:`stemfast.batch.run_batch` on one file."""
    return guarded(_cmd_analyze, args)


def _cmd_analyze(args) -> int:
    start_encode_worker_early(args)
    from ..batch import run_batch
    from .batch import print_report

    config = config_from_args(args)
    read_options = read_options_from_args(args)
    companions = companions_from_args(args)
    path = Path(args.file)
    for what, f in (("file", path), ("companion file", args.companion)):
        if f is not None and not Path(f).is_file():
            print(f"error: no such {what}: {f}", file=sys.stderr)
            return EXIT_ERROR
    out = Path(args.output) if args.output else Path(path.stem + ".stemfast")
    report = run_batch([path], out, config=config, model_path=args.model, force=args.force,
                       read_options=read_options, train=args.train, finetune=args.finetune or 0,
                       given_settings=typed_settings(args), **companions)
    print_report(report)
    return report.exit_code
