"""Backend selection, and the package without its compiled extension."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import stemfast
from stemfast.backend import (BACKENDS, available_backends, get_kernel_threads, get_kernels, kernel_threads,
                              resolve_backend, set_kernel_threads)
from stemfast.synthetic import make_lattice

PYTHON_DIR = str(Path(stemfast.__file__).resolve().parent.parent)

_NO_CORE = r"""
import sys, logging, warnings
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
sys.modules["stemfast._core"] = None  # the extension cannot be imported (not built / broken)
import numpy as np
import stemfast
from stemfast.backend import available_backends, core_import_error, resolve_backend
from stemfast.synthetic import make_lattice
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
from stemfast.analysis import neighbourhood_mean  # the analysis kernels fall back too
from stemfast.references import local_references
xy = np.column_stack([np.asarray(t["x"], float), np.asarray(t["y"], float)])
refs = local_references(xy, np.broadcast_to(np.eye(2) * 10.0, (len(xy), 2, 2)), np.ones(len(xy)), n_neighbors=20)
print("REFS", int(refs.count.sum()), neighbourhood_mean(xy, np.ones(len(xy)), 9).shape[0])
"""


def _run_script(code: str):
    """Run ``code`` in a fresh interpreter on this checkout (no STEMFAST_BACKEND); it must succeed.
    Returns the process and its ``KEY value`` output lines as a dict."""
    env = {k: v for k, v in os.environ.items() if k != "STEMFAST_BACKEND"}
    env["PYTHONPATH"] = PYTHON_DIR
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r, dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def test_package_works_and_says_why_without_the_compiled_extension():
    r, out = _run_script(_NO_CORE)
    assert "cpp" not in out["BACKENDS"].split(",") and "numpy" in out["BACKENDS"].split(",")
    assert "stemfast._core" in out["REASON"] and "pip install" in out["REASON"]
    assert "not available" in out["CPP_ERROR"] and "pip install" in out["CPP_ERROR"]
    assert int(out["SITES"]) > 50  # the pipeline runs on the remaining backends
    refs, n_mean = map(int, out["REFS"].split())
    assert refs > 0 and n_mean == int(out["SITES"])
    assert "stemfast._core is not available" in r.stderr  # logged once, at the first use
    # cpp asked for by name does not fall back: its error says so (it ended "Falling back to Numba/NumPy
    # kernels."), and the fallback is logged once, where the kernels did fall back
    assert "Falling back" not in out["CPP_ERROR"]
    assert r.stderr.count("Falling back to Numba kernels.") == 1


def test_stemfast_backend_is_stripped_and_a_bad_value_names_the_variable(monkeypatch):
    """``STEMFAST_BACKEND=foo`` said "unknown backend 'foo'" (no variable named) at the first kernel call,
    after the run had begun; ``' numba'`` was refused for its space. Now stripped, any case; another
    value is a SettingsError naming the variable and its value, raised with the other settings."""
    from stemfast.config import PipelineConfig, check_limits, load_config
    from stemfast.errors import SettingsError

    monkeypatch.setenv("STEMFAST_BACKEND", " NumPy\n")
    assert resolve_backend() == "numpy"
    monkeypatch.setenv("STEMFAST_BACKEND", "  ")  # blank: unset
    assert resolve_backend() == available_backends()[0]
    monkeypatch.setenv("STEMFAST_BACKEND", "foo")
    for check in (resolve_backend, lambda: load_config(None), lambda: load_config(None, {"sites.backend": "numpy"}),
                  lambda: check_limits(PipelineConfig())):
        with pytest.raises(SettingsError, match=r"^STEMFAST_BACKEND='foo' is not a kernel backend: set it to one "
                                                r"of cpp, numba, numpy, or unset it"):
            check()


@pytest.mark.parametrize("command", [
    ["analyze", "a.npy", "-o", "out"], ["analyze", "a.npy", "-o", "out", "--backend", "numpy"],
    ["batch", ".", "-o", "out"], ["sites", "a.npy", "-o", "out/s.csv"],
    ["demo", "-o", "out", "--size", "64", "--n-images", "1"]])
def test_a_bad_stemfast_backend_exits_2_before_any_output(command, tmp_path, monkeypatch, capsys):
    """The CLI exited 1 with "unknown backend 'foo'" and left an empty OUT (analyze) or the demo's data."""
    from stemfast.cli import main
    from stemfast.errors import EXIT_SETTINGS

    monkeypatch.chdir(tmp_path)
    np.save("a.npy", make_lattice((96, 96), spacing=10.0, noise=0.05, seed=1)[0])
    monkeypatch.setenv("STEMFAST_BACKEND", "foo")
    assert main(command) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "error: STEMFAST_BACKEND='foo' is not a kernel backend" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


