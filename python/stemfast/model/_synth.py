"""Deprecated: the synthetic site patches are :mod:`stemfast.synthetic.patches`."""
from __future__ import annotations

import warnings

from ..synthetic.patches import SITE_TYPES, render_site_patches  # noqa: F401

warnings.warn("stemfast.model._synth is deprecated; use stemfast.synthetic", DeprecationWarning, stacklevel=2)
