"""Hostile and careless use of ``stemfast batch``: never a traceback, never a quietly wrong result.

Each test makes its own small files; one tiny model is trained once for the module and then
passed as ``--model`` (no training in the tests). Network cases use loopback only, with bounded
time.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import stemfast
from stemfast.batch import run_batch
from stemfast.cli.batch import run_batch_cli
from stemfast.config import file_sha256, load_config, parse_toml
from stemfast.errors import EXIT_BUSY, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETTINGS, EXIT_SKIPPED

TINY = {"model": {"epochs": 1, "stn_epochs": 1, "max_train_patches": 300, "batch_size": 64, "input_size": 16,
                  "channels": [8, 8, 8], "stn_channels": [4, 8], "patience": 1, "device": "cpu"},
        "analysis": {"top_n": 5}}
PYTHON_DIR = str(Path(stemfast.__file__).resolve().parent.parent)


def _image(seed: int, shape=(160, 160)) -> np.ndarray:
    from stemfast.synthetic import make_mos2

    return make_mos2(shape=shape, seed=seed).image.astype(np.float32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """data/good.npy, data/other.npy; a tiny trained model A and a re-saved copy B (other bytes)."""
    from stemfast.batch import load_model

    root = tmp_path_factory.mktemp("robust")
    data = root / "data"
    data.mkdir()
    np.save(data / "good.npy", _image(1))
    np.save(data / "other.npy", _image(2))
    (root / "tiny.toml").write_text("[model]\nepochs = 1\nstn_epochs = 1\nmax_train_patches = 300\n"
                                    "batch_size = 64\ninput_size = 16\nchannels = [8, 8, 8]\nstn_channels = [4, 8]\n"
                                    "patience = 1\ndevice = \"cpu\"\n\n[analysis]\ntop_n = 5\n")
    cfg = load_config(root / "tiny.toml")
    rep = run_batch(data, root / "trained", config=cfg, show_progress=False)
    assert {r.name: r.status for r in rep.results} == {"good": "done", "other": "done"}
    model_a = root / "model_a.pt"
    shutil.copyfile(root / "trained" / "model.pt", model_a)
    m = load_model(model_a)
    model_b = root / "model_b.pt"
    m.save(model_b, extra={**m.extra, "note": "model B"})
    assert file_sha256(model_a) != file_sha256(model_b)
    return {"root": root, "data": data, "cfg": cfg, "toml": root / "tiny.toml", "a": model_a, "b": model_b}


def _args(env, out, *extra):
    return [str(env["data"]), "-o", str(out), "--config", str(env["toml"]), "--model", str(env["a"]), *extra]


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def _cli(args, env_extra=None, *, ctrl_c=False):
    """``python -m stemfast ARGS`` in a child process. ``ctrl_c``: the child starts with SIGINT at its
    default, as from a terminal -- a test runner started in the background by a non-interactive shell
    (``cmd &``, ``nohup``) has SIGINT ignored, the child inherits that, Python then installs no
    KeyboardInterrupt handler, and a simulated Ctrl-C does nothing (the run finished with 0)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = PYTHON_DIR + os.pathsep + e.get("PYTHONPATH", "")
    e["STEMFAST_PROGRESS"] = "0"
    e.pop("STEMFAST_TEST_CRASH", None)
    e.update(env_extra or {})
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ctrl_c else None
    return subprocess.run([sys.executable, "-m", "stemfast", *args], env=e, capture_output=True, text=True,
                          timeout=240, preexec_fn=pre)


# ----------------------------------------------------------------------------- 2. content fingerprints


