"""Benchmark of the figures (``stemfast.report``) of a 1024^2 image: the class map and the defect figure.

Reported, not gated (``report_ratio``; CPU time, one thread, paired like the gates):

* ``plot_class_map_vs_figure_tight_layout``: :func:`stemfast.report.plot_class_map` laid out by
  :func:`stemfast.figures.tight_layout` against the same figure laid out by ``Figure.tight_layout``,
  whose leftover placeholder layout engine makes ``savefig`` draw the figure a second time
  (without rendering). Asserted alongside: identical pixels.

* ``plot_defects_vs_axes_gallery``: :func:`stemfast.report.plot_defects` (the gallery of the 24 top
  candidates as one axes, PNG written at zlib level 1) against the implementation it replaced
  (one axes per tile, PNG at PIL's default level 6; kept below). Asserted alongside: both PNGs have
  the same size and the same pixels left of the gallery (the map with its numbered circles).
  Not gated: four recording runs gave 1.76, 1.74, 1.93 and 1.45 with a core busy (matplotlib's
  Python-level drawing follows the machine's load), so a floor at 0.7 x the minimum (1.01) could
  not even catch a return to the old implementation (ratio 1.0).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from stemfast import report as R
from stemfast.figures import pyplot

from conftest import MIN_CPU, paired_times, single_thread

QUICK = os.environ.get("STEMFAST_BENCH_QUICK", "0") not in ("0", "", "false", "no")


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:1024, 0:1024]
    img = (np.cos(xx * 0.45) * np.cos(yy * 0.39) + rng.normal(0, 0.3, xx.shape)).astype(np.float32)
    kinds = ["vacancy_Mo", "substitution_S", "vacancy_S2", "off_lattice"]
    cands = [{"x": float(rng.uniform(20, 1000)), "y": float(rng.uniform(20, 1000)),
              "anomaly_score": float(30 - i), "defect_kind": kinds[i % 4], "is_defect": i < 20,
              "rank": i + 1} for i in range(24)]
    patches = rng.normal(size=(24, 32, 32)).astype(np.float32)
    return img, cands, patches


def test_plot_defects_speed(benchmark, report_ratio, scene, tmp_path):
    img, cands, patches = scene
    ours, ref = tmp_path / "ours.png", tmp_path / "ref.png"
    with single_thread():
        a, b = paired_times(lambda: R.plot_defects(ours, img, cands, patches, spacing_px=14.0, title="t"),
                            lambda: _plot_defects_reference(ref, img, cands, patches, spacing_px=14.0, title="t"),
                            repeat=3, warmup=1, min_cpu=MIN_CPU)
    report_ratio("plot_defects_vs_axes_gallery", b.cpu / a.cpu, benchmark,
                 meaning="defect figure: one gallery axes + PNG zlib level 1 vs an axes per tile + level 6 (CPU)")
    a, b = np.asarray(Image.open(ours)), np.asarray(Image.open(ref))
    assert a.shape == b.shape
    # the map (left ~45% of the figure) is drawn the same way by both
    w = int(0.45 * a.shape[1])
    assert np.array_equal(a[:, :w], b[:, :w])
    # the gallery is there: its half of the figure is not blank
    assert a[:, w:].std() > 10


def test_plot_class_map_speed(benchmark, report_ratio, scene, tmp_path, monkeypatch):
    """The class map laid out by the tight-layout engine directly vs ``Figure.tight_layout`` (which
    leaves a placeholder engine that makes ``savefig`` draw the figure twice): the same pixels."""
    img = scene[0]
    rng = np.random.default_rng(5)
    n = 5000  # sites of a 1024^2 image at ~15 px spacing
    x, y = rng.uniform(0, 1023, n), rng.uniform(0, 1023, n)
    cid, isd = rng.integers(0, 3, n), rng.random(n) < 0.01
    ours, ref = tmp_path / "ours.png", tmp_path / "ref.png"

    def reference():
        with monkeypatch.context() as m:
            m.setattr(R, "tight_layout", lambda fig: fig.tight_layout())
            R.plot_class_map(ref, img, x, y, cid, is_defect=isd, spacing_px=15.0, title="t")

    with single_thread():
        a, b = paired_times(lambda: R.plot_class_map(ours, img, x, y, cid, is_defect=isd, spacing_px=15.0, title="t"),
                            reference, repeat=3, warmup=1, min_cpu=MIN_CPU)
    report_ratio("plot_class_map_vs_figure_tight_layout", b.cpu / a.cpu, benchmark,
                 meaning="class map: tight layout without a leftover layout engine (one draw) vs Figure.tight_layout (CPU)")
    assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(ref)))


def _plot_defects_reference(path, image, candidates, patches, *, spacing_px=None, title=None, max_gallery=24,
                            dpi=110) -> None:
    """``report.plot_defects`` before: an axes per gallery tile, PNG at zlib level 6 (the map half is
    the figure's own, :func:`stemfast.report.draw_candidate_map`)."""
    plt = pyplot()

    cands = list(candidates)[:max_gallery]
    n = len(cands)
    fig, gs, ncol = R.defects_layout(n)  # the layout is the figure's own too
    R.draw_candidate_map(fig.add_subplot(gs[0]), image, cands, spacing_px=spacing_px, title=title)
    if patches is not None and n:
        P = np.asarray(patches)[:n]
        lo, hi = R.display_range(P)
        tiles = gs[1].subgridspec(-(-n // ncol), ncol)  # the gallery's cell, an axes per tile
        for i, c in enumerate(cands):
            a = fig.add_subplot(tiles[i // ncol, i % ncol])
            a.imshow(P[i], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            rank = int(c.get("rank", i + 1))
            label = f"#{rank}"
            if c.get("frame") is not None and c.get("show_frame", False):
                label += f" f{int(c['frame'])}"
            label += f"  {float(c['anomaly_score']):.1f}"
            # the kind on a line of its own, with a break at its underscore, so long names such as
            # 'substitution_Mo' stay inside their tile instead of running into the neighbour's title
            kind = str(c.get("defect_kind", "") or "").replace("_", "\n", 1)
            a.set_title(f"{label}\n{kind}" if kind else label, fontsize=6.5, linespacing=0.95)
            for sp in a.spines.values():
                sp.set_edgecolor("#ff1744" if c.get("is_defect", True) else "#ffab00")
    try:
        fig.savefig(path, dpi=dpi, format="png")  # zlib level 6, PIL's default
    finally:
        plt.close(fig)
