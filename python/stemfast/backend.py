"""Choice of compute backend for the kernels: ``cpp`` (compiled), ``numba`` or ``numpy`` (reference).

The default is the fastest available one; ``STEMFAST_BACKEND`` or the ``backend=`` argument of the
public functions overrides it. If the compiled extension is missing (e.g. a source checkout used
without ``pip install .``) the package still imports and falls back to Numba, logging once why.
"""
from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from types import ModuleType

__all__ = ["BACKENDS", "available_backends", "get_kernels", "resolve_backend", "core_import_error"]

log = logging.getLogger(__name__)

BACKENDS = ("cpp", "numba", "numpy")

_core_error: str | None = None


@lru_cache(maxsize=None)
def _load(name: str) -> ModuleType | None:
    global _core_error
    try:
        if name == "cpp":
            return importlib.import_module("stemfast._core")
        if name == "numba":
            return importlib.import_module("stemfast._kernels.numba_impl")
        if name == "numpy":
            return importlib.import_module("stemfast._kernels.numpy_ref")
    except ImportError as exc:  # pragma: no cover - depends on the install
        if name == "cpp":
            _core_error = (
                f"the compiled extension stemfast._core is not available ({exc}); "
                "build it with `pip install .` from the source tree. Falling back to Numba/NumPy kernels."
            )
            log.warning(_core_error)
        else:
            log.warning("backend %r unavailable: %s", name, exc)
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def core_import_error() -> str | None:
    """The reason the compiled extension could not be imported, or None if it imports."""
    _load("cpp")
    return _core_error


def available_backends() -> list[str]:
    """Backends that import on this machine, fastest first."""
    return [b for b in BACKENDS if _load(b) is not None]


def resolve_backend(backend: str | None = None) -> str:
    """Return the backend to use: the argument, else ``$STEMFAST_BACKEND``, else the fastest available."""
    name = backend or os.environ.get("STEMFAST_BACKEND") or None
    if name is None:
        avail = available_backends()
        if not avail:  # pragma: no cover - numpy always imports
            raise RuntimeError("no stemfast kernel backend is available")
        return avail[0]
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if _load(name) is None:
        raise RuntimeError(
            f"backend {name!r} is not available on this machine"
            + (f": {_core_error}" if name == "cpp" and _core_error else "")
        )
    return name


def get_kernels(backend: str | None = None) -> ModuleType:
    """The kernel module for ``backend`` (see :mod:`stemfast._kernels` for the contract)."""
    mod = _load(resolve_backend(backend))
    assert mod is not None
    return mod
