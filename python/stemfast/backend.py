"""Choice of compute backend for the kernels: ``cpp`` (compiled), ``numba`` or ``numpy`` (reference).

The default is the fastest available one; ``STEMFAST_BACKEND`` (:data:`BACKEND_ENV`, read by
:func:`env_backend`) or the ``backend=`` argument of the public functions overrides it. If the
compiled extension is missing (e.g. a source checkout used without ``pip install .``) or older than
the Python code (a kernel of the contract missing) the package still imports and falls back to
Numba, logging once why.

The compiled backends run their kernels on several threads (the core count by default);
:func:`kernel_threads` / :func:`set_kernel_threads` set that number for both (results do not depend
on it), e.g. one thread per process when a batch runs several processes, or to time a kernel
against a single-threaded reference like with like (the benchmarks do).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from numbers import Integral
from types import ModuleType

from .errors import SettingsError

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "env_backend",
    "available_backends",
    "check_backend",
    "get_kernels",
    "resolve_backend",
    "core_import_error",
    "backend_used",
    "get_kernel_threads",
    "set_kernel_threads",
    "kernel_threads",
    "kernel_thread_count",
    "one_blas_thread",
]

log = logging.getLogger(__name__)

BACKENDS = ("cpp", "numba", "numpy")

#: The environment variable naming the backend where neither a ``backend=`` argument nor the setting
#: ``sites.backend`` does (:func:`env_backend`).
BACKEND_ENV = "STEMFAST_BACKEND"

_core_error: str | None = None
_fallback_logged = False


@lru_cache(maxsize=None)
def _load(name: str) -> ModuleType | None:
    global _core_error
    try:
        if name == "cpp":
            core = importlib.import_module("stemfast._core")
            contract = importlib.import_module("stemfast._kernels.numpy_ref").__all__
            missing = [f for f in contract if not hasattr(core, f)]
            if missing:  # an extension built from older sources than the Python package
                raise ImportError(f"it is older than the Python code: no {', '.join(missing)}")
            from ._kernels import CONTRACT_VERSION

            built = getattr(core, "CONTRACT_VERSION", 1)
            if built != CONTRACT_VERSION:  # same names, other signatures: it would fail at its first call
                raise ImportError(f"it was built for kernel contract {built}, the Python code needs "
                                  f"{CONTRACT_VERSION} ({'older' if built < CONTRACT_VERSION else 'newer'} sources)")
            return core
        if name == "numba":
            return importlib.import_module("stemfast._kernels.numba_impl")
        if name == "numpy":
            return importlib.import_module("stemfast._kernels.numpy_ref")
    except ImportError as exc:  # pragma: no cover - depends on the install
        if name == "cpp":  # logged where the kernels fall back (resolve_backend), not where cpp was asked for
            _core_error = (
                f"the compiled extension stemfast._core is not available ({exc}); "
                "build it with `pip install .` (or rebuild it) from the source tree"
            )
        else:
            log.warning("backend %r unavailable: %s", name, exc)
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


def core_import_error() -> str | None:
    """The reason the compiled extension could not be imported, or None if it imports."""
    _load("cpp")
    return _core_error


def env_backend() -> str | None:
    """The backend ``$STEMFAST_BACKEND`` (:data:`BACKEND_ENV`) names: surrounding whitespace stripped,
    any case; None where it is unset or blank.

    Raises
    ------
    stemfast.errors.SettingsError
        For any other value, naming the variable and its value (:func:`stemfast.config.load_config`
        checks it with the other settings, so the command line refuses it with exit status 2 before
        any work).

    Examples
    --------
    >>> import os
    >>> os.environ[BACKEND_ENV] = " NumPy "
    >>> env_backend()
    'numpy'
    >>> os.environ[BACKEND_ENV] = "foo"
    >>> env_backend()
    Traceback (most recent call last):
    ...
    stemfast.errors.SettingsError: STEMFAST_BACKEND='foo' is not a kernel backend: set it to one of cpp, ...
    >>> del os.environ[BACKEND_ENV]
    """
    raw = os.environ.get(BACKEND_ENV)
    name = (raw or "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise SettingsError(f"{BACKEND_ENV}={raw!r} is not a kernel backend: set it to one of {', '.join(BACKENDS)}, "
                            "or unset it (the fastest available)")
    return name


def backend_used(backend: str | None = None) -> dict:
    """What runs the kernels in this process for the setting ``backend`` (None: the default), as a run
    records it (each frame's record; ``summary.json`` ``backend`` and ``core_import_error``): the
    backend's name and why the compiled extension could not be imported (None where it imports).

    Examples
    --------
    >>> backend_used("numpy")["backend"]
    'numpy'
    """
    return {"backend": resolve_backend(backend), "core_import_error": core_import_error()}


def available_backends() -> list[str]:
    """Backends that import on this machine, fastest first."""
    return [b for b in BACKENDS if _load(b) is not None]


def resolve_backend(backend: str | None = None) -> str:
    """Return the backend to use: the argument, else ``$STEMFAST_BACKEND`` (:func:`env_backend`), else the
    fastest available (the first fallback from the compiled extension is logged, once, with its reason)."""
    global _fallback_logged
    name = backend or env_backend()
    if name is None:
        # the first that imports, without importing the slower ones (Numba alone takes ~0.5-1 s)
        for b in BACKENDS:
            if _load(b) is not None:
                if b != "cpp" and _core_error and not _fallback_logged:
                    _fallback_logged = True
                    log.warning("%s. Falling back to %s kernels.", _core_error, "Numba" if b == "numba" else "NumPy")
                return b
        raise RuntimeError("no stemfast kernel backend is available")  # pragma: no cover - numpy always imports
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if _load(name) is None:
        raise RuntimeError(
            f"backend {name!r} is not available on this machine"
            + (f": {_core_error}" if name == "cpp" and _core_error else "")
        )
    return name


def check_backend(backend: str | None = None) -> None:
    """Refuse, before any work, a backend asked for by name (``backend``: the ``sites.backend`` setting,
    else ``$STEMFAST_BACKEND``) that does not import on this machine: a :class:`SettingsError` naming it
    and why (``cpp`` without the compiled extension). None of either: nothing to check, the fastest
    available runs."""
    name = backend or env_backend()
    if name is None or name.lower() not in BACKENDS:
        return  # (an unknown name is the settings' own check)
    try:
        resolve_backend(name)  # the one place that tells whether a named backend imports, and why not
    except RuntimeError as exc:
        raise SettingsError(f"sites.backend / --backend / {BACKEND_ENV} asks for the {name.lower()} kernels: {exc}. "
                            f"Leave the backend unset (the fastest available) or choose one of "
                            f"{', '.join(available_backends())}") from None


def get_kernels(backend: str | None = None) -> ModuleType:
    """The kernel module for ``backend`` (see :mod:`stemfast._kernels` for the contract)."""
    mod = _load(resolve_backend(backend))
    assert mod is not None
    return mod


# --------------------------------------------------------------------------------------------------
# threads of the compiled kernels
# --------------------------------------------------------------------------------------------------
def _check_threads(n) -> int:
    """0 for None (the default), else ``n`` as an int >= 1."""
    if n is None:
        return 0
    if not isinstance(n, Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be an integer >= 1 or None (the default), got {n!r}")
    return int(n)


def _numba_pool_size() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def get_kernel_threads() -> dict[str, int]:
    """Threads each compiled backend uses now, e.g. ``{"cpp": 2, "numba": 2}`` (available backends only).

    Examples
    --------
    >>> from stemfast.backend import get_kernel_threads, kernel_threads
    >>> with kernel_threads(1):
    ...     set(get_kernel_threads().values())
    {1}
    """
    out: dict[str, int] = {}
    core = _load("cpp")
    if core is not None:
        out["cpp"] = int(core.get_num_threads())
    if _load("numba") is not None:
        import numba

        out["numba"] = int(numba.get_num_threads())
    return out


def kernel_thread_count() -> int:
    """Threads a compiled kernel call uses now: the C++ setting, else Numba's (when only Numba
    imports), else 1. Code that parallelises through a library (e.g. cKDTree ``workers``) follows it,
    so :func:`kernel_threads` bounds it too.

    Examples
    --------
    >>> from stemfast.backend import kernel_thread_count, kernel_threads
    >>> with kernel_threads(1):
    ...     kernel_thread_count()
    1
    """
    core = _load("cpp")
    if core is not None:
        return max(1, int(core.get_num_threads()))
    if _load("numba") is not None:
        import numba

        return max(1, int(numba.get_num_threads()))
    return 1


def set_kernel_threads(n: int | None) -> dict[str, int]:
    """Set the threads of the compiled kernels (C++ and Numba); return the previous setting.

    Parameters
    ----------
    n : int >= 1 or None
        Threads per kernel call; None restores the default (the core count: C++
        ``hardware_concurrency``, Numba ``NUMBA_NUM_THREADS``). Numba cannot grow its pool beyond
        ``NUMBA_NUM_THREADS``, so larger ``n`` are capped there for Numba.

    Returns
    -------
    dict
        The setting before the call, as :func:`get_kernel_threads` returns it (what
        :func:`kernel_threads` restores).

    Notes
    -----
    The C++ setting is process-wide; Numba's applies to kernels called from the calling thread
    (Numba keeps it per thread). Kernel results do not depend on the number of threads.

    Examples
    --------
    >>> from stemfast.backend import get_kernel_threads, set_kernel_threads
    >>> before = set_kernel_threads(1)
    >>> get_kernel_threads()["numba"]
    1
    >>> _ = set_kernel_threads(None)
    """
    k = _check_threads(n)
    before = get_kernel_threads()
    core = _load("cpp")
    if core is not None:
        core.set_num_threads(k)
    if _load("numba") is not None:
        import numba

        pool = _numba_pool_size()
        numba.set_num_threads(pool if k == 0 else min(k, pool))
    return before


@contextmanager
def kernel_threads(n: int | None) -> Iterator[dict[str, int]]:
    """Run the compiled kernels on ``n`` threads inside the ``with`` block (see :func:`set_kernel_threads`).

    Restores the previous per-backend setting on exit, also after an exception; blocks nest.
    Yields the setting in effect inside the block.

    Examples
    --------
    >>> import numpy as np
    >>> from stemfast.backend import get_kernels, kernel_threads
    >>> img = np.zeros((32, 32), np.float32); img[10, 12] = 1.0
    >>> with kernel_threads(1):
    ...     get_kernels().local_maxima(img, 3.0, 0.5, 0).tolist()
    [[12, 10]]
    """
    before = set_kernel_threads(n)
    try:
        yield get_kernel_threads()
    finally:
        core = _load("cpp")
        if core is not None and "cpp" in before:
            core.set_num_threads(before["cpp"])
        if "numba" in before:
            import numba

            numba.set_num_threads(before["numba"])


_blas_lock = threading.Lock()
_blas_depth = 0
_blas_limits = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread (OpenBLAS, MKL, ... as NumPy and SciPy load them) inside the ``with`` block or the
    decorated function; the previous setting afterwards.

    The pipeline's stages (:func:`stemfast.sites.find_sites` -- so ``prepare`` and the ``sites``
    command -- and :func:`stemfast.pipeline.analyze`: the site finding, the encoding and the
    analysis) run under it: their parallelism is the compiled
    kernels' own threads, and their BLAS calls are small (``N x 4`` products, 2 x 2 solves), so a
    second BLAS thread does no work worth having -- after each call it spins, waiting for the next,
    on the core the kernels' second thread needs (~0.5 s of CPU on a 4096^2 image on 2 cores).
    Results do not depend on it. torch's own thread pool is not BLAS and is left alone. Blocks
    entered by several threads at once (a Dask worker with several threads) share one setting: the
    first sets it, the last to leave restores the previous one.

    Examples
    --------
    >>> import numpy as np
    >>> from stemfast.backend import one_blas_thread
    >>> with one_blas_thread():
    ...     float((np.ones((300, 4)) @ np.ones(4)).sum())
    1200.0
    """
    global _blas_depth, _blas_limits
    with _blas_lock:  # BLAS settings are process-wide: set by the first block entered, restored by the last left
        if _blas_depth == 0:
            from threadpoolctl import threadpool_limits

            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0 and _blas_limits is not None:
                _blas_limits.restore_original_limits()
                _blas_limits = None
