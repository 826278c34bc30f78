"""The examples in the docstrings run and print what they say (numpydoc ``Examples`` sections).

Every module of the installed package is imported and its doctests are run, as
``pytest --doctest-modules`` would on the source tree (which holds no compiled extension when the
package is installed from a wheel). A module that needs an optional dependency that is missing is
skipped with the reason.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import stemfast

MODULES = sorted(m.name for m in pkgutil.walk_packages(stemfast.__path__, "stemfast.")
                 if not m.name.endswith("__main__"))


def test_the_package_has_modules_to_check():
    assert {"stemfast.bandpass", "stemfast.lattice", "stemfast.analysis", "stemfast.scanlines"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:  # an optional engine (e.g. dask) that is not installed
        pytest.skip(f"{name} needs {exc.name or exc}")
    tests = doctest.DocTestFinder(exclude_empty=True).find(mod, name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for t in tests:
        if t.examples:
            out: list[str] = []
            res = runner.run(t, out=out.append)
            if res.failed:
                failures.append("".join(out))
    assert not failures, "\n".join(failures)