def test_changed_content_with_same_size_and_mtime_is_redone(env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = data / "img.npy"
    np.save(f, _image(3))
    out = tmp_path / "out"
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert rep.results[0].status == "done"
    old_sha = file_sha256(f)
    st = f.stat()
    size = st.st_size
    np.save(f, _image(4))  # new content, same shape and dtype: same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -a leave it
    assert f.stat().st_size == size and f.stat().st_mtime_ns == st.st_mtime_ns
    new_sha = file_sha256(f)
    assert new_sha != old_sha
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert rep.results[0].status == "done"  # redone, not "current"
    done = json.loads((out / "img" / "done.json").read_text())
    assert done["input"]["sha256"] == new_sha
    toml = parse_toml((out / "stemfast.toml").read_text())
    assert toml["inputs"]["img.npy"] == new_sha
    html = (out / "report.html").read_text()
    assert new_sha[:16] in html and old_sha[:16] not in html


def test_a_rerun_with_an_input_removed_or_renamed_rewrites_the_batch_records(env, tmp_path):
    """Inputs removed from the folder, or renamed (same content), change no input's result, yet the
    batch's summary, report and settings record must list the inputs as they are now."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "one.npy", _image(1))
    np.save(data / "two.npy", _image(2))
    out = tmp_path / "out"
    run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    (data / "two.npy").unlink()
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert [r.status for r in rep.results] == ["current"]
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["n_inputs"] == 1 and [i["name"] for i in bs["inputs"]] == ["one"]
    assert "two.npy" not in (out / "report.html").read_text()
    (data / "one.npy").rename(data / "uno.npy")
    run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert list(parse_toml((out / "stemfast.toml").read_text())["inputs"]) == ["uno.npy"]
    # nothing changed: nothing rewritten
    mtimes = {q: q.stat().st_mtime_ns for q in out.rglob("*") if q.is_file()}
    run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert {q: q.stat().st_mtime_ns for q in out.rglob("*") if q.is_file()} == mtimes


def test_large_files_get_a_sampled_fingerprint_that_sees_changed_blocks(tmp_path, monkeypatch):
    from stemfast.fingerprint import SAMPLED_PREFIX, content_fingerprint

    monkeypatch.setenv("STEMFAST_FULL_HASH_MB", "1")
    p = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    raw = bytearray(rng.integers(0, 256, 8 * 2**20, dtype=np.uint8).tobytes())
    p.write_bytes(raw)
    fp = content_fingerprint(p)
    assert fp.startswith(SAMPLED_PREFIX) and fp == content_fingerprint(p)
    from stemfast import fingerprint as F

    span = len(raw) - 2 * F._EDGE - F._BLOCK
    mid = F._EDGE + span * 20 // (F.SAMPLE_BLOCKS - 1) + 100  # inside the 21st sampled block
    for off in (10, mid, len(raw) - 5):  # head, a sampled block in the middle, tail
        changed = bytearray(raw)
        changed[off] ^= 0xFF
        p.write_bytes(changed)
        assert content_fingerprint(p) != fp, off
    # the documented limit: a change between the sampled blocks that keeps the size is not seen
    changed = bytearray(raw)
    changed[mid + F._BLOCK + 1000] ^= 0xFF
    p.write_bytes(changed)
    assert content_fingerprint(p) == fp
    monkeypatch.delenv("STEMFAST_FULL_HASH_MB")
    assert content_fingerprint(p) == file_sha256(p)  # below the default limit: the full hash


# ----------------------------------------------------------------------------- 4. one writer per OUT


def _fake_lock(out: Path, pid: int, host: str | None = None) -> None:
    from stemfast.outlock import LOCK_FILE, _proc_start

    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "start": _proc_start(pid), "since": "earlier",
                                             "command": "stemfast batch (the other run)"}))


def test_second_batch_into_the_same_out_is_refused_and_changes_nothing(env, tmp_path):
    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out)) == EXIT_OK
    before = {p.name: p.read_bytes() for p in [out / "model.pt", out / "report.html", out / "batch_summary.json"]}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_lock(out, sleeper.pid)  # another batch is running into OUT
        p = _cli(["batch", *_args(env, out)[:-1], str(env["b"]), "--force"])
        assert p.returncode == EXIT_BUSY, p.stderr[-2000:]
        assert "in use by another stemfast run" in p.stderr and f"pid {sleeper.pid}" in p.stderr
        assert "Traceback" not in p.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    # nothing was touched: model B was not copied over model A, the report still names A
    for name, b in before.items():
        assert (out / name).read_bytes() == b, name
    # the lock of a process that is gone is taken over; model B then redoes every input
    rep = run_batch(env["data"], out, config=env["cfg"], model_path=env["b"], show_progress=False)
    assert {r.status for r in rep.results} == {"done"}
    sha_b = file_sha256(env["b"])
    assert file_sha256(out / "model.pt") == sha_b
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["model"]["sha256"] == sha_b
    for name in ("good", "other"):
        assert json.loads((out / name / "summary.json").read_text())["model_sha256"] == sha_b
    html = (out / "report.html").read_text()
    assert html.count(sha_b[:16]) == 3, [html[max(0, i - 80):i + 20] for i in range(len(html)) if html.startswith(sha_b[:16], i)]
    assert "not this batch" not in html  # the batch + each input
    assert not (out / ".stemfast.lock").exists() and not _leftovers(out)
    # results of another model are flagged in the report (e.g. a run into OUT with --model A over B's results,
    # interrupted before it redid them): each input names its own model
    from stemfast.report import _input_section

    s = json.loads((out / "good" / "summary.json").read_text())
    text = _input_section(s, out / "good", batch_model_sha=file_sha256(env["a"]))
    assert "not this batch&#x27;s model" in text and sha_b[:16] in text


def test_lock_of_another_host_is_not_taken_over(env, tmp_path):
    from stemfast.errors import OutputLocked

    out = tmp_path / "out"
    _fake_lock(out, 12345, host="some-other-host")
    with pytest.raises(OutputLocked, match="remove .*stemfast.lock"):
        run_batch(env["data"], out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert not (out / "model.pt").exists()


# ----------------------------------------------------------------------------- 5. size check


def test_image_declaring_more_pixels_than_memory_is_refused_and_the_batch_goes_on(env, tmp_path):
    import tifffile

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "good.npy", _image(1))
    # a sparse BigTIFF declaring 400000 x 400000 px (160 GB; a few KB on disk)
    tifffile.imwrite(data / "huge.tif", shape=(400000, 400000), dtype="uint8", bigtiff=True)
    assert os.path.getsize(data / "huge.tif") > 1.5e11
    out = tmp_path / "out"
    t0 = time.monotonic()
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert time.monotonic() - t0 < 60
    st = {r.name: r for r in rep.results}
    assert st["good"].status == "done"
    assert st["huge"].status == "skipped"
    assert "400000 x 400000 px" in st["huge"].reason and "GiB" in st["huge"].reason
    html = (out / "report.html").read_text()
    assert "400000 x 400000 px" in html
    assert rep.exit_code == EXIT_SKIPPED


# ----------------------------------------------------------------------------- 6. disk full during a rerun


def test_disk_full_during_a_rerun_leaves_the_previous_results_and_report(env, tmp_path, monkeypatch, capsys):
    import stemfast.report as R

    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out)) == EXIT_OK
    before = {f: (out / "good" / f).read_bytes() for f in ("sites.csv", "summary.json", "done.json", "classes.png")}
    real = R.plot_defects

    def full(path, *a, **k):
        if ".good.staging" in str(path):
            raise OSError(28, "No space left on device", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(R, "plot_defects", full)
    # a rerun with a changed setting: good fails half-way (disk full), other is redone
    code = run_batch_cli(_args(env, out, "--set", "analysis.top_n=3"))
    err = capsys.readouterr().err
    assert code == EXIT_SKIPPED
    assert "no space left on device" in err and "defects.png" in err and "Traceback" not in err
    after = {f: (out / "good" / f).read_bytes() for f in before}
    assert after == before  # the previous complete set, untouched
    assert not _leftovers(out)
    bs = json.loads((out / "batch_summary.json").read_text())
    assert {i["name"]: i["status"] for i in bs["inputs"]} == {"good": "failed", "other": "done"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # good's previous figures are still in the report
    assert "this run failed" in html
    # the report itself cannot be written: the old one stays, the message names the file
    old_html = html
    import stemfast.atomic as A

    real_open = A.atomic_open

    def no_space(path, *a, **k):
        if str(path).endswith("report.html"):
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(R, "plot_defects", real)
    monkeypatch.setattr(A, "atomic_open", no_space)
    code = run_batch_cli(_args(env, out, "--set", "analysis.top_n=4"))
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "report.html: no space left on device" in err and "Traceback" not in err
    assert (out / "report.html").read_text() == old_html
    assert not (out / ".stemfast.lock").exists()


# ----------------------------------------------------------------------------- 7. settings


@pytest.mark.parametrize("opts, words", [
    (["--set", "analysis.defect_cutoff=nan"], "analysis.defect_cutoff must be a finite number"),
    (["--set", "analysis.n_classes=1000"], "analysis.n_classes must be between 1 and 64"),
    (["--set", "sites.backend=bogus"], "sites.backend must be one of cpp, numba, numpy"),
    (["--spacing", "1e9"], "sites.spacing must be <= 2048"),
    (["--spacing", "nan"], "sites.spacing must be a finite number"),
    (["--scheduler", "inproc://x"], "inproc:// addresses reach a scheduler inside the same process"),
    (["--fill-nonfinite", "--nonfinite-limit", "2"], "--nonfinite-limit must be a fraction"),
    (["--set", "model.device=gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    # CUDA asked for where none is visible (hidden here): said once, not as a failure of every input
    (["--set", "model.device=cuda"], "model.device is 'cuda' but no NVIDIA GPU is visible here"),
])
def test_settings_errors_exit_2_before_any_work(env, tmp_path, capsys, monkeypatch, opts, words):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out, *opts)) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists()  # nothing was done


@pytest.mark.parametrize("opt", [["--train"], ["--finetune", "3"]])
def test_a_model_file_with_train_or_finetune_is_refused(env, tmp_path, capsys, opt):
    """--model FILE is used as it is: with --train or --finetune N the training option was dropped
    without a word (exit 0, nothing trained); now exit 2 naming both, before any work -- also in the API."""
    from stemfast.cli import main
    from stemfast.errors import SettingsError

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_batch_cli(_args(env, out, *opt))
    assert exc.value.code == EXIT_SETTINGS
    assert f"argument {opt[0]}: not allowed with argument --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(env["data"] / "good.npy"), "-o", str(out), "--model", str(env["a"]), *opt])
    assert exc.value.code == EXIT_SETTINGS
    assert f"argument {opt[0]}: not allowed with argument --model" in capsys.readouterr().err
    kw = {"train": True} if opt == ["--train"] else {"finetune": 3}
    with pytest.raises(SettingsError, match=f"--model {env['a']}.* cannot be combined with {opt[0]}"):
        run_batch(env["data"], out, config=env["cfg"], model_path=env["a"], **kw)
    assert not out.exists()


@pytest.mark.parametrize("cli, setting, named", [
    (["--plain-vae"], {"model.model": "vae"}, "model.model = 'vae' (--plain-vae)"),
    (["--latent-dim", "7"], {"model.latent_dim": 7}, "model.latent_dim = 7 (--latent-dim)")])
def test_a_model_file_with_architecture_settings_is_refused(env, tmp_path, capsys, cli, setting, named):
    """--model FILE with --plain-vae / --latent-dim: the options were ignored without a word, and
    OUT/stemfast.toml recorded them as the run's model. Now exit 2 naming them and the file's own
    architecture, before anything is written -- in the API too."""
    from stemfast.errors import SettingsError

    out = tmp_path / "out"
    assert run_batch_cli([str(env["data"]), "-o", str(out), "--model", str(env["a"]), *cli]) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert f"--model {env['a']} is used as it is (model rvae, latent_dim 4, input_size 16)" in err
    assert named in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(SettingsError, match=re.escape(named)):
        run_batch(env["data"], out, config=load_config(None, setting), model_path=env["a"], show_progress=False)
    assert not out.exists()


@pytest.mark.parametrize("command", ["batch", "analyze"])
@pytest.mark.parametrize("cli, setting, named", [
    (["--latent-dim", "4"], {"model.latent_dim": 4}, "model.latent_dim = 4 (--latent-dim)"),
    (["--set", "model.latent_dim=4"], {"model.latent_dim": 4}, "model.latent_dim = 4 (--latent-dim)"),
    (["--set", "model.input_size=24"], {"model.input_size": 24}, "model.input_size = 24 (--set model.input_size)"),
    (["--set", "model={latent_dim=4}"], {"model.latent_dim": 4}, "model.latent_dim = 4 (--latent-dim)")])
def test_an_architecture_option_at_its_default_value_is_checked_against_the_model_file(env, tmp_path, capsys,
                                                                                         command, cli, setting, named):
    """--model latent7.pt --latent-dim 4: 4 is the default, and the check of the architecture settings
    against the file saw only the resolved settings, where a typed default looks like none: the
    option was dropped without a word (exit 0, the file's latent 7 used). The command line now hands
    run_batch the options typed: exit 2 naming the option, its value and the file's, before any work
    (batch and analyze); the same in the API with ``given_settings``."""
    import dataclasses

    from stemfast.cli import main
    from stemfast.errors import SettingsError
    from stemfast.model import RVAE
    from stemfast.model.training import build_network

    mc = dataclasses.replace(env["cfg"].model, latent_dim=7, input_size=32)  # neither is the default
    latent7 = tmp_path / "latent7.pt"
    RVAE(build_network(mc), mc).save(latent7)
    out = tmp_path / "out"
    where = str(env["data"]) if command == "batch" else str(env["data"] / "good.npy")
    code = main([command, where, "-o", str(out), "--config", str(env["toml"]), "--model", str(latent7), *cli])
    err = capsys.readouterr().err
    assert code == EXIT_SETTINGS, err
    assert f"--model {latent7} is used as it is (model rvae, latent_dim 7, input_size 32)" in err
    assert named in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(SettingsError, match=re.escape(named)):
        run_batch(env["data"], out, config=load_config(env["toml"], setting), model_path=latent7,
                  show_progress=False, given_settings=set(setting))
    assert not out.exists()


def test_an_architecture_option_equal_to_the_model_files_is_fine(env, tmp_path, capsys):
    """--model FILE with --latent-dim / --set model.input_size of the file's own values (here: 4, the
    default, and 16): the run goes on with the file's architecture."""
    from stemfast.cli import main

    out = tmp_path / "out"
    assert main(["analyze", str(env["data"] / "good.npy"), "-o", str(out), "--config", str(env["toml"]),
                 "--model", str(env["a"]), "--latent-dim", "4", "--set", "model.input_size=16"]) == EXIT_OK
    assert parse_toml((out / "stemfast.toml").read_text())["model"]["latent_dim"] == 4
    assert (out / "good" / "done.json").exists()


def test_a_model_files_own_architecture_is_the_runs(env, tmp_path):
    """--model FILE with the default settings: OUT/stemfast.toml's [model] said input_size = 24 and
    channels = [8, 16, 32] (the defaults, ignored) for the tiny model of input 16, channels [8, 8, 8];
    summary.json named it "name": null. Now the record holds the file's architecture (and reads back
    as the same settings: a rerun with it is current), and the summaries and the report name the model."""
    from stemfast.config import config_hash

    out = tmp_path / "out"
    rep = run_batch(env["data"], out, model_path=env["a"], show_progress=False)
    assert {r.status for r in rep.results} == {"done"}
    rec = parse_toml((out / "stemfast.toml").read_text())["model"]
    assert (rec["model"], rec["latent_dim"], rec["input_size"], rec["channels"], rec["stn_channels"]) == \
        ("rvae", 4, 16, [8, 8, 8], [4, 8])
    again = load_config(out / "stemfast.toml")
    assert config_hash(again) == rep.config_hash
    assert {r.status for r in run_batch(env["data"], out, config=again, model_path=env["a"],
                                        show_progress=False).results} == {"current"}
    m = json.loads((out / "good" / "summary.json").read_text())["model"]
    assert (m["name"], m["version"], m["source"]) == ("trained model model_a.pt", None, str(env["a"]))
    assert (m["architecture"]["model"], m["architecture"]["latent_dim"], m["architecture"]["input_size"]) == \
        ("rvae", 4, 16)
    assert "trained model model_a.pt sha256" in (out / "report.html").read_text()
    assert "rvae, latent 4, input 16 px" in (out / "report.html").read_text()


def test_train_refuses_a_folder_as_output_before_training(env, tmp_path, capsys, monkeypatch):
    """stemfast train -o EXISTING_FOLDER trained fully, then failed naming a temporary file (exit 1), the
    model lost. -o names the model file: a folder is a settings error (exit 2) before any training."""
    import stemfast.batch
    from stemfast.cli import main

    def no_training(*a, **k):
        raise AssertionError("trained before -o was checked")

    monkeypatch.setattr(stemfast.batch, "train_batch_model", no_training)
    folder = tmp_path / "models"
    folder.mkdir()
    for o in (str(folder), str(tmp_path / "new") + os.sep):
        assert main(["train", str(env["data"] / "good.npy"), "-o", o]) == EXIT_SETTINGS
        err = capsys.readouterr().err
        assert f"-o {o}: is a folder; -o names the model file to write (e.g. -o " in err and "Traceback" not in err
    assert list(folder.iterdir()) == [] and not (tmp_path / "new").exists()


def test_train_refuses_a_device_that_is_not_here_before_any_work(env, tmp_path, capsys, monkeypatch):
    from stemfast.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever this machine has
    out = tmp_path / "m.pt"
    assert main(["train", str(env["data"] / "good.npy"), "-o", str(out), "--set", "model.device=cuda"]) == EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "model.device is 'cuda' but no NVIDIA GPU is visible here" in err and "Traceback" not in err
    assert not out.exists()


def test_spacing_that_does_not_fit_or_disagrees_with_the_image(env, tmp_path, capsys):
    from stemfast.cli import main

    img = env["data"] / "good.npy"
    # sites: a spacing that leaves fewer than 4 periods is a clear error; 1e9 a settings error
    assert main(["sites", str(img), "-o", str(tmp_path / "a.csv"), "--spacing", "100"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "spacing 100 px does not fit the 160 x 160 px image" in err
    assert main(["sites", str(img), "-o", str(tmp_path / "a.csv"), "--spacing", "1e9"]) == EXIT_SETTINGS
    assert "sites.spacing" in capsys.readouterr().err
    auto = json.loads((env["root"] / "trained" / "good" / "summary.json").read_text())["lattice"]["spacing_px"]
    # a spacing 20 % off, and one of sqrt(3) times the column spacing (the metal-metal distance)
    for sp, words in ((0.8 * auto, "differs from the image's own estimate"), (3 ** 0.5 * auto, "metal-metal distance")):
        assert main(["sites", str(img), "-o", str(tmp_path / "b.csv"), "--spacing", f"{sp:.3f}"]) == EXIT_OK
        err = capsys.readouterr().err
        assert "warning:" in err and words in err, err
    # in a batch the warning is in the summary, the result and the report
    out = tmp_path / "out"
    rep = run_batch(env["data"], out, config=load_config(env["toml"], {"sites.spacing": 3 ** 0.5 * auto}),
                    model_path=env["a"], show_progress=False)
    r = {x.name: x for x in rep.results}["good"]
    assert any("metal-metal" in w for w in r.warnings)
    s = json.loads((out / "good" / "summary.json").read_text())
    assert any("metal-metal" in w for w in s["warnings"])
    assert "metal-metal" in (out / "report.html").read_text()
    # and with the right spacing there is no spacing warning (the tiny test model's classes may still,
    # rightly, get the class-agreement warning of the analysis: that one is about the model)
    rep = run_batch(env["data"], tmp_path / "ok", config=load_config(env["toml"], {"sites.spacing": auto}),
                    model_path=env["a"], show_progress=False)
    assert all("spacing" not in w and "metal-metal" not in w for x in rep.results for w in x.warnings), \
        [x.warnings for x in rep.results]


# ----------------------------------------------------------------------------- 8. messages, not tracebacks


def test_unusable_output_folders_are_messages(env, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    assert run_batch_cli(_args(env, f)) == EXIT_ERROR
    assert f"{f} is a file, not a folder" in capsys.readouterr().err
    assert run_batch_cli(_args(env, f / "sub")) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot be created" in err and "file" in err and "Traceback" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the permission check say no
        import stemfast.outlock as L

        monkeypatch.setattr(L.os, "access", lambda p, m: False)
    else:
        ro.chmod(0o555)
    try:
        assert run_batch_cli(_args(env, ro)) == EXIT_ERROR
        assert f"{ro} is not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_a_non_model_file_as_model_is_refused_before_anything_is_copied(env, tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("this is not a model\n")
    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out)[:-1] + [str(bad)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"--model {bad}: not a stemfast model file" in err and "Traceback" not in err
    assert not (out / "model.pt").exists() and not (out / ".stemfast.lock").exists()


def test_a_later_run_with_another_model_keeps_the_model_earlier_results_were_made_with(env, tmp_path, capsys):
    """model.pt replaced by another --model on one input, then by the shipped model: the model the
    other inputs' done.json names stays in OUT as model.<sha12>.pt (said in the log and the batch
    summary) and, given again, finds those results current."""
    out, good = tmp_path / "out", str(env["data"] / "good.npy")
    sha_a, sha_b = file_sha256(env["a"]), file_sha256(env["b"])
    assert run_batch_cli(_args(env, out)) == EXIT_OK
    capsys.readouterr()
    assert run_batch_cli([good, "-o", str(out), "--config", str(env["toml"]), "--model", str(env["b"])]) == EXIT_OK
    kept_a = out / f"model.{sha_a[:12]}.pt"
    assert f"kept as {kept_a.name}" in capsys.readouterr().err
    assert file_sha256(out / "model.pt") == sha_b and file_sha256(kept_a) == sha_a
    assert json.loads((out / "other" / "done.json").read_text())["model_sha256"] == sha_a
    assert json.loads((kept_a.with_suffix(".json")).read_text())["sha256"] == sha_a
    assert json.loads((out / "batch_summary.json").read_text())["earlier_models"] == [
        {"file": kept_a.name, "sha256": sha_a}]
    # the shipped model replaces B, which good/done.json names: B is kept too
    assert run_batch_cli([good, "-o", str(out), "--no-companion"]) == EXIT_OK
    assert file_sha256(out / f"model.{sha_b[:12]}.pt") == sha_b and file_sha256(kept_a) == sha_a
    # A given again: the results made with it are current, nothing is redone
    assert run_batch_cli(_args(env, out)[:-1] + [str(kept_a)]) == EXIT_OK
    bs = json.loads((out / "batch_summary.json").read_text())
    assert {d["name"]: d["status"] for d in bs["inputs"]}["other"] == "current"


def test_an_input_whose_file_name_is_not_utf8_is_analysed_and_named(env, tmp_path):
    """A Latin-1 file name (caf\\xe9.npy from an old share) beside a good one: both are analysed, the
    undecodable byte is written as \\xE9 in stemfast.toml (which reads back as --config) and the report."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    shutil.copyfile(env["data"] / "good.npy", os.path.join(os.fsencode(data), b"caf\xe9.npy"))
    shutil.copyfile(env["data"] / "other.npy", data / "good.npy")
    assert run_batch_cli([str(data), "-o", str(out), "--model", str(env["a"])]) == EXIT_OK
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["counts"]["done"] == 2
    toml = (out / "stemfast.toml").read_text(encoding="utf-8")
    assert "caf\\xE9.npy" in parse_toml(toml)["inputs"]
    load_config(out / "stemfast.toml")
    assert "caf\\xE9.npy" in (out / "report.html").read_text(encoding="utf-8")


def test_sites_frame_counted_from_the_end_is_named_by_its_index(tmp_path, capsys):
    """stemfast sites --frame -1 wrote frame = -1 in the table; it is the last frame, n - 1."""
    from stemfast.cli import main
    from stemfast.synthetic import make_mos2

    stack = tmp_path / "stack.npy"
    np.save(stack, make_mos2(shape=(128, 128), seed=3, n_frames=3).image.astype(np.float32))
    a, b = tmp_path / "m1.csv", tmp_path / "f2.csv"
    assert main(["sites", str(stack), "--frame", "-1", "-o", str(a)]) == EXIT_OK
    assert main(["sites", str(stack), "--frame", "2", "-o", str(b)]) == EXIT_OK
    rows = list(csv.DictReader(a.open()))
    assert rows and {r["frame"] for r in rows} == {"2"}
    assert a.read_bytes() == b.read_bytes()
    assert main(["sites", str(stack), "--frame", "-4"]) == EXIT_SETTINGS
    assert "--frame -4: " in capsys.readouterr().err


@pytest.mark.parametrize("opts, want", [
    (["--set", "model.epochs=10", "--set", "model.max_train_patches=100"], (10, 100)),
    (["--config", "CFG"], (2, 100)),
    (["--train-patches", "70", "--epochs", "4"], (4, 70)),
    ([], (3, 5000)),  # the bench's own fallbacks where the user sets nothing
])
def test_bench_keeps_the_training_settings_the_user_set(tmp_path, monkeypatch, opts, want):
    """stemfast bench replaced --set model.epochs / model.max_train_patches and a --config's
    max_train_patches by its fallbacks (3 epochs, 5000 patches)."""
    import stemfast.pipeline as pipeline
    from stemfast.cli import main

    class Trained(Exception):
        pass

    def train_model(preps, config, **kw):
        raise Trained((config.model.epochs, config.model.max_train_patches))

    monkeypatch.setattr(pipeline, "train_model", train_model)
    cfg = tmp_path / "bench.toml"
    cfg.write_text("[model]\nmax_train_patches = 100\nepochs = 2\n")
    opts = [str(cfg) if o == "CFG" else o for o in opts]
    with pytest.raises(Trained) as got:
        main(["bench", "--size", "96", "--train", "--no-warmup", *opts])
    assert got.value.args[0] == want


@pytest.mark.parametrize("command, words", [
    (["demo", "--size", "0"], "argument --size: must be an integer >= {side}, got 0"),
    (["demo", "--size", "15"], "argument --size: must be an integer >= {side}, got 15"),
    (["bench", "--size", "8"], "argument --size: must be an integer >= {side}, got 8"),
    (["demo", "--n-images", "0"], "argument --n-images: must be an integer >= 1, got 0"),
    (["demo", "--n-images", "two"], "argument --n-images: must be an integer >= 1, got 'two'"),
    (["bench", "--frames", "0"], "argument --frames: must be an integer >= 1, got 0"),
])
def test_synthetic_sizes_and_counts_out_of_range_are_option_errors(tmp_path, monkeypatch, capsys, command, words):
    """demo --size 0 / bench --size 8 said "shape must be (height, width) with both >= 16, got (0, 0)"
    (no option named) and exited 1; demo --n-images 0 wrote no image, then "no micrographs found", exit 1.
    Now the parser's error naming the option and its range (the generator's smallest side), exit 2,
    nothing written."""
    from stemfast.cli import main
    from stemfast.synthetic import MIN_SIDE

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*command, *(["-o", "out"] if command[0] == "demo" else [])])
    assert exc.value.code == EXIT_SETTINGS
    assert words.format(side=MIN_SIDE) in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main([command[0], "--help"])
    assert f"image size in px, an integer >= {MIN_SIDE}" in capsys.readouterr().out.replace("side", "size")


def test_a_shortcut_and_a_set_of_the_same_setting_must_agree(env, tmp_path, capsys):
    """--set sites.spacing=10 --spacing 12: the shortcut won without a word; now exit 2 naming both
    (the same value twice is fine)."""
    from stemfast.cli import main

    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out, "--set", "sites.spacing=10", "--spacing", "12")) == EXIT_SETTINGS
    assert "--set sites.spacing=10 and --spacing 12.0 disagree" in capsys.readouterr().err
    assert not out.exists()
    assert main(["batch", str(env["data"]), "--set", "sites.spacing=10", "--spacing", "10", "--print-config"]) == 0
    assert "spacing = 10" in capsys.readouterr().out


def test_stemfast_toml_records_the_options_that_are_not_settings(env, tmp_path, capsys):
    """OUT/stemfast.toml said 'Reuse with: ... --config stemfast.toml', but --fill-nonfinite,
    --no-companion and the model choice were not in it: reused, another run came out. Now a [run]
    table records them (load_config ignores it) and the header names the options to repeat."""
    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out, "--fill-nonfinite", "--no-companion")) == EXIT_OK
    text = (out / "stemfast.toml").read_text()
    run = parse_toml(text)["run"]
    again = [f"--model {out / 'model.pt'}", "--fill-nonfinite", "--no-companion"]
    assert run["options"] == again
    assert (run["model"], run["model_sha256"], run["fill_nonfinite"], run["companions"]) == (
        "given", file_sha256(env["a"]), True, "none")
    assert f"# Reuse with: python -m stemfast batch DIR --config stemfast.toml {' '.join(again)}\n" in text
    assert load_config(out / "stemfast.toml") == env["cfg"]
    # repeated as the header says: the same record, nothing redone, the file untouched
    mtime = (out / "stemfast.toml").stat().st_mtime_ns
    args = [str(env["data"]), "-o", str(out), "--config", str(out / "stemfast.toml"), *" ".join(again).split()]
    capsys.readouterr()
    assert run_batch_cli(args) == EXIT_OK
    assert ": 2 current;" in capsys.readouterr().out and (out / "stemfast.toml").stat().st_mtime_ns == mtime


def test_config_file_problems_name_the_file(env, tmp_path, capsys):
    """--config: a cp1252 file or a binary one gave "'utf-8' codec can't decode byte 0x93 ..." without
    the file, a missing one a raw errno, and a UTF-8 BOM (Windows editors) 'Invalid statement' at 1:1."""
    cp = tmp_path / "cp1252.toml"
    cp.write_bytes(b"[model]\nepochs = 3 # \x93quoted\x94\n")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[model]\nepochs = 3\n")
    base = [str(env["data"]), "-o", str(tmp_path / "o"), "--print-config", "--config"]
    assert run_batch_cli(base + [str(cp)]) == EXIT_SETTINGS
    assert f"{cp}: not a UTF-8 text file (byte 0x93 at offset 21)" in capsys.readouterr().err
    assert run_batch_cli(base + [str(tmp_path / "nonexist.toml")]) == EXIT_SETTINGS
    assert f"--config {tmp_path / 'nonexist.toml'}: no such file" in capsys.readouterr().err
    assert run_batch_cli(base + [str(bom)]) == EXIT_OK
    assert "epochs = 3" in capsys.readouterr().out


def test_help_of_analyze_and_diagnose_says_the_defaults(capsys):
    """analyze -o said the default folder is 'next to the current folder' (it is in it); diagnose
    --help showed no defaults and no --seed help."""
    from stemfast.cli import main

    for cmd in ("analyze", "diagnose"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: ./STEM.stemfast, FILE's stem in the current folder" in out
    assert "default: [90.0, 180.0, 270.0, 17.0, 43.0]" in out and "random seed of the site subsets" in out
    assert "(default: all)" in out


def _listener(mode: str):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def run():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            if mode == "garbage":
                c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                c.close()

    threading.Thread(target=run, daemon=True).start()
    return srv


def test_scheduler_addresses_without_a_dask_scheduler_fail_fast(env, tmp_path, capsys):
    pytest.importorskip("dask.distributed")
    from stemfast.batch.dask import check_scheduler
    from stemfast.errors import SchedulerError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    assert run_batch_cli(_args(env, tmp_path / "o1", "--scheduler", f"tcp://127.0.0.1:{free}")) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"no Dask scheduler at tcp://127.0.0.1:{free}: connection refused" in err and "Traceback" not in err
    garbage = _listener("garbage")
    try:
        addr = f"tcp://127.0.0.1:{garbage.getsockname()[1]}"
        assert run_batch_cli(_args(env, tmp_path / "o2", "--scheduler", addr)) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "does not speak the Dask protocol" in err and "EiB" not in err and "Traceback" not in err
    finally:
        garbage.close()
    silent = _listener("silent")
    try:
        with pytest.raises(SchedulerError, match="did not greet as a Dask scheduler within 1 s"):
            check_scheduler(f"tcp://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
    finally:
        silent.close()
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "o1" / "model.pt").exists()


def test_ctrl_c_exits_130_releases_the_lock_and_leaves_nothing_half_written(env, tmp_path):
    out = tmp_path / "out"
    p = _cli(["batch", *_args(env, out)], {"STEMFAST_TEST_CRASH": "task_start:other", "STEMFAST_TEST_SIGNAL": "INT"},
             ctrl_c=True)
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-2000:]
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert not (out / ".stemfast.lock").exists() and not _leftovers(out)
    assert (out / "good" / "done.json").exists() and not (out / "other").exists()
    # the rerun finishes the batch
    assert run_batch_cli(_args(env, out)) == EXIT_OK


def test_ctrl_c_while_an_input_is_finished_finishes_the_next_one_already_analysed(env, tmp_path):
    """good's figures are drawn while other is analysed, then good is finished: a Ctrl-C there drops
    good's unfinished outputs (no done.json, nothing half-written) and still finishes other, whose
    analysis was done; the rerun redoes good only."""
    out = tmp_path / "out"
    p = _cli(["batch", *_args(env, out)], {"STEMFAST_TEST_CRASH": "before_done:good", "STEMFAST_TEST_SIGNAL": "INT"},
             ctrl_c=True)
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-2000:]
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert not (out / ".stemfast.lock").exists() and not _leftovers(out)
    assert not (out / "good").exists() and (out / "other" / "done.json").exists()
    other = (out / "other" / "done.json").stat().st_mtime_ns
    assert run_batch_cli(_args(env, out)) == EXIT_OK
    assert (out / "good" / "done.json").exists() and (out / "other" / "done.json").stat().st_mtime_ns == other


# ----------------------------------------------------------------------------- 9. quiet skips, --fill-nonfinite


def test_dangling_links_and_unreadable_folders_are_counted_and_listed(env, tmp_path, monkeypatch):
    import stemfast.io as io

    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    np.save(data / "good.npy", _image(1))
    np.save(data / "locked" / "hidden.npy", _image(2))
    os.symlink(data / "gone.tif", data / "lost.tif")
    real = io._scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(io, "_scandir", scandir)
    out = tmp_path / "out"
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    st = {Path(r.path).name: r for r in rep.results}
    assert st["good.npy"].status == "done"
    assert st["lost.tif"].status == "skipped" and "dangling symbolic link" in st["lost.tif"].reason
    assert st["locked"].status == "skipped" and "folder not readable (permission denied)" in st["locked"].reason
    assert rep.exit_code == EXIT_SKIPPED
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["n_inputs"] == 3 and bs["counts"]["skipped"] == 2
    assert {Path(s["path"]).name for s in bs["skipped"]} == {"lost.tif", "locked"}
    html = (out / "report.html").read_text()
    assert "lost.tif" in html and "folder not readable" in html
    # a rerun finds the same problems again: no work, nothing rewritten, still reported
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rep = run_batch(data, out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert not rep.did_work and rep.exit_code == EXIT_SKIPPED and len(rep.skipped) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_a_folder_of_only_unreadable_entries_still_gets_its_report(env, tmp_path, capsys):
    """Nothing to analyse, but something was skipped: the report the console points to exists and
    lists it, with the batch summary and the settings record."""
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(tmp_path / "gone.npy", data / "lost.npy")
    out = tmp_path / "out"
    assert run_batch_cli([str(data), "-o", str(out), "--config", str(env["toml"]), "--model", str(env["a"])]) \
        == EXIT_SKIPPED
    printed = capsys.readouterr()
    assert f"report: {out / 'report.html'}" in printed.out and "dangling symbolic link" in printed.err
    assert "lost.npy" in (out / "report.html").read_text() and (out / "stemfast.toml").exists()
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["n_inputs"] == 1 and bs["counts"]["skipped"] == 1


def test_fill_nonfinite_option(env, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    img = _image(1)
    few = img.copy()
    few[[10, 50, 90], [20, 60, 100]] = np.nan
    np.save(data / "few.npy", few)
    many = img.copy()
    many.flat[np.random.default_rng(0).choice(many.size, many.size // 3, replace=False)] = np.nan  # 33 %, scattered
    np.save(data / "many.npy", many)
    margin = img.copy()
    margin[:20] = np.nan  # 12.5 % of the pixels, but a margin (an aligned frame's padding): no damage to fill
    np.save(data / "margin.npy", margin)
    out = tmp_path / "out"
    base = [str(data), "-o", str(out), "--config", str(env["toml"]), "--model", str(env["a"])]
    assert run_batch_cli(base) == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert "--fill-nonfinite" in err  # the advice names the option
    # the margin alone is no damage: read without being asked (the scattered ones are skipped)
    st = {i["name"]: i for i in json.loads((out / "batch_summary.json").read_text())["inputs"]}
    assert st["margin"]["status"] == "done" and st["few"]["status"] == st["many"]["status"] == "skipped"
    m = json.loads((out / "margin" / "summary.json").read_text())
    assert any("all in regions without data" in w for w in m["warnings"])
    code = run_batch_cli(base + ["--fill-nonfinite"])
    err = capsys.readouterr().err
    assert code == EXIT_SKIPPED
    bs = json.loads((out / "batch_summary.json").read_text())
    st = {i["name"]: i for i in bs["inputs"]}
    assert st["few"]["status"] == "done" and st["many"]["status"] == "skipped"
    assert "more than the 1.00%" in st["many"]["reason"]
    assert st["margin"]["status"] == "current"  # done in the first run
    m = json.loads((out / "margin" / "summary.json").read_text())
    assert m["lattice"]["no_data"]["share"] == pytest.approx(20 / img.shape[0], abs=0.01)
    ys = [float(r["y"]) for r in csv.DictReader((out / "margin" / "sites.csv").open())]
    assert min(ys) > 20 - 0.5 * m["lattice"]["spacing_px"]
    s = json.loads((out / "few" / "summary.json").read_text())
    assert s["input"]["nonfinite_replaced"] == 3 and any("3 NaN" in w for w in s["warnings"])
    assert "warning:" in err and "3 NaN" in err
    # the filled result depends on the option: a rerun without it reads the file again (and skips it,
    # as a fresh run would), where it changes nothing (the margin, filled either way) it stays current
    assert run_batch_cli(base) == EXIT_SKIPPED
    st = {i["name"]: i for i in json.loads((out / "batch_summary.json").read_text())["inputs"]}
    assert st["few"]["status"] == "skipped" and st["margin"]["status"] == "current", st
    assert not (out / "few" / "done.json").exists()


def test_an_exported_picture_with_a_scale_bar_named_on_the_command_line(env, tmp_path, capsys):
    """A figure exported as an 8-bit PNG (the contrast stretched, 0.5 % clipped at each end) with a burnt-in
    scale bar and its text: named as a file it is analysed, the summary says it is a picture and where the
    annotation is (its text too, told by size from the columns the stretch clipped at the same white), and
    no site is judged on the bar; a folder search does not pick it up (a folder holds
    figures and earlier results' overlays too)."""
    from PIL import Image

    img = _image(1, shape=(200, 200))
    lo, hi = np.percentile(img, [0.5, 99.5])
    u8 = np.clip((img - lo) / (hi - lo) * 255, 0, 255).round().astype(np.uint8)
    u8[140:145, 20:120] = 255  # 4 sites were judged on it
    u8[124:134, 40:90] |= (np.random.default_rng(2).random((10, 50)) < 0.35).astype(np.uint8) * 255
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(u8).save(data / "figure.png")
    out = tmp_path / "out"
    assert run_batch_cli([str(data / "figure.png"), "-o", str(out), "--config", str(env["toml"]),
                          "--model", str(env["a"])]) == EXIT_OK
    err = capsys.readouterr().err
    assert "exported PNG picture" in err
    s = json.loads((out / "figure" / "summary.json").read_text())
    assert any("exported PNG picture" in w for w in s["warnings"])
    assert any("burnt-in annotation" in w for w in s["warnings"])
    x0, y0, x1, y1 = s["lattice"]["no_data"]["overlay"]["box"]
    # the bar and its text, whose strokes are larger than the columns the stretch clipped at the same white
    assert x0 <= 20 and x1 >= 119 and 120 <= y0 <= 125 and y1 >= 144
    rows = list(csv.DictReader((out / "figure" / "sites.csv").open()))
    on_bar = [r for r in rows if 139.5 <= float(r["y"]) <= 145.5 and 19.5 <= float(r["x"]) <= 120.5]
    assert not any(r["observed"] == "1" for r in on_bar)
    assert run_batch_cli([str(data), "-o", str(tmp_path / "out2"), "--config", str(env["toml"]),
                          "--model", str(env["a"])]) != EXIT_OK  # no micrograph in the folder
    err = capsys.readouterr().err
    assert "no micrographs found" in err and "1 exported picture(s), e.g. figure.png" in err


def test_an_input_skipped_for_its_settings_is_retried_with_other_settings(env, tmp_path):
    """A spacing that does not fit skips the input; that skip is not remembered for other settings."""
    out = tmp_path / "out"
    rep = run_batch(env["data"], out, config=load_config(env["toml"], {"sites.spacing": 100.0}),
                    model_path=env["a"], show_progress=False)
    st = {r.name: r for r in rep.results}
    assert st["good"].status == "skipped" and "does not fit the 160 x 160 px image" in st["good"].reason
    rep = run_batch(env["data"], out, config=env["cfg"], model_path=env["a"], show_progress=False)
    assert {r.name: r.status for r in rep.results} == {"good": "done", "other": "done"}


def test_training_names_a_spacing_that_does_not_fit(env, tmp_path):
    """Without --model the training sample reports the same reason (not 'no input had a lattice')."""
    from stemfast.batch import discover_inputs, train_batch_model

    skipped = {}
    model, info = train_batch_model(discover_inputs(env["data"]), load_config(env["toml"], {"sites.spacing": 100.0}),
                                    on_skip=lambda e, r: skipped.__setitem__(e.name, r), show_progress=False)
    assert model is None and set(skipped) == {"good", "other"}
    assert all("does not fit the 160 x 160 px image" in r for r in skipped.values())


def test_a_large_image_shows_a_bar_over_the_stages(monkeypatch, capsys):
    """One large image on a terminal: a bar moves through the pipeline's stages (named as they run)
    and is gone when the image is done; what the stages report stays a plain dict (pickled too)."""
    import pickle

    from stemfast import frontend
    from stemfast.logutil import StageTimings
    from stemfast.pipeline import analyze, prepare
    from stemfast.model.shipped import shipped_for_run
    from stemfast.config import load_config
    from stemfast.synthetic import make_mos2

    monkeypatch.setenv("STEMFAST_PROGRESS", "1")
    monkeypatch.setattr(frontend, "STAGE_BAR_PX", 100)  # "large" for the test: a 192 px image
    cfg = load_config()
    img = make_mos2(shape=(192, 192), seed=2).image
    prep = prepare(img, config=cfg)
    assert isinstance(prep.timings, StageTimings) and prep.timings.done == 6  # spacing .. patches
    table, summary = analyze(prep, shipped_for_run(cfg), config=cfg)
    assert prep.timings.done == 8 and len(table) > 50
    err = capsys.readouterr().err
    assert "192 x 192 image" in err and "8/8" in err
    for stage in ("bandpass", "lattice", "encode", "analysis"):
        assert stage in err, stage
    assert type(pickle.loads(pickle.dumps(prep.timings))) is dict
    assert summary["timings_s"] == dict(prep.timings)
    # progress off: a plain dict, no bar (off a terminal: log lines, tests/test_progress_log.py)
    monkeypatch.setenv("STEMFAST_PROGRESS", "0")
    assert type(prepare(img, config=cfg).timings) is dict


def test_a_batch_off_a_terminal_logs_its_progress(env, tmp_path, capsys, monkeypatch):
    """A batch whose stderr is a log file (a cluster job, nohup) wrote no progress at all: the bars
    show only on a terminal. Now the files' count goes to the log (INFO lines of stemfast.progress,
    without -v); STEMFAST_PROGRESS=0 still turns it off."""
    monkeypatch.delenv("STEMFAST_PROGRESS", raising=False)
    assert not sys.stderr.isatty()
    out = tmp_path / "out"
    assert run_batch_cli(_args(env, out)) == EXIT_OK
    captured = capsys.readouterr()
    lines = [s for s in captured.err.splitlines() if " INFO stemfast.progress: " in s]
    assert any(s.endswith("INFO stemfast.progress: analyse: 0/2 file (0%), 00:00 elapsed") for s in lines), lines
    assert "analyse: 2/2 file (100%)" in lines[-1] and len(lines) <= 4
    assert "stemfast.progress" not in captured.out
    monkeypatch.setenv("STEMFAST_PROGRESS", "0")
    assert run_batch_cli(_args(env, out, "--force")) == EXIT_OK
    assert "stemfast.progress" not in capsys.readouterr().err


def test_a_reused_model_of_another_input_size_gets_patches_of_its_own_size(env, tmp_path):
    """A model trained at 16 px patches (the tiny settings) reused with the default settings (24 px):
    the patches are cut at the model's recorded size and resampled to its own input size -- not to the
    settings' and again in the encoder, nor refused frame by frame."""
    out = tmp_path / "out"
    assert run_batch_cli([str(env["data"]), "-o", str(out), "--model", str(env["a"])]) == 0
    bs = json.loads((out / "batch_summary.json").read_text())
    assert bs["counts"]["done"] == 2 and bs["counts"]["failed"] == 0
    s = json.loads((out / "good" / "summary.json").read_text())
    assert s["n_sites"] > 0 and not any("input size" in w for w in s.get("warnings", []))


@pytest.mark.parametrize("steps, said", [(0, "; model trained (1.5 s)"), (20, "; model fine-tuned (20 steps, 1.5 s)")])
def test_the_console_says_whether_the_model_was_fine_tuned_or_trained(tmp_path, capsys, steps, said):
    """``batch --finetune 20`` adapts the shipped model: the console line said "model trained" as for
    ``--train``; it names the fine-tuning and its steps."""
    from stemfast.batch.results import BatchReport, InputResult
    from stemfast.cli.batch import print_report

    report = BatchReport(tmp_path, [InputResult("a", str(tmp_path / "a.npy"), "done")], "0" * 16,
                         model_trained=True, model_finetuned_steps=steps, train_seconds=1.5)
    print_report(report)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith(said), first
