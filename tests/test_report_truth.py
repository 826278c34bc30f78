"""What summary.json and report.html say of an input is what the analysis found: a polycrystal, an
uncertain lattice, a given spacing the image did not follow, a pixel size that is no length, a
calibration that does not fit the material; the reader's notes are notes, not warnings."""
from __future__ import annotations

import html
import json
import re
import warnings

import numpy as np
import pytest

from stemfast.synthetic import make_mos2

N = 256


def _two_grains(size: int = 320, misorientation: float = 27.0, base: float = 8.0) -> np.ndarray:
    """tests/test_grains.two_grains(320, 27, pixel_size_A=0.16): left half turned by ``base +
    misorientation``, right half by ``base``."""
    a = make_mos2(shape=(size, size), rotation_deg=base + misorientation, seed=0, pixel_size_A=0.16)
    b = make_mos2(shape=(size, size), rotation_deg=base, seed=1, pixel_size_A=0.16)
    left = np.arange(size)[None, :] < (size - 1) / 2.0
    return np.where(left, a.image, b.image).astype(np.float32)


def _poly() -> np.ndarray:
    """An image whose lattice is unsure: 60 % of it noise at the film's brightness (amorphous film or
    contamination; sites there are lattice-free). (Two 256 px halves 23 deg apart were the case here
    until the grains were found per grain: their lattice is now found right.)"""
    img = make_mos2(shape=(N, N), seed=2, rotation_deg=14).image.copy()
    c = int(0.4 * N)
    img[:, c:] = np.random.default_rng(2).poisson(img.mean(), size=(N, N - c))
    return img


def _save(folder, name: str, img, sidecar: dict | None = None) -> None:
    np.save(folder / f"{name}.npy", np.asarray(img, np.float32))
    if sidecar:
        (folder / f"{name}.json").write_text(json.dumps(sidecar))


def html_text(path) -> str:
    """report.html as text: the embedded figures and the tags left out."""
    t = re.sub(r"src='data:image/png;base64,[^']*'", "", path.read_text())
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", t)))


def _section(text: str, name: str) -> str:
    """The input ``name``'s section of :func:`html_text` (from its heading to the next input's)."""
    part = text.split(f" {name} [", 1)[1]
    return re.split(r" \w+ \[(?:ok|partial|no lattice|current)\]", part, maxsplit=1)[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, monkeypatch_module):
    """One batch over a bicrystal, a 256 px image with a pixel size in 1/nm, one whose sidecar's
    field of view is 2x the true one and one 60 % without lattice (its lattice unsure)."""
    from stemfast.batch import run_batch

    monkeypatch_module.setenv("STEMFAST_ENCODE_WORKER", "0")
    root = tmp_path_factory.mktemp("truth")
    data = root / "data"
    data.mkdir()
    _save(data, "bicrystal", _two_grains())
    _save(data, "unit", make_mos2(shape=(N, N), seed=6).image, {"pixel_size": 0.012, "unit": "1/nm"})
    _save(data, "calib", make_mos2(shape=(N, N), seed=5).image,
          {"field_of_view_x": 2 * N * 0.012, "field_of_view_units": "nm"})
    _save(data, "poly", _poly())
    out = root / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_batch(data, out, show_progress=False)
    return out, {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}, \
        html_text(out / "report.html")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_a_polycrystal_is_said_in_the_summary_and_the_report(batch):
    """The PolycrystalWarning went to the log only: summary.json had lattice.n_grains = 2 and no
    warning, the report neither a warning nor a line on the grains."""
    out, summ, text = batch
    s = summ["bicrystal"]
    lat = s["lattice"]
    assert lat["n_grains"] == 2 and lat["grain_warning"].startswith("the image holds 2 grains of different orientation")
    assert lat["grain_warning"] in s["warnings"]
    sec = _section(text, "bicrystal")
    assert "warning: the image holds 2 grains of different orientation" in sec
    row = sec.split("grains (orientation, share of the image) ", 1)[1][:40]
    a0, a1 = (f"{g['angle_deg']:.1f} deg ({100 * g['area_fraction']:.0f}%)" for g in lat["grains"])
    assert row.startswith(f"2: {a0}, {a1}"), row
    # one grain: no such line
    assert "grains (orientation" not in _section(text, "calib")