_OLD_CORE = r"""
import sys, types
import stemfast._core as real
old = types.ModuleType("stemfast._core")  # an extension built before the last kernel was added
old.__dict__.update({k: v for k, v in vars(real).items() if k != "propagate_labels"})
sys.modules["stemfast._core"] = old
from stemfast.backend import available_backends, core_import_error
print("BACKENDS", ",".join(available_backends()))
print("REASON", core_import_error())
"""


@pytest.mark.skipif("cpp" not in available_backends(), reason="no compiled extension")
def test_an_extension_older_than_the_python_code_is_not_used():
    _, out = _run_script(_OLD_CORE)
    assert out["BACKENDS"].split(",") == ["numba", "numpy"]
    assert "older than the Python code: no propagate_labels" in out["REASON"] and "rebuild" in out["REASON"]


_STALE_CORE = r"""
import sys, types
import stemfast._core as real
old = types.ModuleType("stemfast._core")  # every name there, built for an older contract (signatures)
old.__dict__.update(vars(real))
old.CONTRACT_VERSION = real.CONTRACT_VERSION - 1
sys.modules["stemfast._core"] = old
from stemfast.backend import available_backends, core_import_error
print("BACKENDS", ",".join(available_backends()))
print("REASON", core_import_error())
"""


@pytest.mark.skipif("cpp" not in available_backends(), reason="no compiled extension")
def test_an_extension_built_for_another_kernel_contract_is_not_used():
    from stemfast._core import CONTRACT_VERSION as built
    from stemfast._kernels import CONTRACT_VERSION

    assert built == CONTRACT_VERSION  # this build matches its sources
    _, out = _run_script(_STALE_CORE)
    assert out["BACKENDS"].split(",") == ["numba", "numpy"]
    assert f"built for kernel contract {built - 1}" in out["REASON"] and "older sources" in out["REASON"]
    assert "rebuild" in out["REASON"]


def test_resolve_backend_names_and_errors(monkeypatch):
    assert resolve_backend() == available_backends()[0]
    for b in available_backends():
        assert resolve_backend(b.upper()) == b
    monkeypatch.setenv("STEMFAST_BACKEND", "numpy")
    assert resolve_backend() == "numpy"
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        resolve_backend("fortran")
    assert set(available_backends()) <= set(BACKENDS)


# --------------------------------------------------------------------------------------------------
# threads of the compiled kernels
# --------------------------------------------------------------------------------------------------
COMPILED = [b for b in ("cpp", "numba") if b in available_backends()]


