"""The direction of imports inside stemfast (docs/ARCHITECTURE.md), checked on the source with ``ast``.

Every ``import`` counts, also those inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stemfast

PKG = Path(stemfast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, *, only_from: bool = False) -> set[str]:
    """The stemfast modules ``path`` imports (``from X import name`` counts as X and X.name); with
    ``only_from`` just the X of every ``from X import ...``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "stemfast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "stemfast":
                continue
            out.add(mod)
            if not only_from:
                out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


GRAPH = _graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_import_of_a_stemfast_module_resolves():
    """Lazy imports fail only when run: a moved module must not leave a ``from .old import x`` behind."""
    modules = {_module_name(p) for p in PKG.rglob("*.py")} | {"stemfast._core"}
    bad = {_module_name(p): sorted(m for m in _imports(p, only_from=True) if m not in modules)
           for p in PKG.rglob("*.py")}
    assert {m: b for m, b in bad.items() if b} == {}


def test_the_graph_sees_the_packages():
    assert "stemfast.batch.runner" in GRAPH and "stemfast.cli.options" in GRAPH and "stemfast.sites" in GRAPH
    assert "stemfast.batch.tasks" in GRAPH["stemfast.batch.dask"]


#: Old import paths kept as thin re-exports (with a DeprecationWarning), and what they may import.
SHIMS = {"stemfast.cli_options": {"stemfast.cli.options"}, "stemfast.model.diagnostics": {"stemfast.cli"}}


@pytest.mark.parametrize("upper", ["stemfast.batch", "stemfast.cli"])
def test_core_modules_never_import_batch_or_cli(upper):
    bad = {m: sorted(i for i in deps if _in(i, upper) and i not in SHIMS.get(m, ())) for m, deps in GRAPH.items()
           if not (_in(m, "stemfast.batch") or _in(m, "stemfast.cli") or m == "stemfast.__main__")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_batch_never_imports_cli():
    bad = {m: sorted(i for i in deps if _in(i, "stemfast.cli")) for m, deps in GRAPH.items()
           if _in(m, "stemfast.batch")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_only_the_batch_runner_and_the_command_line_import_the_dask_runner():
    users = {m for m, deps in GRAPH.items() if "stemfast.batch.dask" in deps}
    assert users <= {"stemfast.batch.runner"} | {m for m in GRAPH if _in(m, "stemfast.cli")}, users


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _module_cycles() -> list[list[str]]:
    """A package's ``__init__`` re-exports its modules, so edges into a package itself are left out."""
    packages = {m for m in GRAPH if (PKG.parent / m.replace(".", "/") / "__init__.py").exists()}
    g = {m: {d for d in deps if d not in packages} for m, deps in GRAPH.items() if m not in packages}
    return _cycles(g)


def test_no_import_cycles_between_modules():
    assert _module_cycles() == []


def test_the_model_package_never_imports_the_pipeline():
    """The model package sits below the pipeline: its input-contract check cuts patches with
    ``stemfast.frontend.prepare``, and ``pipeline.run_image`` loads the shipped model."""
    bad = {m: sorted(i for i in deps if _in(i, "stemfast.pipeline")) for m, deps in GRAPH.items()
           if _in(m, "stemfast.model")}
    assert {m: d for m, d in bad.items() if d} == {}


#: the longest a function may be (lines of code after its docstring) outside the compiled/Numba kernels
MAX_FUNCTION_LINES = 80


def _long_functions(limit: int) -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        if "_kernels" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
            start = first.end_lineno + 1 if doc and len(node.body) > 1 else first.lineno
            n = node.end_lineno - start + 1
            if n > limit:
                out.append((_module_name(path), node.name, n))
    return out


def test_no_function_is_longer_than_the_limit():
    assert _long_functions(MAX_FUNCTION_LINES) == []
    # the check sees functions at all: a lower limit finds some
    assert _long_functions(20)


ARCHITECTURE_MD = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
#: packages the module map names as a whole (their modules are the package's own business)
MAPPED_AS_PACKAGE = ("_kernels", "model", "synthetic")


def _map_rows() -> list[str]:
    """The first cells of docs/ARCHITECTURE.md's module-map table."""
    text = ARCHITECTURE_MD.read_text(encoding="utf-8").split("## Module map", 1)[1]
    return [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]


def _unmapped_modules() -> list[str]:
    """Modules of the source tree (``cli/x.py``, ``batch/x.py``, ``x.py``) that no row of the map names."""
    named = " ".join(_map_rows())
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] in MAPPED_AS_PACKAGE:
            if f"`{rel.parts[0]}/`" not in named:
                out.append(f"{rel.parts[0]}/")
            continue
        if rel.name in ("__main__.py", "__init__.py"):  # a package's __init__: its package's rows
            continue
        full, short = rel.as_posix(), rel.name
        # a row lists a package's modules after its first one by their file name alone
        if f"`{full}`" not in named and not (len(rel.parts) > 1 and f"`{short}`" in named):
            out.append(full)
    return sorted(set(out))


def test_the_module_map_names_every_module():
    """docs/ARCHITECTURE.md's module map is the engineer's index: a module missing from it is one
    nobody finds (round 45: colour, detectors, limits, nion, scanlines, vacuum, velox, wobble and the
    deprecated cli_options, synth and synth_series were not in it)."""
    assert _map_rows()  # the table is found
    assert _unmapped_modules() == []
