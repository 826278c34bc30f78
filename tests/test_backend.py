"""Backend selection, and the package without its compiled extension."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import stemfast
from stemfast.backend import BACKENDS, available_backends, resolve_backend

PYTHON_DIR = str(Path(stemfast.__file__).resolve().parent.parent)

_NO_CORE = r"""
import sys, logging, warnings
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
sys.modules["stemfast._core"] = None  # the extension cannot be imported (not built / broken)
import numpy as np
import stemfast
from stemfast.backend import available_backends, core_import_error, resolve_backend
from stemfast.synth import make_lattice
print("BACKENDS", ",".join(available_backends()))
print("REASON", core_import_error())
try:
    resolve_backend("cpp")
except RuntimeError as exc:
    print("CPP_ERROR", exc)
img, xy = make_lattice((96, 96), spacing=10.0, noise=0.05, seed=1)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t = stemfast.find_sites(img)
print("SITES", len(t))
"""


def test_package_works_and_says_why_without_the_compiled_extension():
    env = {k: v for k, v in os.environ.items() if k != "STEMFAST_BACKEND"}
    env["PYTHONPATH"] = PYTHON_DIR
    r = subprocess.run([sys.executable, "-c", _NO_CORE], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert "cpp" not in out["BACKENDS"].split(",") and "numpy" in out["BACKENDS"].split(",")
    assert "stemfast._core" in out["REASON"] and "pip install" in out["REASON"]
    assert "not available" in out["CPP_ERROR"] and "pip install" in out["CPP_ERROR"]
    assert int(out["SITES"]) > 50  # the pipeline runs on the remaining backends
    assert "stemfast._core is not available" in r.stderr  # logged once, at the first use


def test_resolve_backend_names_and_errors(monkeypatch):
    assert resolve_backend() == available_backends()[0]
    for b in available_backends():
        assert resolve_backend(b.upper()) == b
    monkeypatch.setenv("STEMFAST_BACKEND", "numpy")
    assert resolve_backend() == "numpy"
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        resolve_backend("fortran")
    assert set(available_backends()) <= set(BACKENDS)
