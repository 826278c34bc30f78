"""Deprecated: the shared command-line options are :mod:`stemfast.cli.options`."""
from __future__ import annotations

import warnings

from .cli.options import *  # noqa: F401,F403
from .cli.options import __all__  # noqa: F401

warnings.warn("stemfast.cli_options is deprecated; use stemfast.cli.options", DeprecationWarning, stacklevel=2)