def _kernel_calls():
    """name -> (kernel module -> result): every kernel of the contract on inputs big enough that the
    C++ ``parallel_for`` splits them over 3 threads (its smallest chunks: 2048 points / rows)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(3)
    img, _ = make_lattice((160, 200), spacing=9.0, noise=0.05, seed=4)
    img = np.ascontiguousarray(img, dtype=np.float32)
    spec = np.fft.rfft2(rng.normal(size=(6200, 12)).astype(np.float32)).astype(np.complex64)
    g = np.stack(np.meshgrid(np.arange(80.0), np.arange(90.0)), -1).reshape(-1, 2)
    pts = np.ascontiguousarray(g * 5.0 + rng.normal(0, 0.3, g.shape))  # 7200 points
    _, nb = cKDTree(pts).query(pts, k=9, distance_upper_bound=11.0)
    nb = np.ascontiguousarray(np.where(nb >= len(pts), -1, nb), dtype=np.int64)
    b0 = np.ascontiguousarray(np.broadcast_to(np.array([[5.0, 0.0], [0.0, 5.0]]), (len(pts), 2, 2)))
    sites = np.ascontiguousarray(np.stack([rng.uniform(-3, 203, 3000), rng.uniform(-3, 163, 3000)], 1))
    w = np.clip(1 - np.abs(np.arange(11)[None, :] - ((np.arange(8) + 0.5) * 11 / 8 - 0.5)[:, None]) / 1.375, 0, None)
    w = np.ascontiguousarray(w / w.sum(1, keepdims=True))

    def bandpass_apply(k):
        s = spec.copy()
        k.bandpass_apply(s, 6200, 12, 1.2, 9.0)
        return s

    def gather(k):
        out = np.empty((len(sites), 9, 9), np.float32)
        return k.gather_patches(img, sites, 9, -1.0, out), out

    def resampled(k):
        out = np.empty((len(sites), 8, 8), np.float32)
        return k.gather_resampled(img, sites, 11, w, -1.0, 0.5, 2.0, out), out

    order = np.ascontiguousarray(rng.permutation(len(pts)).astype(np.int64))
    inv = np.ascontiguousarray(np.broadcast_to(np.eye(2) / 5.0, (len(pts), 2, 2)))
    vals = np.ascontiguousarray(rng.normal(size=(len(pts), 3)))
    refable = rng.random(len(pts)) > 0.1
    rows = np.ascontiguousarray(rng.permutation(len(pts))[:5000].astype(np.int64))

    def propagate(k):  # a chain through the points in a shuffled order, parents first
        labels = np.full(len(pts), -1, np.int64)
        labels[order[0]] = 1
        k.propagate_labels(labels, order[1:].copy(), order[:-1].copy(), np.arange(len(pts) - 1, dtype=np.int64) % 3)
        return labels

    from stemfast.model import shipped
    from stemfast.model.engine import prepare_weights, state_arrays
    from stemfast.model.settings import RVAEConfig, background_rank

    mcfg = RVAEConfig.from_dict(shipped.manifest()["config"])
    mw = prepare_weights(state_arrays(shipped.ARRAYS_PATH), mcfg)
    px = rng.normal(size=(120, mcfg.input_size, mcfg.input_size)).astype(np.float32)
    bg_rank = background_rank(mcfg.input_size ** 2)

    def rvae(k):  # patches in chunks of at least 16: 120 patches reach 3 threads
        recon = np.empty_like(px)
        out = k.rvae_forward(px, mw["mask"], mw["stn"], mw["enc"], mw["dec"], mw["symmetry"], mw["symmetrize"],
                             mw["stn_downsample"], bg_rank, recon)
        return (*out, recon)

    nrow = 7000  # blocks of 2048 rows: 4 of them reach 3 threads
    csv_cols = [rng.normal(0, 100, nrow), rng.integers(-50, 50, nrow), rng.random(nrow) < 0.5, rng.integers(0, 2, nrow)]

    def csv(k):  # the text as bytes
        text = k.format_csv_rows(nrow, csv_cols, [1, 2, 3, 4], [[], [], [], ["none", "vacancy_S"]])
        return np.frombuffer(text.encode(), np.uint8)

    return {
        "bandpass_apply": bandpass_apply,
        "local_maxima": lambda k: k.local_maxima(img, 4.0, 0.2, 0),
        "refine_com": lambda k: k.refine_com(img, sites, 3.0),
        "refine_gauss": lambda k: k.refine_gauss(img, sites, 3.0, 1.5, 30),
        "fit_local_lattices": lambda k: k.fit_local_lattices(pts, nb, b0, 3, 0.25),
        "gather_patches": gather,
        "gather_resampled": resampled,
        "knn_within": lambda k: k.knn_within(pts, pts, 9, 11.0),
        "pairs_within": lambda k: k.pairs_within(pts, 7.0),
        "propagate_labels": propagate,
        "local_references": lambda k: k.local_references(pts, inv, vals[:, 0].copy(), refable, rows, 40, 0.25),
        "neighbour_mean": lambda k: k.neighbour_mean(pts, vals, 13),
        "rvae_forward": rvae,
        "format_csv_rows": csv,
    }


def _flat(res) -> list[np.ndarray]:
    return [np.asarray(r) for r in res] if isinstance(res, tuple) else [np.asarray(res)]


@pytest.mark.parametrize("backend", COMPILED)
def test_kernel_results_do_not_depend_on_the_threads(backend):
    kern = get_kernels(backend)
    calls = _kernel_calls()
    assert set(calls) == set(get_kernels("numpy").__all__) - {"disc_offsets"}  # every kernel of the contract
    for name, call in calls.items():
        with kernel_threads(1) as used:
            assert used[backend] == 1
            one = _flat(call(kern))
        for n in (2, 3):
            with kernel_threads(n):
                many = _flat(call(kern))
            assert len(many) == len(one)
            for a, b in zip(one, many):
                # bit-identical, NaNs in the same places
                np.testing.assert_array_equal(a, b, err_msg=f"{backend} {name}: 1 vs {n} threads")
        assert sum(a.size for a in one) > 100, name  # the inputs produced something to compare


@pytest.mark.parametrize("backend", available_backends())
def test_kernels_refuse_or_agree_on_odd_input(backend):
    """Edge cases where the backends once parted: a NaN point (a segfault in numba's grid, a silent
    result in C++: now a ValueError everywhere, through the public wrappers too), an index out of range
    (numba wrote out of bounds), a search radius 1e10 times the points' cell (numba's int64 floor
    saturated: no neighbours), a negative peak radius (C++ ran its 8-neighbour prepass on an empty
    disc), a NaN pixel in a patch (C++'s fast ReLU made it 0: the latents must be NaN as in numpy),
    and a reconstruction buffer of the wrong dtype (C++ filled a converted copy and dropped it)."""
    from stemfast.lattice import linked_clusters

    k = get_kernels(backend)
    bad = np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, 0.0], [6.0, 0.0]])
    with pytest.raises(ValueError, match="NaN or inf"):
        linked_clusters(bad, 1.5, backend=backend)
    for call in (lambda: k.knn_within(bad, np.zeros((1, 2)), 1, 2.0), lambda: k.pairs_within(bad, 2.0)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="out of range"):
        k.propagate_labels(np.zeros(5, np.int64), np.array([7]), np.array([0]), np.array([1]))
    _, idx = k.knn_within(np.zeros((3, 2)), np.array([[0.0, 0.0], [5.0, 0.0]]), 2, 1e10)
    assert np.asarray(idx).tolist() == [[0, 1], [0, 1]]
    img = np.random.default_rng(0).random((40, 37)).astype(np.float32)
    assert len(k.local_maxima(img, -2.0, 0.0, 0)) == int((img > 0).sum())  # an empty disc: every pixel
    from stemfast.model import shipped
    from stemfast.model.engine import prepare_weights, state_arrays
    from stemfast.model.settings import RVAEConfig, background_rank

    mcfg = RVAEConfig.from_dict(shipped.manifest()["config"])
    mw = prepare_weights(state_arrays(shipped.ARRAYS_PATH), mcfg)
    s = mcfg.input_size
    px = np.random.default_rng(1).normal(size=(3, s, s)).astype(np.float32)
    px[0, s // 2, s // 2] = np.nan
    args = (mw["mask"], mw["stn"], mw["enc"], mw["dec"], mw["symmetry"], mw["symmetrize"], mw["stn_downsample"],
            background_rank(s * s))
    mu = np.asarray(k.rvae_forward(px, *args, np.empty((0, 0, 0), np.float32))[0])
    ref = np.asarray(get_kernels("numpy").rvae_forward(px, *args, np.empty((0, 0, 0), np.float32))[0])
    np.testing.assert_allclose(mu, ref, rtol=1e-3, atol=1e-3)  # NaN where the reference has NaN
    assert np.isfinite(mu[1:]).all()
    # a small model without a spatial transformer, 16 px patches: the C++ fast convolutions (4, 8, 16
    # channels) must keep a NaN as the reference does
    rng = np.random.default_rng(6)

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    enc = (f32(4, 4, 1, 4), f32(4), f32(4, 4, 4, 8), f32(8), f32(4, 4, 8, 16), f32(16), f32(4 * 16, 6), f32(6))
    dec = (f32(3, 4 * 16), f32(4 * 16), f32(3, 3, 16, 32), f32(32), f32(3, 3, 8, 16), f32(16), f32(3, 3, 4, 4), f32(4))
    x = rng.standard_normal((4, 16, 16)).astype(np.float32)
    x[0, 3, 3] = np.nan
    small = (x, np.ones((16, 16), np.float32), (), enc, dec, 1, 0, 1, 0, np.empty((0, 0, 0), np.float32))
    got, ref = (np.asarray(kk.rvae_forward(*small)[0]) for kk in (k, get_kernels("numpy")))
    assert np.isnan(ref[0]).all() and np.isfinite(ref[1:]).all()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    if backend == "cpp":
        with pytest.raises(ValueError, match="recon must be"):
            k.rvae_forward(px, *args, np.empty((3, s, s), np.float64))


def test_kernel_threads_sets_and_restores():
    before = get_kernel_threads()
    assert set(before) == set(COMPILED)
    assert all(v >= 1 for v in before.values())
    with kernel_threads(1) as outer:
        assert outer == {b: 1 for b in COMPILED} == get_kernel_threads()
        with kernel_threads(2):
            assert all(v == min(2, before[b] if b == "numba" else 2) for b, v in get_kernel_threads().items())
        assert get_kernel_threads() == outer  # nested blocks restore the enclosing setting
        with pytest.raises(RuntimeError, match="boom"):
            with kernel_threads(2):
                raise RuntimeError("boom")
        assert get_kernel_threads() == outer  # ... also after an exception
    assert get_kernel_threads() == before
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            set_kernel_threads(bad)
    assert get_kernel_threads() == before
    prev = set_kernel_threads(1)
    try:
        assert prev == before and set(get_kernel_threads().values()) == {1}
    finally:
        set_kernel_threads(None)
    assert get_kernel_threads() == before  # None = the default (the core count)


def test_one_blas_thread_sets_and_restores_blas_threads():
    """Inside ``one_blas_thread`` BLAS runs one thread (nested blocks too); the setting before is back
    afterwards -- also after overlapping blocks in several threads have left in any order (OpenBLAS's
    setting is process-wide: the first block sets it, the last to leave restores it)."""
    import threading

    import numpy as np  # noqa: F401  (loads NumPy's BLAS)
    from threadpoolctl import threadpool_info, threadpool_limits

    from stemfast.backend import one_blas_thread

    def blas():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas()
        with one_blas_thread():
            assert set(blas()) == {1}
            with one_blas_thread():
                assert set(blas()) == {1}
            assert set(blas()) == {1}
        assert blas() == before
        a_in, b_in, a_go, b_go = (threading.Event() for _ in range(4))

        def worker(entered, go):
            with one_blas_thread():
                entered.set()
                go.wait(10)

        ta = threading.Thread(target=worker, args=(a_in, a_go))
        tb = threading.Thread(target=worker, args=(b_in, b_go))
        ta.start(); a_in.wait(10); tb.start(); b_in.wait(10)
        a_go.set(); ta.join(10)  # the first to enter leaves first
        b_go.set(); tb.join(10)
        assert blas() == before


def test_find_sites_runs_with_one_blas_thread(monkeypatch):
    """``find_sites`` itself holds ``one_blas_thread`` (so every caller -- ``prepare``, the ``sites``
    command, a user's script -- runs the stages with one BLAS thread), and restores the setting."""
    import numpy as np  # noqa: F401  (loads NumPy's BLAS)
    from threadpoolctl import threadpool_info, threadpool_limits

    import stemfast.sites as sites_mod

    def blas():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    seen = []
    inner = sites_mod._find_sites

    def spy(*args, **kwargs):
        seen.append(blas())
        return inner(*args, **kwargs)

    monkeypatch.setattr(sites_mod, "_find_sites", spy)
    from stemfast.synthetic import make_lattice

    img, _ = make_lattice((96, 96), spacing=8.0, noise=0.05, seed=1)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas()
        sites_mod.find_sites(img)
        assert blas() == before
    assert len(seen) == 1 and (not seen[0] or set(seen[0]) == {1})


@pytest.fixture
def without_core(monkeypatch):
    """This process without the compiled extension, as if it were not built: ``stemfast._core`` does
    not import (its cached load and reason forgotten before and after)."""
    import stemfast.backend as be

    monkeypatch.setitem(sys.modules, "stemfast._core", None)
    monkeypatch.setattr(be, "_core_error", None)
    monkeypatch.setattr(be, "_fallback_logged", False)
    be._load.cache_clear()
    yield
    be._load.cache_clear()


def _analyze(tmp_path: Path, name: str) -> tuple[dict, dict, str]:
    """``stemfast analyze`` (shipped model) of a small synthetic MoS2 image into ``tmp_path/name``: the
    input's summary.json, batch_summary.json and report.html."""
    import json

    from stemfast.cli import main
    from stemfast.synthetic import make_mos2

    img = tmp_path / "a.npy"
    if not img.exists():
        np.save(img, make_mos2(shape=(160, 160), seed=1).image.astype(np.float32))
    out = tmp_path / name
    assert main(["analyze", str(img), "-o", str(out), "--no-companion"]) == 0
    return (json.loads((out / "a" / "summary.json").read_text()), json.loads((out / "batch_summary.json").read_text()),
            (out / "report.html").read_text())


def test_a_run_records_the_backend_its_kernels_ran_on(tmp_path, monkeypatch):
    """summary.json, batch_summary.json and the report say which backend ran the kernels. Without the
    compiled extension nothing said the kernels had fallen back (a stderr line only), so stage times
    10-100x those of C++ were unexplained: now the backend, the reason, and one line in the report."""
    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    fastest = available_backends()[0]
    s, batch, html = _analyze(tmp_path, "with")
    assert s["backend"] == batch["backend"] == fastest and s["core_import_error"] is None
    assert "not the compiled C++ extension" not in html
    assert all(f["backend"] == fastest for f in s["frames"])


def test_a_run_without_the_compiled_extension_says_so(tmp_path, monkeypatch, without_core):
    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    used = resolve_backend()
    assert used != "cpp"
    s, batch, html = _analyze(tmp_path, "without")
    assert s["backend"] == batch["backend"] == used
    assert "stemfast._core is not available" in s["core_import_error"] and "pip install" in s["core_import_error"]
    assert all(f["backend"] == used and "core_import_error" not in f for f in s["frames"])  # said once
    assert html.count(f"kernels: {used}, not the compiled C++ extension") == 1
    assert "stemfast._core is not available" in html


@pytest.mark.parametrize("how", ["setting", "environment"])
def test_cpp_asked_for_without_the_extension_is_refused_before_any_output(tmp_path, monkeypatch, without_core, how,
                                                                          capsys):
    """--backend cpp (or STEMFAST_BACKEND=cpp) where the extension does not import was refused only when
    the first input ran: OUT created, the input failed. Now a settings error (exit 2) naming the backend
    and why, and nothing written."""
    from stemfast.cli import main
    from stemfast.errors import EXIT_SETTINGS

    np.save(tmp_path / "a.npy", np.zeros((64, 64), np.float32))
    out = tmp_path / "out"
    args = ["analyze", str(tmp_path / "a.npy"), "-o", str(out)]
    if how == "setting":
        monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
        args += ["--backend", "cpp"]
    else:
        monkeypatch.setenv("STEMFAST_BACKEND", "cpp")
    assert main(args) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "cpp kernels" in err and "stemfast._core is not available" in err
    assert not out.exists()


class _KernelSpy:
    """Stands in for :func:`stemfast.backend.get_kernels` in every stemfast module: records, per fetch,
    the backend asked for and the function that asked, and per kernel used the backend it ran on."""

    def __init__(self, monkeypatch):
        import stemfast.backend as B

        self.real = B.get_kernels
        self.fetches: list[tuple[str | None, str]] = []  # (backend asked for, "module.function")
        self.used: set[tuple[str, str]] = set()  # (resolved backend, kernel name)
        for name, mod in list(sys.modules.items()):
            if name.startswith("stemfast") and getattr(mod, "get_kernels", None) is self.real:
                monkeypatch.setattr(mod, "get_kernels", self)

    def __call__(self, backend=None):
        caller = sys._getframe(1)
        self.fetches.append((backend, f"{caller.f_globals.get('__name__')}.{caller.f_code.co_name}"))
        kern, spy = self.real(backend), self

        class Seen:  # the kernels module, noting which kernels are called on it
            def __getattr__(self, attr):
                spy.used.add((resolve_backend(backend), attr))
                return getattr(kern, attr)

        return Seen()


@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if b in available_backends()])
def test_every_kernel_of_a_run_runs_on_the_sites_backend(backend, tmp_path, monkeypatch):
    """``sites.backend`` (``--backend``) is the backend of the whole run, and summary.json records it;
    but 9 nearest_indices, 3 band-pass, find_peaks, 2 sample_image, site_intensity, the patch gatherer,
    the compiled model's encode, neighbourhood_mean and 2 local_references fetches of a 160^2 prepare +
    analyze asked for backend None (STEMFAST_BACKEND or the fastest: C++), as did the input-contract
    probe's prepare and the batch's sites.csv writer: a ``--backend numba`` run ran partly on C++. Every
    fetch of prepare + analyze and of the batch now asks for the setting."""
    from stemfast.config import load_config
    from stemfast.frontend import prepare
    from stemfast.model import shipped
    from stemfast.pipeline import analyze
    from stemfast.synthetic import make_mos2

    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    cfg = load_config(None, {"sites.backend": backend})
    img = make_mos2(shape=(160, 160), seed=2, pixel_size_A=0.2).image
    shipped._probe.cache_clear()  # the input-contract probe runs in this test, as in a fresh run
    spy = _KernelSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(img, config=cfg)
        model = shipped.shipped_for_run(cfg)
        table, _ = analyze(prep, model, config=cfg)
        data = tmp_path / "data"
        data.mkdir()
        np.save(data / "tiny.npy", img)
        from stemfast.batch import run_batch

        run_batch(data, tmp_path / "out", config=cfg, show_progress=False)
    assert len(table) > 100 and (tmp_path / "out" / "tiny" / "sites.csv").is_file()
    unset = sorted({who for b, who in spy.fetches if b is None})
    assert unset == [], f"kernel fetches without the run's backend: {unset}"
    assert {b for b, _ in spy.fetches} == {backend} and len(spy.fetches) > 40
    ran = {name for _, name in spy.used}
    assert {b for b, _ in spy.used} == {backend}
    if type(model).__name__ == "CompiledModel":  # the compiled engine (a CPU run): its kernel too
        assert "rvae_forward" in ran
    # the stages' kernels all ran (on the setting): detection, lattice, patches, references, the writer
    assert {"bandpass_apply", "local_maxima", "refine_gauss", "knn_within", "gather_patches", "local_references",
            "neighbour_mean", "format_csv_rows"} <= ran, ran


