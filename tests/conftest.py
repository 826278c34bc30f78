"""Fixtures shared by the tests."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script(name)``: the script ``benchmarks/NAME.py`` loaded as a module (the
    benchmarks are scripts, not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def stemfast_log(caplog):
    """caplog that also sees the ``stemfast`` logger after a CLI run in this process set it not to
    propagate (logutil.setup_logging)."""
    lg = logging.getLogger("stemfast")
    level = lg.level
    lg.addHandler(caplog.handler)
    lg.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        lg.removeHandler(caplog.handler)
        lg.setLevel(level)
