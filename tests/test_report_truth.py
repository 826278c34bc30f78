"""What summary.json and report.html say of an input is what the analysis found: a polycrystal, an
uncertain lattice, a given spacing the image did not follow, a pixel size that is no length, a
calibration that does not fit the material; the reader's notes are notes, not warnings."""
from __future__ import annotations

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
    """Two halves 23 deg apart at 256 px: the site lattice is found 2.6x too fine (5.7 px for 15.2)
    and said to be uncertain (a best-found sublattice mostly placed)."""
    a = make_mos2(shape=(N, N), seed=2, rotation_deg=0).image
    b = make_mos2(shape=(N, N), seed=3, rotation_deg=23).image
    p = a.copy()
    p[:, N // 2:] = b[:, N // 2:]
    return p


def _save(folder, name: str, img, sidecar: dict | None = None) -> None:
    np.save(folder / f"{name}.npy", np.asarray(img, np.float32))
    if sidecar:
        (folder / f"{name}.json").write_text(json.dumps(sidecar))


def html_text(path) -> str:
    """report.html as text: the embedded figures and the tags left out."""
    t = re.sub(r"src='data:image/png;base64,[^']*'", "", path.read_text())
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", t))


def _section(text: str, name: str) -> str:
    """The input ``name``'s section of :func:`html_text` (from its heading to the next input's)."""
    part = text.split(f" {name} [", 1)[1]
    return re.split(r" \w+ \[(?:ok|partial|no lattice|current)\]", part, maxsplit=1)[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, monkeypatch_module):
    """One batch over a bicrystal, a 256 px image with a pixel size in 1/nm, one whose sidecar's
    field of view is 2x the true one and the 23 deg polycrystal whose lattice is found too fine."""
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
