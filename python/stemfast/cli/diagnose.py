"""``stemfast diagnose``: does a trained model's STN canonicalise rotated copies of the sites of
micrographs? (:mod:`stemfast.diagnostics`)"""
from __future__ import annotations

import numpy as np

from .options import EXIT_OK, add_verbose_option, guarded

__all__ = ["add", "cmd_diagnose"]


def add(sub) -> None:
    """Register ``stemfast diagnose``."""
    p = sub.add_parser("diagnose", help="rotation invariance of a trained model on micrographs",
                       description="STN canonicalisation of rotated copies of the sites of micrographs "
                                   "(stemfast.diagnostics).")
    p.add_argument("model", help="model file (RVAE.save, e.g. OUT/model.pt of `stemfast batch`)")
    p.add_argument("images", nargs="+", help="micrographs")
    p.add_argument("--angles", type=float, nargs="*", default=[90.0, 180.0, 270.0, 17.0, 43.0], metavar="DEG",
                   help="micrograph rotations (degrees; multiples of 90 are exact; default: %(default)s)")
    p.add_argument("--max-sites", type=int, default=None, metavar="N",
                   help="random subset of sites per measurement (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the site subsets and the patch rotations (the same seed, the same numbers; default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all summaries to this JSON file (default: none)")
    add_verbose_option(p)
    p.set_defaults(func=cmd_diagnose)


def cmd_diagnose(args) -> int:
    """``stemfast diagnose``: the rotation diagnostics of a model on micrographs."""
    return guarded(_cmd_diagnose, args)


def _cmd_diagnose(args) -> int:
    from .. import io
    from ..diagnostics import format_summary, invariance_ratio, micrograph_pair_errors, rotated_copy_errors
    from ..config import PipelineConfig
    from ..model import RVAE
    from ..patchextent import plan_for
    from ..pipeline import prepare

    model = RVAE.load(args.model, map_location="cpu")
    has_stn = model.config.model == "rvae"  # the plain VAE baseline: only the invariance ratio applies
    period_model = 360.0 / model.config.rotation_symmetry
    results: dict = {}
    for path in args.images:
        img = io.read(path).data
        if img.ndim == 3:
            img = img[0]
        prep = prepare(np.asarray(img, np.float32), patch_size=plan_for(model, PipelineConfig()).fixed_px)
        patches = prep.patches[~prep.edge]
        if args.max_sites is not None and len(patches) > args.max_sites:
            patches = patches[np.sort(np.random.default_rng(args.seed).choice(len(patches), args.max_sites,
                                                                               replace=False))]
        r = {}
        sub = patches[np.sort(np.random.default_rng(args.seed).choice(len(patches), min(150, len(patches)),
                                                                       replace=False))]
        r["invariance_ratio"] = invariance_ratio(model, sub, seed=args.seed)
        print(f"{path}: {len(patches)} sites ({model.config.model})")
        print(f"  latent spread across 12 rotations / across {len(sub)} sites: {r['invariance_ratio']:.4f}")
        if not has_stn:
            print("  (plain VAE: no STN, so no canonicalisation errors)")
            results[path] = r
            continue
        s = rotated_copy_errors(model, patches, seed=args.seed).summary()
        r["patch_warp"] = s
        print(f"  patch warp, random angles      : {format_summary(s, period_model)}")
        for a in args.angles:
            res, info = micrograph_pair_errors(model, img, a, max_sites=args.max_sites, seed=args.seed)
            s = res.summary()
            s.update({k: v for k, v in info.items() if k != "index"})
            r[f"micrograph_{a:g}"] = s
            kind = "exact rot90" if abs(a / 90 - round(a / 90)) < 1e-9 else "spline"
            print(f"  micrograph {a:6.1f} deg ({kind:11s}): {format_summary(s, period_model)}  "
                  f"[{info['n_matched']}/{info['n_sites']} matched, position rms {info['position_rms_px']:.3f} px]")
        results[path] = r
    print(f"(rel_error and angle_error modulo 60 deg; the model's own period is {period_model:g} deg)")
    if args.json:
        from ..atomic import write_json

        write_json(args.json, results, indent=1)  # atomic: a reader never sees half a file
    return EXIT_OK
