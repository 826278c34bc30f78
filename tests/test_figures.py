"""The figures of an input are drawn side by side on two cores (:func:`stemfast.figures.draw_side_by_side`):
nothing the batch starts may leave a thread running when they are drawn, or the figures are drawn one
after the other."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from stemfast.logutil import progress

from test_backend import PYTHON_DIR


def test_progress_bars_start_no_thread():
    """tqdm starts a monitor thread with its first bar, shown or not, and keeps it while a bar is open:
    a batch's per-file bar is open while each input's figures are drawn."""
    before = threading.active_count()
    with open(os.devnull, "w") as sink:
        shown = progress(range(3), disable=False, file=sink)
        hidden = progress(range(3), disable=True)
        try:
            for _ in zip(shown, hidden):
                assert threading.active_count() == before, [t.name for t in threading.enumerate()]
        finally:
            shown.close()
            hidden.close()


def test_analyze_draws_its_two_figures_in_two_processes(tmp_path):
    """``stemfast analyze`` of an image, in a fresh interpreter as a user runs it: when the figures are
    drawn nothing makes forking unsafe (no torch with the shipped model's compiled engine, no thread),
    so the class map is drawn in a child process while the defect figure is drawn here."""
    from stemfast.synthetic import make_mos2

    np.save(tmp_path / "img.npy", make_mos2(shape=(192, 192), seed=1).image.astype(np.float32))
    code = f"""
import stemfast.figures as F
import stemfast.batch.outputs  # noqa: F401
from stemfast.cli import main
seen = []
draw = F.draw_side_by_side
def spy(jobs):
    seen.append((len(jobs), F._fork_unsafe()))
    draw(jobs)
F.draw_side_by_side = spy
assert main(["analyze", {str(tmp_path / "img.npy")!r}, "-o", {str(tmp_path / "out")!r}]) == 0
print("SEEN", seen)
"""
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, STEMFAST_PROGRESS="1")
    env.pop("STEMFAST_FIGURE_FORK", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SEEN [(2, None)]" in r.stdout, r.stdout[-500:]
    assert (tmp_path / "out" / "img" / "classes.png").stat().st_size > 0
    assert (tmp_path / "out" / "img" / "defects.png").stat().st_size > 0


@pytest.mark.parametrize("shape, above", [((100, 512), True), ((512, 100), False), ((256, 256), False)])
def test_a_wide_map_is_drawn_across_the_figure_above_its_gallery(monkeypatch, shape, above):
    """The defect figure: a map at least twice as wide as high above the gallery, across the figure (beside
    it, a 100 x 512 px strip filled a sixth of the figure's height); any other map beside it."""
    import stemfast.report as R

    drawn = []
    monkeypatch.setattr(R, "save_figure", lambda fig, path, dpi: drawn.append(fig))
    rng = np.random.default_rng(0)
    img = rng.random(shape).astype(np.float32)
    cands = [{"x": 20.0 + i, "y": 30.0, "anomaly_score": 3.0 - 0.1 * i} for i in range(24)]
    R.plot_defects("unused.png", img, cands, rng.random((24, 15, 15)).astype(np.float32), spacing_px=10.0)
    (fig,) = drawn
    the_map, gallery = (ax.get_position() for ax in fig.axes)
    if above:
        assert the_map.y0 > gallery.y1 and the_map.width > 0.7 and gallery.width > 0.7
    else:
        assert the_map.x1 < gallery.x0
    R.pyplot().close(fig)