#: calls that may leave ``backend`` out: (module path, function called, why)
_BACKEND_FREE_CALLS = {
    ("model/train_default.py", "input_contract"),  # the training script's own default settings
    ("encode_worker.py", "load_default_model"),  # probe=False: no contract probe, the model runs on torch
}


def _calls_without_backend() -> list[str]:
    """Calls in the package of its functions that take ``backend`` (by keyword or position) and are not
    given it. A kernel of the contract called on a kernels module (``kern.local_references(...)``) is
    not one of them."""
    import ast

    pkg = Path(stemfast.__file__).resolve().parent
    kernel_names = set(get_kernels("numpy").__all__)
    trees = {p: ast.parse(p.read_text()) for p in sorted(pkg.rglob("*.py")) if "_kernels" not in p.parts}
    takes: dict[str, int | None] = {}  # function or class name -> positional index of backend (None: keyword)
    for tree in trees.values():
        for node in ast.walk(tree):
            plain = isinstance(node, ast.FunctionDef) and node.name != "__init__"
            fn, name = (node, node.name) if plain else (None, None)
            if isinstance(node, ast.ClassDef):
                fn = next((m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
                name = node.name
            if fn is None:
                continue
            pos = [a.arg for a in fn.args.posonlyargs + fn.args.args]
            pos = pos[1:] if pos and pos[0] in ("self", "cls") else pos
            if "backend" in pos or "backend" in [a.arg for a in fn.args.kwonlyargs]:
                takes[name] = pos.index("backend") if "backend" in pos else None
    bad = []
    for path, tree in trees.items():
        rel = path.relative_to(pkg).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            attr = isinstance(node.func, ast.Attribute)
            name = node.func.attr if attr else getattr(node.func, "id", None)
            if name not in takes or (attr and name in kernel_names) or (rel, name) in _BACKEND_FREE_CALLS:
                continue
            i = takes[name]
            given = any(k.arg in ("backend", None) for k in node.keywords) or (i is not None and len(node.args) > i)
            if not given and not any(isinstance(a, ast.Starred) for a in node.args):
                bad.append(f"{rel}:{node.lineno} {name}")
    return bad


def test_every_kernel_function_called_in_the_package_is_given_the_backend():
    """The spy above sees the paths a clean synthetic image takes; this sees every call: a function of
    the package that takes ``backend`` (and so fetches kernels) called without it runs on
    STEMFAST_BACKEND or the fastest backend, not the run's. Such calls were: the local references of a
    scan-line gain (_refresh_references) and of a second detector (_companion_z), fill_lattice's spacing
    estimate, the batch's CSV writer (get_kernels()), the compiled shipped model in Dask workers and
    shipped_for_run, besides those the spy lists."""
    assert _calls_without_backend() == []


def test_a_compiled_model_loaded_without_a_backend_follows_the_run(monkeypatch):
    """The compiled engine has no backend setting of its own: a CompiledModel given none (as a caller
    may load it: shipped.load_compiled_default()) encoded on STEMFAST_BACKEND or the fastest backend
    under a run whose sites.backend was numpy. analyze runs it on the run's backend (a copy; the
    model passed in is left as it was); a run that sets none leaves the model's own."""
    from stemfast.config import load_config
    from stemfast.frontend import prepare
    from stemfast.model import shipped
    from stemfast.pipeline import analyze
    from stemfast.synthetic import make_mos2

    monkeypatch.delenv("STEMFAST_BACKEND", raising=False)
    model = shipped.load_compiled_default()
    assert model.backend is None
    cfg = load_config(None, {"sites.backend": "numpy"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(make_mos2(shape=(128, 128), seed=3, pixel_size_A=0.2).image, config=cfg)
        spy = _KernelSpy(monkeypatch)
        analyze(prep, model, config=cfg)
    assert {b for b, _ in spy.fetches} == {"numpy"} and ("numpy", "rvae_forward") in spy.used
    assert model.backend is None
    from stemfast.model.engine import on_backend

    assert on_backend(model, None) is model and on_backend(model, "numpy").backend == "numpy"
    assert on_backend(model, "numpy")._w is model._w and model.backend is None  # weights shared, not moved
    torch_like = object()
    assert on_backend(torch_like, "numpy") is torch_like  # runs no kernels
