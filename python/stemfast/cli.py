"""Command line: ``python -m stemfast {sites,demo,train,analyze,batch,bench} ...``.

Each subcommand is a thin layer over the Python API; heavy imports (torch) happen only in the
subcommands that need them, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .cli_options import add_backend_option, add_input_options, add_spacing_option, add_verbose_option
from .errors import EXIT_ERROR, EXIT_OK, EXIT_SKIPPED, report_cli_error  # noqa: F401 - EXIT_SKIPPED re-exported
from .logutil import setup_logging
from .materials import add_material_argument

log = logging.getLogger("stemfast.cli")


def _add_common(p: argparse.ArgumentParser) -> None:
    add_verbose_option(p)
    add_backend_option(p)


def _add_site_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lattice front end")
    add_spacing_option(g)
    g.add_argument("--refine", choices=["gauss", "com", "none"], default=None,
                   help="sub-pixel refinement of the columns (default gauss)")
    g.add_argument("--no-fill", action="store_true", help="do not add predicted lattice sites")
    g.add_argument("--no-holes", action="store_true", help="do not detect holes in the film")
    add_material_argument(g)


def _site_overrides(args) -> dict:
    o: dict = {}
    if getattr(args, "spacing", None) is not None:
        o["spacing"] = args.spacing
    if getattr(args, "material", None) is not None:
        o["material"] = args.material
    if getattr(args, "refine", None) is not None:
        o["refine"] = None if args.refine == "none" else args.refine
    if getattr(args, "no_fill", False):
        o["fill"] = False
    if getattr(args, "no_holes", False):
        o["detect_holes"] = False
    if getattr(args, "backend", None):
        o["backend"] = args.backend
    return o


def _site_settings(args):
    """The checked ``SiteSettings`` of the ``sites`` options (:class:`~stemfast.errors.SettingsError`)."""
    from .config import load_config

    return load_config(None, {"sites": _site_overrides(args)}).sites


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stemfast",
        description="Fast unsupervised atomic-lattice analysis and defect detection for atomic-resolution "
                    "STEM images (HAADF of 2-D materials such as monolayer MoS2).",
    )
    ap.add_argument("--version", action="version", version=f"stemfast {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sites", help="find every lattice site of an image and write the site table",
                       description="Find every atomic column and every place a column should be "
                                   "(hexagon centres, vacancies) and write the per-site table.")
    p.add_argument("image", help="micrograph file (TIFF, NPY, DM3/DM4, EMD, SER, MRC, HDF5)")
    p.add_argument("-o", "--output", default=None,
                   help="output table (.csv, or .parquet); default: IMAGE stem + '.sites.csv'")
    p.add_argument("--frame", type=int, default=None, help="only this frame of a stack")
    _add_site_options(p)
    add_input_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("demo", help="write a small synthetic example folder and analyse it",
                       description="Generate small synthetic MoS2 micrographs with ground truth "
                                   "(stemfast.synth) into OUT/data and run the batch analysis on them "
                                   "into OUT/results.")
    p.add_argument("-o", "--output", default="stemfast-demo", help="demo folder (default: ./stemfast-demo)")
    p.add_argument("--size", type=int, default=512, help="image size in px (default 512)")
    p.add_argument("--n-images", type=int, default=2, help="number of images (default 2)")
    p.add_argument("--data-only", action="store_true", help="only write the example data")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    for extra in _extra_subcommands():
        extra(sub)
    return ap


def _extra_subcommands():
    """Subcommands defined in other modules (kept out of this file to keep start-up light)."""
    from . import cli_model

    return cli_model.SUBCOMMANDS


def cmd_sites(args) -> int:
    try:
        return _cmd_sites(args)
    except BaseException as exc:  # noqa: BLE001 - expected failures become a message and an exit status
        log.debug("sites failed", exc_info=True)
        code = report_cli_error(exc)
        if code is None:
            raise
        return code


def _cmd_sites(args) -> int:
    from .batch.inputs import read_input
    from .cli_options import read_options_from_args
    from .errors import SettingsError
    from .sanity import check_spacing_fits, spacing_warnings
    from .sites import find_sites
    from .table import SiteTable

    try:
        settings = _site_settings(args)
        read_options = read_options_from_args(args)
    except SettingsError as exc:
        return report_cli_error(exc)
    path = Path(args.image)
    mg = read_input(path, read_options)
    out = Path(args.output) if args.output else path.with_suffix("").with_name(path.stem + ".sites.csv")
    frames = [args.frame] if args.frame is not None else list(range(mg.n_frames))
    if args.frame is not None and not -mg.n_frames <= args.frame < mg.n_frames:
        return report_cli_error(SettingsError(f"--frame {args.frame}: {path} has {mg.n_frames} frame(s)"))
    check_spacing_fits(settings.spacing, mg.shape2d)
    tables = []
    t0 = time.perf_counter()
    import numpy as np

    for i, f in enumerate(frames):
        img = mg.frame(f)
        if i == 0:
            for w in spacing_warnings(img, settings.spacing, settings):
                print(f"warning: {path}: {w}", file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = find_sites(img, settings=settings, pixel_size=mg.pixel_size, unit=mg.unit)
        for w in caught:
            print(f"warning: {path}" + (f" frame {f}" if mg.is_stack else "") + f": {w.message}", file=sys.stderr)
        tables.append(t.with_columns({"frame": np.full(len(t), f, dtype=np.int64)}))
    table = SiteTable.concat(tables) if len(tables) > 1 else tables[0]
    if len(table) and "frame" in table:
        cols = {"frame": table["frame"], **{k: v for k, v in table.columns.items() if k != "frame"}}
        table = SiteTable(cols, table.meta)
    table.write(out)
    meta = tables[0].meta
    print(f"{path.name}: {len(table)} sites "
          f"({int((table['source'] == 'peak').sum()) if len(table) else 0} columns found, "
          f"{int((table['source'] == 'lattice').sum()) if len(table) else 0} added by the lattice, "
          f"{int((table['source'] == 'off_lattice').sum()) if len(table) else 0} peaks off the lattice), "
          f"spacing {meta.get('spacing_px', float('nan')):.3f} px, {time.perf_counter() - t0:.2f} s -> {out}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .synth import save_example

    out = Path(args.output)
    data = out / "data"
    paths = save_example(data, n_images=args.n_images, size=args.size)
    print(f"wrote {len(paths)} example micrographs (+ ground truth) to {data}")
    if args.data_only:
        return EXIT_OK
    from .cli_batch import run_batch_cli

    return run_batch_cli([str(data), "-o", str(out / "results")] + (["-v"] * args.verbose))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_OK
    setup_logging(getattr(args, "verbose", 0))
    return int(args.func(args) or 0)
