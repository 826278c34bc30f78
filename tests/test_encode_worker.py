"""The encode worker process: the same results as encoding in-process, failures come back, no hung
or leftover process, the opt-out, and a parent that never imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import stemfast
from stemfast import encode_worker as ew
from stemfast.model.settings import Encoding

PYTHON_DIR = str(Path(stemfast.__file__).resolve().parent.parent)
pytestmark = pytest.mark.skipif(ew.unavailable() == "no 'fork' start method on this platform",
                                reason="needs the fork start method")


class FakeModel:
    """Encodes a patch as its mean and maximum (no torch); ``ValueError`` for patches that are not 3-D."""

    def encode(self, patches):
        p = np.asarray(patches, np.float32)
        if p.ndim != 3:
            raise ValueError(f"patches must be [N, S, S], got {p.shape}")
        if p.size and p[0, 0, 0] == -999:
            os._exit(7)  # the worker dies mid-call
        mu = np.stack([p.mean(axis=(1, 2)), p.max(axis=(1, 2))], axis=1)
        return Encoding(mu=mu, logvar=np.zeros_like(mu), angle=np.full(len(p), np.nan, np.float32),
                        recon_error=p.std(axis=(1, 2)), angle_strength=p.min(axis=(1, 2)))


class OddError(Exception):
    """An exception type the parent would have to import from this test module."""


def _fail_loading():
    raise RuntimeError("no such model: /nowhere.pt")


def _fail_oddly():
    raise OddError("odd")


def test_worker_encodes_like_the_model():
    patches = np.random.default_rng(0).normal(size=(300, 9, 9)).astype(np.float32)
    w = ew.EncodeWorker(FakeModel)
    try:
        for part in (patches, patches[:7], patches[:0]):
            got, ref = w.encode(part), FakeModel().encode(part)
            for f in ("mu", "logvar", "angle", "recon_error", "angle_strength"):
                np.testing.assert_array_equal(getattr(got, f), getattr(ref, f))
            assert got.recon is None and len(got) == len(part)
    finally:
        w.close()
    assert not w._proc.is_alive()
    w.close()  # idempotent


def test_an_encode_error_is_the_models_and_the_worker_goes_on(stemfast_log):
    caplog = stemfast_log
    w = ew.EncodeWorker(FakeModel)
    try:
        with pytest.raises(ValueError, match=r"patches must be \[N, S, S\]"):
            w.encode(np.zeros((4, 5)))
        assert "Traceback" in caplog.text and "ValueError" in caplog.text  # the child's traceback, logged
        assert w.encode(np.ones((2, 3, 3))).mu.shape == (2, 2)
    finally:
        w.close()


def test_a_model_that_does_not_load_fails_every_call(stemfast_log):
    caplog = stemfast_log
    w = ew.EncodeWorker(_fail_loading)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no such model"):
            w.encode(np.ones((2, 3, 3)))
    assert "_fail_loading" in caplog.text  # where it failed, in the child
    assert not w._proc.is_alive()


def test_an_exception_the_parent_cannot_import_comes_back_by_name():
    w = ew.EncodeWorker(_fail_oddly)
    with pytest.raises(ew.EncodeWorkerError, match="OddError: odd"):
        w.encode(np.ones((2, 3, 3)))


def test_a_dead_worker_is_reported_not_waited_for():
    w = ew.EncodeWorker(FakeModel)
    t0 = time.perf_counter()
    with pytest.raises(ew.EncodeWorkerError, match=r"died \(exit code 7\)"):
        w.encode(np.full((1, 3, 3), -999, np.float32))
    with pytest.raises(ew.EncodeWorkerError):
        w.encode(np.ones((1, 3, 3)))
    assert time.perf_counter() - t0 < 30


def test_a_worker_killed_between_calls_is_reported_with_its_exit_code():
    """Sending to a child killed since the last call failed with 'cannot be reached: Broken pipe'."""
    import signal

    w = ew.EncodeWorker(FakeModel)
    try:
        assert w.encode(np.ones((1, 3, 3))).mu.shape == (1, 2)
        os.kill(w._proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while w._proc.is_alive() and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        with pytest.raises(ew.EncodeWorkerError, match=r"died \(exit code -9, killed by SIGKILL\)"):
            w.encode(np.ones((1, 3, 3)))
    finally:
        w.close()


def test_the_opt_out(monkeypatch):
    monkeypatch.setenv(ew.ENV_VAR, "0")
    assert ew.unavailable() == f"{ew.ENV_VAR}=0"


def _run(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_worker_ends_with_its_parent():
    """A parent that exits without closing the worker takes it along (daemon; ``os._exit`` after the
    ``atexit`` handlers, as ``python -m stemfast`` ends)."""
    code = ("import atexit, os\n"
            "from stemfast.encode_worker import EncodeWorker\n"
            "class M:\n"
            "    def encode(self, p):\n"
            "        return None\n"
            "w = EncodeWorker(M)\n"
            "print(w._proc.pid, flush=True)\n"
            "atexit._run_exitfuncs()\n"
            "os._exit(0)\n")
    out = _run(code, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    for _ in range(50):
        if not _running(pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the worker {pid} outlived its parent")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped by init does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status


_BATCH = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from stemfast.batch import run_batch
from stemfast.config import load_config
# the torch engine: the worker is how torch runs the shipped model (the compiled engine needs no worker)
r = run_batch([sys.argv[1]], sys.argv[2], show_progress=False, config=load_config(None, {"model.engine": "torch"}))
print(json.dumps({"exit": r.exit_code, "torch": "torch" in sys.modules, "model": r.model_source}))
"""