def test_an_uncertain_lattice_has_no_high_confidence(batch):
    """An uncertain lattice read a high confidence (the 23 deg polycrystal found 2.6x too fine, said to
    be uncertain: 0.99): capped now where the lattice is unsure, and the report says 'uncertain'
    instead of a number. (Here: an image 60 % without lattice.)"""
    from stemfast.sites import UNSURE_MAX_CONFIDENCE, find_sites

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lat = find_sites(_poly()).meta["lattice"]
    assert lat["unsure"] and lat["confidence"] <= UNSURE_MAX_CONFIDENCE < 0.9
    out, summ, text = batch
    s = summ["poly"]["lattice"]
    assert s["unsure"] and s["confidence"] <= UNSURE_MAX_CONFIDENCE
    assert "lattice confidence uncertain (see warning)" in _section(text, "poly")
    # a sure lattice keeps its number
    assert not summ["calib"]["lattice"]["unsure"] and summ["calib"]["lattice"]["confidence"] > 0.9
    assert f"lattice confidence {summ['calib']['lattice']['confidence']:.2f}" in _section(text, "calib")


def test_a_given_spacing_the_image_has_no_lattice_at_is_said(tmp_path, monkeypatch):
    """--spacing 26.3 on a 15.2 px lattice: no hexagon of Bragg spots at 26.3 px, the sites lie on the
    image's own 15.21 px lattice; summary.json said spacing_source 'given' and the report 'lattice
    from: the given spacing'. Now the source says it is the image's ring, with both numbers; the
    warnings say what the given spacing did (it sized the filters) instead of 'sites, classes and
    defects may be wrong' (the 340 sites and their sublattices are those of the run without it)."""
    from stemfast.batch import run_batch
    from stemfast.config import load_config
    from stemfast.sites import find_sites

    img = make_mos2(shape=(N, N), seed=1).image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = find_sites(img)
        for sp, source in ((26.3, "fft ring, not the given spacing"), (17.0, "fft ring, not the given spacing"),
                           (15.2, "given")):
            t = find_sites(img, spacing=sp)
            lat = t.meta["lattice"]
            assert (lat["spacing_source"], lat["given_spacing_px"]) == (source, sp), (sp, lat)
            assert abs(lat["spacing_px"] - auto.meta["spacing_px"]) < 0.05 and len(t) == len(auto)
    assert "given_spacing_px" not in auto.meta["lattice"] and auto.meta["lattice"]["spacing_source"] == "fft ring"
    monkeypatch.setenv("STEMFAST_ENCODE_WORKER", "0")
    _save(tmp_path, "good", img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_batch(tmp_path / "good.npy", tmp_path / "out", config=load_config(None, {"sites.spacing": 26.3}),
                  show_progress=False)
    s = json.loads((tmp_path / "out" / "good" / "summary.json").read_text())
    assert s["lattice"]["spacing_source"] == "fft ring, not the given spacing"
    assert s["lattice"]["given_spacing_px"] == 26.3 and abs(s["lattice"]["spacing_px"] - 15.21) < 0.05
    assert not any("may be wrong" in w for w in s["warnings"]), s["warnings"]
    assert any("the filters and the column search are sized for 26.3 px" in w for w in s["warnings"])
    assert any("the sites lie on the image's own lattice (15.21 px)" in w for w in s["warnings"])
    text = html_text(tmp_path / "out" / "report.html")
    assert ("lattice from the metal lattice's Bragg ring (prominence " in text
            and " at 15.21 px, not the given 26.30 px (which sized the filters and the column search only)" in text)


def test_the_ring_note_is_in_words(batch, tmp_path):
    """'{110}->{100}' (the strongest spots re-read as the first ring's, as on nearly every MoS2 image)
    stood in the report's 'lattice from' line; routine re-reads are left out, the others in words."""
    from stemfast.report import write_html_report

    out, summ, text = batch
    assert summ["calib"]["lattice"]["ring_note"] == "{110}->{100}"  # kept in summary.json
    assert "->" not in text and "{110}" not in text
    prom = f"{summ['calib']['lattice']['ring_prominence']:.0f}"
    assert f"lattice from the metal lattice's Bragg ring (prominence {prom}) lattice confidence" in _section(text, "calib")
    lat = {"spacing_px": 8.8, "spacing_source": "fft ring", "ring_prominence": 30.0, "unsure": [],
           "ring_note": "{110}->{100} {200}->{100} (columns on one coset of the lattice 2x as coarse)"}
    write_html_report(tmp_path / "report.html", batch={"inputs": [{"name": "img", "status": "ok"}]},
                      summaries=[{"name": "img", "status": "ok", "lattice": lat}], out_dir=tmp_path)
    assert ("lattice from the metal lattice's Bragg ring (prominence 30); re-read 2x coarser: the columns sat on "
            "one node in 4 lattice confidence") in html_text(tmp_path / "report.html")


def test_a_pixel_size_that_is_no_length_is_said(batch):
    """A sidecar {"pixel_size": 0.012, "unit": "1/nm"}: find_sites' CalibrationWarning went to the log
    only; summary.json had no field, the report showed 'pixel 0.012 1/nm' and spacing (nm) '-' with
    no reason."""
    from stemfast.sites import CalibrationWarning, find_sites

    out, summ, text = batch
    s = summ["unit"]
    why = s["input"]["calibration_ignored"]
    assert why.startswith("the pixel size's unit '1/nm' is not a length unit") and "0.012 1/nm is not used" in why
    assert why in s["warnings"] and "spacing_nm" not in s["lattice"] and "calibration_ok" not in s["lattice"]
    sec = _section(text, "unit")
    assert "pixel 0.012 1/nm (not used: see warning)" in sec and f"warning: {why}" in sec
    # find_sites says the same, in its warning and its meta
    img = make_mos2(shape=(N, N), seed=6).image
    with pytest.warns(CalibrationWarning, match="is not a length unit") as caught:
        t = find_sites(img, pixel_size=0.012, unit="1/nm")
    assert t.meta["calibration_ignored"] == why and why in [str(w.message) for w in caught]
    assert "calibration_ignored" not in summ["calib"]["input"]  # a length: used


def _drawn_defects(monkeypatch, shape=(256, 256), title="img: top defect candidates"):
    """The figure plot_defects draws for 24 candidates (4 flagged) on an image of ``shape``, with the
    batch's title, not saved."""
    import stemfast.report as R

    drawn = []
    monkeypatch.setattr(R, "save_figure", lambda fig, path, dpi: drawn.append(fig))
    rng = np.random.default_rng(0)
    cands = [{"x": 20.0 + 8 * i, "y": 30.0 + 3 * i, "anomaly_score": 9.0 - 0.3 * i, "is_defect": i < 4,
              "defect_kind": "vacancy_S2" if i < 4 else "none"} for i in range(24)]
    R.plot_defects("unused.png", rng.random(shape).astype(np.float32), cands,
                   rng.random((24, 15, 15)).astype(np.float32), spacing_px=10.0, title=title)
    (fig,) = drawn
    return fig


@pytest.mark.parametrize("shape", [(256, 256), (100, 512)])
def test_the_defect_figure_says_what_its_circles_mean_whatever_its_title(monkeypatch, shape):
    """'solid: flagged defect, dashed: below cutoff' was the map's default title only; the batch gives
    its own title ('<name>: top defect candidates'), so no figure the batch wrote said it, nor what red
    and orange mean. A legend says it whatever the title; the labels are 10 pt, not 6.5; the map fills
    the figure's height (a third of the figure was empty)."""
    import stemfast.report as R

    fig = _drawn_defects(monkeypatch, shape)
    the_map, gallery = fig.axes
    assert the_map.get_title() == "img: top defect candidates"
    leg = the_map.get_legend()
    assert leg is not None and [t.get_text() for t in leg.get_texts()] == [R.FLAGGED_LABEL, R.BELOW_CUTOFF_LABEL]
    assert "flagged defect" in R.FLAGGED_LABEL and "below the cutoff" in R.BELOW_CUTOFF_LABEL
    lines = leg.get_lines()
    assert [ln.get_color() for ln in lines] == [R.FLAGGED_COLOUR, R.BELOW_CUTOFF_COLOUR]
    assert [ln.get_linestyle() for ln in lines] == ["-", "--"]
    # the circles on the map and the frames in the gallery are drawn as the legend says
    circles = [(p.get_edgecolor(), p.get_linestyle()) for p in the_map.patches]
    frames = [(p.get_edgecolor(), p.get_linestyle()) for p in gallery.patches]
    from matplotlib.colors import to_rgba
    flagged, below = (to_rgba(R.FLAGGED_COLOUR), "-"), (to_rgba(R.BELOW_CUTOFF_COLOUR), "--")
    assert circles == frames == [flagged] * 4 + [below] * 20
    assert gallery.get_title() == R.GALLERY_TITLE and "#rank, anomaly score, defect kind" in R.GALLERY_TITLE
    labels = [t for t in gallery.texts if t.get_text().startswith("#")]
    assert len(labels) == 24 and min(t.get_fontsize() for t in labels) >= 10
    assert min(t.get_fontsize() for t in the_map.texts) >= 9  # the ranks on the map
    if shape[0] == shape[1]:
        the_map.apply_aspect()
        assert the_map.get_position().height > 0.8, the_map.get_position()
    R.pyplot().close(fig)


def test_the_report_says_what_the_defect_figure_shows(batch):
    """The report's input section has a caption for defects.png (the legend in words), and the figure
    has a row of its own (beside the class map it was shown 620 px wide for its 1650 px)."""
    from stemfast.report import BELOW_CUTOFF_LABEL, FLAGGED_LABEL

    out, summ, text = batch
    sec = _section(text, "calib")
    assert (f"Solid red circle and frame: {FLAGGED_LABEL}; dashed orange: {BELOW_CUTOFF_LABEL}. Each patch is "
            "labelled #rank, anomaly score, defect kind.") in sec
    page = (out / "report.html").read_text()
    assert re.search(r"<p class='caption'>Top defect candidates[^<]*</p><img alt='calib defects'", page)
    assert "<div class='grid'><div><img alt='calib classes'" not in page


def test_a_calibration_that_does_not_fit_is_worded_once(batch):
    """The batch worded the calibration warning itself from raw values ('predict a site spacing of
    7.6018 px, the image shows 15.2073 px'), find_sites' CalibrationWarning with two decimals, the
    difference in percent and the pixel size: summary.json and the report now say find_sites' words."""
    from stemfast.sites import CalibrationWarning, find_sites

    out, summ, text = batch
    s = summ["calib"]
    lat = s["lattice"]
    assert lat["calibration_ok"] is False
    w = lat["calibration_warning"]
    assert w.startswith("the pixel size (0.024 nm) and MoS2's lattice constant")
    assert f"predict a site spacing of {lat['calibration_expected_spacing_px']:.2f} px; the image shows" in w
    assert re.search(r"the image shows 15\.2\d px \(\+\d+\.\d%\): check the calibration or the material", w), w
    assert [x for x in s["warnings"] if "predict a site spacing" in x] == [w]
    assert "7.6018" not in text and f"warning: {w}" in _section(text, "calib")
    img = make_mos2(shape=(N, N), seed=5).image
    with pytest.warns(CalibrationWarning) as caught:
        t = find_sites(img, pixel_size=0.024, unit="nm")
    assert str([c for c in caught if c.category is CalibrationWarning][0].message) == t.meta["lattice"]["calibration_warning"]


def test_the_readers_facts_are_notes_not_warnings(batch):
    """'pixel size from the sidecar calib.json (...)' was listed and shown as 'warning:' and counted in
    the inputs table ('2 warnings' for the calibration one's input): it is a note; a note that qualifies
    the results (a pixel size not used) stays a warning."""
    out, summ, text = batch
    s = summ["calib"]
    fact = next(n for n in s["input"]["notes"] if n.startswith("pixel size from the sidecar calib.json"))
    assert fact not in s["warnings"] and "read_warnings" not in s["input"]
    sec = _section(text, "calib")
    assert f"note: {fact}" in sec and f"warning: {fact}" not in sec
    overview = text.split(" calib [", 1)[0]
    assert re.search(r"calib done \(1 warning\)", overview), overview[-400:]
    u = summ["unit"]
    assert u["input"]["read_warnings"] == [u["input"]["calibration_ignored"]]
    assert re.search(r"unit done \(1 warning\)", overview)
    assert "note: pixel size from the sidecar unit.json" in _section(text, "unit")
