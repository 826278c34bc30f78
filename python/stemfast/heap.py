"""How the process heap treats the pipeline's large arrays (glibc, i.e. Linux, only).

By default glibc's ``malloc`` gives every block above its mmap threshold (at most 32 MiB) pages of
its own, fresh from the kernel, and hands them back on ``free``. The pipeline makes and drops
arrays of the image's size all the time (a 4096^2 image: 64 MiB in float32, 128 MiB as a spectrum),
so each new one is faulted in page by page and zeroed by the kernel first. On the project's 2-core
machines the kernel's share of ``bench --size 4096`` was 4.5-9.7 s of CPU time for a pipeline of
6.7-7.8 s wall.

:func:`reuse_freed_memory` raises the mmap threshold to :data:`MMAP_THRESHOLD` and the trim threshold
to :data:`TRIM_THRESHOLD`: large blocks then come from the heap and, once freed, stay with the process
for the next array. Measured on ``bench --size 4096`` (the same image, 3 runs in one process): kernel
time 0.4-1.1 s, the pipeline 5.1-5.35 s; the peak resident memory 537-564 MiB against 450-498 MiB
(freed blocks are kept, and a block may not fit a hole an earlier one left). Blocks of
:data:`MMAP_THRESHOLD` and more (a 16k^2 float32 image) still get pages of their own.

The command line (``python -m stemfast ...``) and the Dask workers' tasks call it; a program that
uses the Python API on many or large images may call it too. It changes the whole process, so
importing stemfast never does. ``STEMFAST_SYSTEM_MALLOC=1`` in the environment leaves ``malloc``
as it is. Elsewhere than glibc it does nothing.

:func:`hand_back_freed` gives the kernel back what is freed and kept at that moment (glibc's
``malloc_trim``). The batch calls it after reading an exported picture: Pillow's buffer and the
colour array (0.8 GB each for a 16k x 16k RGB export) are freed once the picture is grey; kept, they
held the process at 3.3 GB instead of 1.4 GB from the read to the lattice search.
"""
from __future__ import annotations

import functools
import logging
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "reuse_freed_memory", "hand_back_freed"]

log = logging.getLogger("stemfast.heap")

#: blocks under this size (bytes) come from the heap (glibc's ``M_MMAP_THRESHOLD``)
MMAP_THRESHOLD = 1 << 30
#: freed heap memory is handed back to the kernel only beyond this much at the top (``M_TRIM_THRESHOLD``)
TRIM_THRESHOLD = (1 << 31) - 1
#: set (to anything but "" or "0") to leave ``malloc`` as it is
ENV_SYSTEM_MALLOC = "STEMFAST_SYSTEM_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
#: whether :func:`reuse_freed_memory` set malloc to keep freed memory in this process
_keeping = False


@functools.cache
def reuse_freed_memory() -> bool:
    """Let freed large arrays be reused by the process instead of going back to the kernel (module
    docs). Idempotent; True when the setting holds (now or from an earlier call), False where it
    cannot be made (not glibc, ``STEMFAST_SYSTEM_MALLOC`` set, ``mallopt`` refused).

    Examples
    --------
    >>> from stemfast.heap import reuse_freed_memory
    >>> reuse_freed_memory() in (True, False)
    True
    """
    if os.environ.get(ENV_SYSTEM_MALLOC, "") not in ("", "0"):
        log.debug("heap: %s is set; malloc left as it is", ENV_SYSTEM_MALLOC)
        return False
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    except (OSError, AttributeError) as e:  # no such library or symbol: nothing to set
        log.debug("heap: mallopt not available (%s)", e)
        return False
    log.debug("heap: large blocks from the heap, freed memory kept (mallopt %s)", "accepted" if ok else "refused")
    global _keeping
    _keeping = ok
    return ok


def hand_back_freed() -> bool:
    """Give the kernel back the freed memory the process keeps (glibc's ``malloc_trim(0)``) where
    :func:`reuse_freed_memory` holds; True when it did.

    Examples
    --------
    >>> from stemfast.heap import hand_back_freed
    >>> hand_back_freed() in (True, False)
    True
    """
    if not _keeping:  # malloc as it was: it hands large blocks back itself
        return False
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError) as e:  # pragma: no cover - reuse_freed_memory found glibc
        log.debug("heap: malloc_trim not available (%s)", e)
        return False
    return True
