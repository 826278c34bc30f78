"""stemfast.heap: freed large arrays stay with the process (glibc), and only where asked.

Each check runs in a fresh interpreter: the setting is process-wide, and the test process keeps
the system's malloc."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PY = str(Path(__file__).resolve().parents[1] / "python")

# the resident size after a 256 MiB array was made, touched and freed, in MiB over the size before it
_PROBE = """
import os, numpy as np
from stemfast.heap import reuse_freed_memory
ok = reuse_freed_memory()
assert reuse_freed_memory() is ok  # idempotent
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
before = rss()
a = np.ones(2**25)  # 256 MiB, every page touched
del a
print(ok, round(rss() - before))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the heap setting exists for glibc only")


def _probe(**env) -> tuple[bool, int]:
    e = {k: v for k, v in os.environ.items() if k != "STEMFAST_SYSTEM_MALLOC"}
    e.update(PYTHONPATH=PY + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, kept = out.stdout.split()
    return ok == "True", int(kept)


@glibc_only
def test_freed_large_arrays_stay_with_the_process():
    ok, kept = _probe()
    assert ok
    assert kept >= 200  # the 256 MiB are kept for the next array (system malloc: handed back, ~0)


@glibc_only
def test_the_environment_can_leave_malloc_as_it_is():
    ok, kept = _probe(STEMFAST_SYSTEM_MALLOC="1")
    assert not ok
    assert kept < 50


def test_importing_stemfast_leaves_malloc_as_it_is():
    """Only the command line and the Dask tasks call reuse_freed_memory; the package import does not."""
    code = ("import stemfast, stemfast.pipeline, stemfast.analysis, stemfast.sites; "
            "from stemfast.heap import reuse_freed_memory; print(reuse_freed_memory.cache_info().currsize)")
    e = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
