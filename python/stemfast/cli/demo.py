"""``stemfast demo``: write a small synthetic example folder and analyse it with the batch pipeline."""
from __future__ import annotations

import sys
from pathlib import Path

from .options import EXIT_ERROR, EXIT_OK, AtLeast, add_backend_option, add_verbose_option, guarded, synthetic_min_side

__all__ = ["add", "cmd_demo"]


def add(sub) -> None:
    """Register ``stemfast demo``."""
    p = sub.add_parser("demo", help="write a small synthetic example folder and analyse it",
                       description="Generate small synthetic MoS2 micrographs with ground truth "
                                   "(stemfast.synthetic) into OUT/data and run the batch analysis on them "
                                   "into OUT/results.")
    p.add_argument("-o", "--output", default="stemfast-demo", help="demo folder (default: ./stemfast-demo)")
    p.add_argument("--size", type=AtLeast(synthetic_min_side), default=512,
                   help="image size in px, %(type)s (default 512)")
    p.add_argument("--n-images", type=AtLeast(1), default=2, help="number of images, %(type)s (default 2)")
    p.add_argument("--data-only", action="store_true", help="only write the example data")
    add_verbose_option(p)
    add_backend_option(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    """``stemfast demo``: the example data, then :func:`stemfast.batch.run_batch` on it."""
    return guarded(_cmd_demo, args)


def _cmd_demo(args) -> int:
    from ..batch import run_batch
    from ..config import load_config
    from ..synthetic import save_example
    from .batch import print_report

    config = load_config(None, {"sites.backend": args.backend} if args.backend else None)  # before any file
    out = Path(args.output)
    data = out / "data"
    paths = save_example(data, n_images=args.n_images, size=args.size)
    print(f"wrote {len(paths)} example micrographs (+ ground truth) to {data}")
    if args.data_only:
        return EXIT_OK
    report = run_batch([data], out / "results", config=config)
    if not report.results:
        print(f"error: no micrographs found in {data}", file=sys.stderr)
        return EXIT_ERROR
    print_report(report)
    return report.exit_code