@pytest.mark.slow
def test_batch_with_the_worker_gives_the_same_outputs_and_never_imports_torch(tmp_path):
    """The shipped model on torch in a worker vs in this process: byte-identical sites.csv, the same
    summary (``model.engine = "torch"``; the compiled engine: tests/test_engine.py)."""
    from stemfast.synthetic import make_mos2

    img = tmp_path / "img.tif"
    make_mos2(shape=(256, 256), seed=3, rotation_deg=7.0).save(img)
    runs = {}
    for mode in ("1", "0"):
        out = tmp_path / f"out{mode}"
        p = subprocess.run([sys.executable, "-c", _BATCH, str(img), str(out)],
                           env={**os.environ, "PYTHONPATH": PYTHON_DIR, ew.ENV_VAR: mode},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        runs[mode] = (json.loads(p.stdout.strip().splitlines()[-1]), p.stderr, out / "img")
    (w, w_log, w_dir), (s, s_log, s_dir) = runs["1"], runs["0"]
    assert w["exit"] == s["exit"] == 0 and w["model"] == s["model"]
    assert "encoding in a worker process" in w_log and "encoding in this process" in s_log
    assert not w["torch"] and s["torch"]
    assert (w_dir / "sites.csv").read_bytes() == (s_dir / "sites.csv").read_bytes()
    ws, ss = (json.loads((d / "summary.json").read_text()) for d in (w_dir, s_dir))
    for key in ("n_sites", "n_defects", "class_counts", "defect_kinds", "model", "top"):
        assert ws.get(key) == ss.get(key), key
    # the command line starts the worker before it imports the pipeline: the same outputs
    p = subprocess.run([sys.executable, "-m", "stemfast", "analyze", str(img), "-o", str(tmp_path / "cli"), "-v",
                        "--set", 'model.engine="torch"'],
                       env={**os.environ, "PYTHONPATH": PYTHON_DIR}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "encoding in a worker process" in p.stderr
    assert (tmp_path / "cli" / "img" / "sites.csv").read_bytes() == (s_dir / "sites.csv").read_bytes()


@pytest.mark.slow
def test_a_model_file_is_loaded_and_checked_in_the_worker(tmp_path):
    """``--model FILE``: loaded in the worker (the parent never imports torch), the same outputs as in
    process; a file that is no model gives the same message and exit status either way."""
    from stemfast.model.shipped import MODEL_PATH
    from stemfast.synthetic import make_mos2

    img = tmp_path / "img.tif"
    make_mos2(shape=(192, 192), seed=5).save(img)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    res = {}
    for mode in ("1", "0"):
        env = {**os.environ, "PYTHONPATH": PYTHON_DIR, ew.ENV_VAR: mode}
        out = tmp_path / f"out{mode}"
        p = subprocess.run([sys.executable, "-m", "stemfast", "analyze", str(img), "-o", str(out), "--model",
                            str(MODEL_PATH), "-v"], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        q = subprocess.run([sys.executable, "-m", "stemfast", "analyze", str(img), "-o", str(tmp_path / f"b{mode}"),
                            "--model", str(bad)], env=env, capture_output=True, text=True, timeout=600)
        res[mode] = ((out / "img" / "sites.csv").read_bytes(), p.stderr, q.returncode, q.stderr)
    assert "encoding in a worker process" in res["1"][1] and "encoding in a worker process" not in res["0"][1]
    assert res["1"][0] == res["0"][0]
    assert res["1"][2] == res["0"][2] != 0 and res["1"][3] == res["0"][3]
    assert "not a stemfast model file" in res["1"][3] and "Traceback" not in res["1"][3]
    code = ("import sys\nfrom stemfast.batch import run_batch\n"
            f"r = run_batch([{str(img)!r}], {str(tmp_path / 'api')!r}, model_path={str(MODEL_PATH)!r}, show_progress=False)\n"
            "print(r.exit_code, 'torch' in sys.modules)\n")
    p = _run(code, timeout=600)
    assert p.stdout.split() == ["0", "False"], p.stderr


def _hang():
    time.sleep(60)


def test_a_worker_that_does_not_load_is_ended(monkeypatch):
    monkeypatch.setattr(ew, "_LOAD_TIMEOUT_S", 1.0)
    w = ew.EncodeWorker(_hang)
    t0 = time.perf_counter()
    with pytest.raises(ew.EncodeWorkerError, match="did not load the model in 1 s"):
        w.encode(np.ones((1, 3, 3)))
    assert time.perf_counter() - t0 < 20 and not w._proc.is_alive()


def test_no_fork_while_other_threads_run():
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert ew.unavailable() in ("other threads run in this process", "torch is already imported in this process",
                                    f"{ew.ENV_VAR}={os.environ.get(ew.ENV_VAR)}")
    finally:
        stop.set()
        t.join()


_REFUSED = """
import json, logging, shutil, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from stemfast.model import shipped
from stemfast.batch import run_batch
from stemfast.config import load_config
# the shipped files copied, the manifest's version changed: the weights' checksum and the input contract
# pass, the tag check -- done where the model is loaded, here in the worker -- refuses it
tmp = Path(sys.argv[3])
for name in ("MODEL_PATH", "MANIFEST_PATH"):
    setattr(shipped, name, Path(shutil.copyfile(getattr(shipped, name), tmp / getattr(shipped, name).name)))
man = json.loads(shipped.MANIFEST_PATH.read_text())
man["version"] = "9.9"
shipped.MANIFEST_PATH.write_text(json.dumps(man))
cfg = load_config(None, {"model.engine": "torch", "model.epochs": 1, "model.stn_epochs": 1,
                         "model.max_train_patches": 300, "model.device": "cpu"})
r = run_batch([sys.argv[1]], sys.argv[2], show_progress=False, config=cfg)
out = Path(sys.argv[2])
print(json.dumps({"exit": r.exit_code, "status": [x.status for x in r.results], "refused": r.model_refused,
                  "trained": r.model_trained, "batch": json.loads((out / "batch_summary.json").read_text())["model"],
                  "info": json.loads((out / "model.json").read_text()).get("refused"),
                  "summary": json.loads((out / "img" / "summary.json").read_text())["model"]["refused"]
                  if (out / "img" / "summary.json").is_file() else "no summary.json"}))
"""


@pytest.mark.slow
def test_a_shipped_model_the_worker_refuses_is_a_refusal_as_in_process(tmp_path):
    """The shipped model refused where it is loaded (its tag differs from the manifest's): in this
    process a warning, the reason in the records and a model trained instead; in the encode worker the
    refusal came back at the first encode and failed every input (exit 3, the batch summary saying
    "shipped", refused none). Now the worker's refusal is the same refusal."""
    from stemfast.model.shipped import MANIFEST_PATH, MODEL_PATH
    from stemfast.synthetic import make_mos2

    if not (MODEL_PATH.is_file() and MANIFEST_PATH.is_file()):
        pytest.skip("no shipped model in the package data")
    img = tmp_path / "img.npy"
    np.save(img, make_mos2(shape=(160, 160), seed=11, rotation_deg=12.0).image.astype(np.float32))
    runs = {}
    for mode in ("1", "0"):
        (tmp_path / f"files{mode}").mkdir()
        p = _run(_REFUSED.replace("sys.argv[1]", repr(str(img))).replace("sys.argv[2]", repr(str(tmp_path / f"out{mode}")))
                 .replace("sys.argv[3]", repr(str(tmp_path / f"files{mode}"))), {ew.ENV_VAR: mode}, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[mode] = (json.loads(p.stdout.strip().splitlines()[-1]), p.stderr)
    (w, w_log), (s, s_log) = runs["1"], runs["0"]
    assert "encoding in a worker process" in w_log and "encoding in a worker process" not in s_log
    assert w["exit"] == s["exit"] == 0 and w["status"] == s["status"] == ["done"] and w["trained"] and s["trained"]
    reason = "shipped model tag "
    assert w["refused"] == s["refused"] and w["refused"].startswith(reason) and "9.9" in w["refused"]
    for run in (w, s):
        assert run["batch"]["refused"] == run["info"] == run["summary"] == run["refused"]
        assert run["batch"]["source"] == "trained"
    assert "shipped default model not used" in w_log
