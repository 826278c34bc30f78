"""Deprecated: the synthetic time series are :mod:`stemfast.synthetic.series`."""
from __future__ import annotations

import warnings

from .synthetic.series import *  # noqa: F401,F403
from .synthetic.series import __all__  # noqa: F401

warnings.warn("stemfast.synth_series is deprecated; use stemfast.synthetic", DeprecationWarning, stacklevel=2)
