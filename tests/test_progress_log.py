"""Progress off a terminal: INFO lines on the ``stemfast.progress`` logger at intervals (a cluster job's
or a ``nohup`` run's log was silent for minutes), none with ``STEMFAST_PROGRESS=0``, the tqdm bar
kept on a terminal."""
from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from stemfast import logutil
from stemfast.logutil import LOG_INTERVAL_S, PROGRESS_LOGGER, LogProgress, progress, tqdm_class


class _Clock:
    """A fake clock: ``step`` seconds pass at every reading."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 1000.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def off_terminal(monkeypatch):
    """stderr is not a terminal (pytest's capture, as a log file), STEMFAST_PROGRESS unset."""
    monkeypatch.delenv("STEMFAST_PROGRESS", raising=False)
    assert not sys.stderr.isatty()


def _lines(caplog) -> list[str]:
    """The progress lines logged (each record once: the fixture's handler may see it twice, on the
    stemfast logger and, where it propagates, on the root)."""
    records = {id(r): r for r in caplog.records if r.name == PROGRESS_LOGGER}
    return [r.getMessage() for r in records.values()]


def test_a_long_loop_off_a_terminal_logs_a_line_at_intervals(off_terminal, monkeypatch, stemfast_log, capsys):
    """2000 frames of 0.1 s (200 s) off a terminal: the bar wrote nothing at all; now a line at the
    start, at most one every LOG_INTERVAL_S s, and one at the end, through logging (nothing printed)."""
    clock = _Clock(0.1)  # one reading a frame: 0.1 s a frame
    monkeypatch.setattr(logutil, "_clock", clock)
    bar = progress(range(2000), desc="series", unit="frame")
    assert isinstance(bar, LogProgress)
    assert sum(1 for _ in bar) == 2000
    lines = _lines(stemfast_log)
    assert lines[0] == "series: 0/2000 frame (0%), 00:00 elapsed"
    assert re.fullmatch(r"series: 2000/2000 frame \(100%\), 03:2\d elapsed", lines[-1]), lines[-1]
    # 200 s: one line every 20 s at most, besides the first and the last
    assert 200 / LOG_INTERVAL_S <= len(lines) <= 200 / LOG_INTERVAL_S + 2, lines
    counts = [int(re.match(r"series: (\d+)/2000", s).group(1)) for s in lines]
    assert counts == sorted(counts) and all(b - a >= LOG_INTERVAL_S / 0.1 - 1 for a, b in zip(counts[1:-2], counts[2:-1]))
    assert "left" in lines[1] and capsys.readouterr().out == ""
    assert all(r.levelno == logging.INFO for r in stemfast_log.records if r.name == PROGRESS_LOGGER)


def test_nested_short_bars_add_no_lines_and_a_long_one_says_where_it_is(off_terminal, monkeypatch, stemfast_log):
    """A bar that does not stay (leave=False: the frames of each stack, the stages of an image) says
    nothing when it is done within the interval -- 500 stacks of 8 quick frames add no line -- and
    a line every interval while it runs longer, with what it is doing (the postfix)."""
    monkeypatch.setattr(logutil, "_clock", _Clock(0.01))
    outer = progress(total=500, desc="analyse", unit="file")
    for _ in range(500):
        for _ in progress(range(8), desc="stack", unit="frame", leave=False):
            pass
        outer.update(1)
    outer.close()
    lines = _lines(stemfast_log)
    assert not [s for s in lines if s.startswith("stack")], lines
    assert lines[0].startswith("analyse: 0/500") and lines[-1].startswith("analyse: 500/500 file (100%)")
    assert len(lines) <= 2 + (500 * 20 * 0.01) / LOG_INTERVAL_S + 1
    stemfast_log.clear()
    monkeypatch.setattr(logutil, "_clock", _Clock(12.0))
    stages = progress(total=4, desc="16384 x 16384 image", unit="stage", leave=False)
    for name in ("lattice", "patches", "encode", "analysis"):
        stages.set_postfix_str(name, refresh=False)
        stages.update(1)
    stages.close()
    lines = _lines(stemfast_log)
    assert lines and all(s.startswith("16384 x 16384 image: ") for s in lines)
    assert "2/4 stage (50%)" in lines[0] and lines[0].endswith("patches")
    assert lines[-1].startswith("16384 x 16384 image: 4/4 stage (100%)")


def test_progress_off_writes_no_line_and_a_terminal_keeps_the_bar(off_terminal, monkeypatch, stemfast_log):
    monkeypatch.setattr(logutil, "_clock", _Clock(30.0))
    monkeypatch.setenv("STEMFAST_PROGRESS", "0")
    for _ in progress(range(50), desc="series", unit="frame"):
        pass
    assert _lines(stemfast_log) == []
    monkeypatch.delenv("STEMFAST_PROGRESS")
    for _ in progress(range(50), desc="series", unit="frame", disable=True):  # show_progress=False callers
        pass
    assert _lines(stemfast_log) == []
    monkeypatch.setattr(sys, "stderr", _Tty())  # a terminal: tqdm's bar, as before
    bar = progress(range(3), desc="series")
    assert isinstance(bar, tqdm_class()) and not bar.disable
    assert sum(bar) == 3 and _lines(stemfast_log) == []
    assert "series: 100%" in sys.stderr.getvalue()


def test_a_large_image_off_a_terminal_logs_its_stages(off_terminal, monkeypatch, stemfast_log):
    """One large image (a 16k x 16k analyze) off a terminal: no stage bar at all before, minutes of
    silence; now the stages in the log while it runs long."""
    from stemfast import frontend
    from stemfast.config import load_config
    from stemfast.model.shipped import shipped_for_run
    from stemfast.pipeline import analyze, prepare
    from stemfast.synthetic import make_mos2

    monkeypatch.setattr(frontend, "STAGE_BAR_PX", 100)  # "large" for the test: a 192 px image
    monkeypatch.setattr(logutil, "_clock", _Clock(4.0))  # each stage "takes" seconds
    cfg = load_config()
    prep = prepare(make_mos2(shape=(192, 192), seed=2).image, config=cfg)
    analyze(prep, shipped_for_run(cfg), config=cfg)
    lines = _lines(stemfast_log)
    assert lines and all(s.startswith("192 x 192 image: ") for s in lines), lines
    assert lines[-1].startswith("192 x 192 image: 8/8 stage (100%)")
    assert len(lines) <= 8


def test_the_command_line_logs_progress_off_a_terminal_at_the_default_verbosity(off_terminal, monkeypatch, capsys):
    """The progress lines are INFO, and a run without -v logs WARNING and up: the progress logger is
    set to INFO by setup_logging, so a log file gets them without -v; STEMFAST_PROGRESS=0: none."""
    logutil.setup_logging(0)
    monkeypatch.setattr(logutil, "_clock", _Clock(1.0))
    try:
        for _ in progress(range(3), desc="analyse", unit="file"):
            pass
        logging.getLogger("stemfast.batch").info("not shown without -v")
        err = capsys.readouterr().err
        assert "INFO stemfast.progress: analyse: 0/3 file (0%)" in err and "analyse: 3/3 file (100%)" in err
        assert "not shown" not in err
    finally:
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.NOTSET)


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "No", "off", "OFF", " off ", ""])
def test_every_spelling_of_off_turns_progress_off(monkeypatch, value):
    """``STEMFAST_PROGRESS=off`` / ``FALSE`` / ``No`` forced tqdm bars into a log (the check was
    case-sensitive and left out "off", unlike the package's other switches)."""
    from stemfast.logutil import progress_mode

    monkeypatch.setenv("STEMFAST_PROGRESS", value)
    assert progress_mode() == "off"


@pytest.mark.parametrize("value", ["1", "yes", "on"])
def test_any_other_value_forces_the_bars(monkeypatch, value):
    from stemfast.logutil import progress_mode

    monkeypatch.setenv("STEMFAST_PROGRESS", value)
    assert progress_mode() == "bar"
