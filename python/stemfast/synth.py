"""Deprecated: the synthetic micrographs are :mod:`stemfast.synthetic.image` (``stemfast.synthetic``).

Every name of that module is reachable here, reads and writes alike: setting ``synth.Z_MO``
sets ``stemfast.synthetic.image.Z_MO``, which :func:`make_mos2` reads.
"""
from __future__ import annotations

import sys
import types
import warnings

from .synthetic import image as _image

warnings.warn("stemfast.synth is deprecated; use stemfast.synthetic (make_mos2, ...)", DeprecationWarning,
              stacklevel=2)


class _Forward(types.ModuleType):
    def __getattr__(self, name):
        return getattr(_image, name)

    def __setattr__(self, name, value):
        setattr(_image, name, value)

    def __dir__(self):
        return dir(_image)


sys.modules[__name__].__class__ = _Forward
