"""``stemfast batch``: the command line of :func:`stemfast.batch.run_batch`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .options import (EXIT_ERROR, EXIT_OK, add_companion_options, add_input_options, add_model_choice_arguments, add_settings_options,
                      companions_from_args, config_from_args, exit_status_epilog, guarded, typed_settings,
                      read_options_from_args, start_encode_worker_early)

from ..config import DEFAULT_TRAIN_FRAMES, DEFAULT_TRAIN_INPUTS

if TYPE_CHECKING:
    from ..batch import BatchReport

__all__ = ["add", "add_batch_arguments", "build_batch_parser", "run_batch_from_args", "run_batch_cli",
           "print_report", "EPILOG"]

log = logging.getLogger("stemfast.cli")


def add_batch_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``batch`` options to ``p`` (shared by ``stemfast batch`` and :func:`run_batch_cli`)."""
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE",
                   help="folder(s) searched recursively for micrographs (TIFF, NPY, DM3/DM4, EMD, SER, MRC, HSPY, Nion "
                        ".ndata, HDF5; see stemfast.io.SUPPORTED_EXTENSIONS), and/or single files; exported pictures "
                        "(PNG, JPEG, BMP) are read when named as files, never picked from a folder")
    p.add_argument("-o", "--output", default="stemfast-out", metavar="OUT",
                   help="results folder (default: ./stemfast-out); one sub-folder per input plus model.pt, "
                        "stemfast.toml, batch_summary.json and report.html")
    add_model_choice_arguments(p)
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the analysis on Dask: 'local:N' starts a local cluster of N worker processes, "
                        "'tcp://host:8786' connects to a running scheduler (needs stemfast[distributed] and a "
                        "folder all workers can write)")
    p.add_argument("--force", action="store_true",
                   help="redo everything: ignore finished results, retrain the model, retry unreadable files")
    add_settings_options(p)
    add_input_options(p)
    add_companion_options(p)
    g2 = p.add_argument_group("batch")
    g2.add_argument("--train-inputs", type=int, default=DEFAULT_TRAIN_INPUTS, metavar="N",
                    help=f"train on patches of at most N inputs, evenly spread over the batch (default "
                         f"{DEFAULT_TRAIN_INPUTS}; a rerun that changes it trains again)")
    g2.add_argument("--train-frames", type=int, default=DEFAULT_TRAIN_FRAMES, metavar="N",
                    help=f"frames per stack used for training (default {DEFAULT_TRAIN_FRAMES}; a rerun that changes "
                         "it trains again)")
    g2.add_argument("--frames-per-task", type=int, default=16, metavar="N",
                    help="frames of a stack per Dask task (default 16; 2-D images are one task per file)")
    g2.add_argument("--print-config", action="store_true", help="print the resolved settings (TOML) and exit")
    return p


def _epilog() -> str:
    return """\
outputs (OUT/):
  <name>/sites.csv     one row per site: frame, x, y, source, intensity, class_id, recon_error,
                       anomaly_score, is_defect, defect_kind, angle (+ x_nm, y_nm when calibrated, + more)
  <name>/classes.png   sites coloured by class over the image
  <name>/defects.png   top defect candidates over the image + their patches
  <name>/summary.json  counts, lattice, drift (stacks), per-stage timings and sites/s, peak memory, warnings,
                       detectors (1, or 2 with a companion image), companion (its path) and
                       companion_found (automatic: the file beside it named for another detector)
  <name>/tracks.csv    stacks: one row per defect track (sites.csv gets track_id); tracks.png its figure
  <name>/done.json     completion marker (written last): a rerun skips inputs whose marker is current
  model.pt, model.json the model (the shipped one unless --model/--train/--finetune) and its provenance
  stemfast.toml        resolved settings, stemfast version, input checksums ([companions]: each input's
                       second detector image and its checksum)
  batch_summary.json   statuses, skipped inputs with reasons, stage table
  report.html          everything in one offline HTML file
  .stemfast.lock       while a run writes into OUT (a second run into the same OUT is refused)

""" + exit_status_epilog() + "\n"


