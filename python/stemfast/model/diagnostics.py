"""Deprecated: the model diagnostics are :mod:`stemfast.diagnostics` (they run the pipeline, which
the model package does not import); the command is ``python -m stemfast diagnose``."""
from __future__ import annotations

import sys
import warnings

from ..diagnostics import (PairErrors, invariance_ratio, micrograph_pair_errors, pair_errors,  # noqa: F401
                           rotated_copy_errors)

warnings.warn("stemfast.model.diagnostics is deprecated; use stemfast.diagnostics", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":  # pragma: no cover - the old command: python -m stemfast.model.diagnostics ...
    from ..cli import main

    raise SystemExit(main(["diagnose", *sys.argv[1:]]))
