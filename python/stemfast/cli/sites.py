"""``stemfast sites``: find every lattice site of an image and write the site table."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ..errors import SettingsError
from ..materials import add_material_argument
from .options import (EXIT_OK, add_backend_option, add_input_options, add_spacing_option,
                      add_verbose_option, guarded, read_options_from_args, report_cli_error)

__all__ = ["add", "cmd_sites"]


def add(sub) -> None:
    """Register ``stemfast sites``."""
    p = sub.add_parser("sites", help="find every lattice site of an image and write the site table",
                       description="Find every atomic column and every place a column should be "
                                   "(hexagon centres, vacancies) and write the per-site table.")
    p.add_argument("image", help="micrograph file (TIFF, NPY, DM3/DM4, EMD, SER, MRC, HSPY, Nion .ndata, HDF5)")
    p.add_argument("-o", "--output", default=None,
                   help="output table (.csv, or .parquet); default: IMAGE stem + '.sites.csv'")
    p.add_argument("--frame", type=int, default=None,
                   help="only this frame of a stack (0 the first; negative counts from the end, -1 the last)")
    _add_site_options(p)
    add_input_options(p)
    add_verbose_option(p)
    add_backend_option(p)
    p.set_defaults(func=cmd_sites)


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
    from ..config import load_config

    return load_config(None, {"sites": _site_overrides(args)}).sites


def cmd_sites(args) -> int:
    """``stemfast sites``: the site table of one micrograph."""
    return guarded(_cmd_sites, args)


def _cmd_sites(args) -> int:
    import numpy as np

    from ..batch.inputs import read_input
    from ..sanity import check_spacing_fits, spacing_warnings
    from ..sites import find_sites
    from ..table import SiteTable

    try:
        settings = _site_settings(args)
        read_options = read_options_from_args(args)
    except SettingsError as exc:
        return report_cli_error(exc)
    path = Path(args.image)
    mg = read_input(path, read_options)
    out = Path(args.output) if args.output else path.with_suffix("").with_name(path.stem + ".sites.csv")
    if args.frame is not None and not -mg.n_frames <= args.frame < mg.n_frames:
        return report_cli_error(SettingsError(f"--frame {args.frame}: {path} has {mg.n_frames} frame(s)"))
    # a negative --frame counts from the end (-1: the last); the table names the frame's index
    frames = [args.frame % mg.n_frames] if args.frame is not None else list(range(mg.n_frames))
    check_spacing_fits(settings.spacing, mg.shape2d)
    tables = []
    t0 = time.perf_counter()
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