EPILOG = _epilog()
DESCRIPTION = ("Analyse every micrograph of a folder with one model: sites, classes, defect candidates, "
               "figures and a report. Reruns skip finished inputs; an interrupted run resumes.")


def add(sub) -> None:
    """Register ``stemfast batch``."""
    p = sub.add_parser(
        "batch", help="analyse every micrograph of a folder with one model (figures, tables, HTML report)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_arguments(p)
    p.set_defaults(func=run_batch_from_args)


def build_batch_parser(prog: str = "stemfast batch") -> argparse.ArgumentParser:
    """The parser of ``stemfast batch``."""
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG, description=DESCRIPTION)
    return add_batch_arguments(p)


def print_report(report: BatchReport) -> None:
    """The run in a few lines on the console: counts, stage table, warnings and skipped inputs."""
    from ..batch.common import REPORT_FILE
    from ..report import format_stage_table

    res = report.results
    counts = {st: sum(r.status == st for r in res) for st in ("done", "current", "partial", "skipped", "failed")}
    print(f"stemfast batch: {len(res)} inputs -> {report.out_dir}: "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
          + (f"; model fine-tuned ({report.model_finetuned_steps} steps, {report.train_seconds:.1f} s)"
             if report.model_trained and report.model_finetuned_steps else
             f"; model trained ({report.train_seconds:.1f} s)" if report.model_trained else
             f"; model {report.model_source}" if report.model_source else ""))
    if report.stage_table:
        print(format_stage_table(report.stage_table))
    if report.model_refused:
        print(f"warning: the shipped default model was not used ({report.model_refused}); a model was trained on "
              "the inputs instead", file=sys.stderr)
    for r in res:
        for w in r.warnings:
            print(f"warning: {r.path}: {w}", file=sys.stderr)
    for r in report.skipped:
        print(f"{r.status}: {r.path}: {r.reason}", file=sys.stderr)
    print(f"report: {report.out_dir / REPORT_FILE}")


def run_batch_from_args(args) -> int:
    """Run a batch from parsed arguments (see :func:`add_batch_arguments`); returns the exit status."""
    return guarded(_run_batch_from_args, args)


def _run_batch_from_args(args) -> int:
    from ..batch import run_batch

    start_encode_worker_early(args)
    config = config_from_args(args)
    read_options = read_options_from_args(args)
    companions = companions_from_args(args)
    if args.scheduler:
        from ..batch.dask import parse_scheduler

        parse_scheduler(args.scheduler)
    if getattr(args, "print_config", False):
        from ..config import dump_config

        print(dump_config(config), end="")
        return EXIT_OK
    report = run_batch([Path(p) for p in args.inputs], Path(args.output), config=config, model_path=args.model,
                       scheduler=args.scheduler, force=args.force, max_train_inputs=args.train_inputs,
                       train_frames=args.train_frames, frames_per_task=args.frames_per_task,
                       read_options=read_options, train=getattr(args, "train", False),
                       finetune=getattr(args, "finetune", 0) or 0, given_settings=typed_settings(args),
                       **companions)
    if not report.results:
        print(f"error: no micrographs found in {' '.join(args.inputs)}{_pictures_hint(args.inputs)}", file=sys.stderr)
        return EXIT_ERROR
    print_report(report)
    return report.exit_code


def run_batch_cli(argv: Sequence[str] | None = None) -> int:
    """``stemfast batch`` as a function: parse ``argv``, run, return the exit status."""
    from ..logutil import setup_logging

    args = build_batch_parser().parse_args(list(argv) if argv is not None else None)
    setup_logging(args.verbose)
    return run_batch_from_args(args)


def _pictures_hint(inputs) -> str:
    """``" (it holds N exported pictures ...)"`` when folders among ``inputs`` hold pictures, which a folder
    search does not pick (:func:`stemfast.io.find_pictures`); else ``""``."""
    from ..io import find_pictures

    pics = [p for d in map(Path, inputs) if d.is_dir() for p in find_pictures(d)]
    if not pics:
        return ""
    return (f" (it holds {len(pics)} exported picture(s), e.g. {pics[0].name}: pictures are read only when named "
            f"as files, e.g. stemfast batch {pics[0].parent}/*{pics[0].suffix})")
