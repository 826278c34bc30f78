"""How the ``stemfast`` program ends (:func:`stemfast.cli.run`): the exit status of the command,
the ``atexit`` handlers run, output flushed, and a thread still at work is waited for."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_run_exits_with_the_command_status_after_atexit_handlers_and_flushes(tmp_path):
    code = ("import atexit, pathlib, sys\n"
            "atexit.register(lambda: pathlib.Path('atexit_ran').write_text('yes'))\n"
            "sys.stdout.write('buffered, no newline')\n"
            "from stemfast import cli\n"
            "cli.run(['sites', 'no_such_file.tif'])\n"
            "pathlib.Path('after_run').write_text('must not happen')\n")
    r = _run(code, tmp_path)
    from stemfast.cli import main

    assert r.returncode == main(["sites", str(tmp_path / "no_such_file.tif")]) != 0
    assert (tmp_path / "atexit_ran").read_text() == "yes"
    assert r.stdout.startswith("buffered, no newline")
    assert not (tmp_path / "after_run").exists()  # run() does not return


def test_run_waits_for_a_thread_still_at_work(tmp_path):
    code = ("import pathlib, threading, time\n"
            "def work():\n"
            "    time.sleep(0.5)\n"
            "    pathlib.Path('thread_done').write_text('yes')\n"
            "threading.Thread(target=work).start()\n"
            "from stemfast import cli\n"
            "cli.run([])\n")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "thread_done").read_text() == "yes"
