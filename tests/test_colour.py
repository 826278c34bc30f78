"""Colour images made grey (stemfast.colour): grey saved as colour, false colour read back through its
colour map, colour marks on a grey picture, and an unknown map said to be unreliable."""
from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest

from real_data import DATA, labelled_ap, read_labels
from stemfast.colour import COLOUR_MAPS, _map_colours, colour_note, grey_from_colour


def _mapped(u: np.ndarray, name: str) -> np.ndarray:
    """uint8 RGB: ``u`` in [0, 1] through map ``name`` (256 levels), as a picture exports it."""
    lut = _map_colours(name) if name == "fire" else matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return (lut[np.round(u * 255).astype(int)] * 255).round().astype(np.uint8)


def _crop01() -> np.ndarray:
    img = np.load(DATA / "wse2_ti2_haadf_crop.npy").astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / (hi - lo), 0, 1)


def test_grey_saved_as_colour_is_read_as_it_is():
    g = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    grey, how = grey_from_colour(np.dstack([g, g, g, np.full_like(g, 255)]))
    assert how == {"kind": "grey"} and grey.dtype == np.float32 and (grey == g).all()


@pytest.mark.parametrize("name", ["fire", "viridis", "inferno", "jet", "turbo", "hot", "gray"])
def test_a_false_colour_picture_is_read_back_through_its_map(name):
    """Every level of a ramp exported through a common colour map comes back (to the 8-bit level); a
    reversed map comes back reversed (the columns' bright-or-dark test turns it round)."""
    u = np.tile(np.linspace(0, 1, 256), (4, 1))
    rgb = _mapped(u, name)
    grey, how = grey_from_colour(rgb)
    assert how["kind"] == ("grey" if name == "gray" else "false colour")
    assert how.get("map", name) == name, how
    # each level of a colour the map holds once comes back; a run of levels of one colour (jet's and
    # Fire's saturated ends) cannot be told apart: it comes back as a level of that colour
    level = np.round(grey[0]).astype(int)
    assert (np.abs(rgb[0, level].astype(int) - rgb[0].astype(int)) <= 1).all()
    once = np.array([(rgb[0] == c).all(axis=1).sum() == 1 for c in rgb[0]])
    assert once.mean() > 0.8 and np.abs(grey[0, once] - 255 * u[0, once]).max() <= 0.6
    if name in ("viridis", "jet"):
        back, how_r = grey_from_colour(rgb[:, ::-1])
        assert how_r["map"] == name and (back == grey[:, ::-1]).all()


@pytest.mark.parametrize("scale, dtype", [(65535, np.uint16), (4095, np.uint16), (1.0, np.float32)])
def test_a_false_colour_image_of_more_bits_is_read_on_its_own_full_scale(scale, dtype):
    """16-bit colour, 12-bit colour in a 16-bit file (its full colour at 4095, not 65535: read against
    65535 every colour was dark and a dark map fitted) and float colour in [0, 1]."""
    u = np.tile(np.linspace(0, 1, 256), (4, 1))
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    rgb = (lut[np.round(u * 255).astype(int)] * scale).round().astype(dtype) if dtype != np.float32 else \
        lut[np.round(u * 255).astype(int)].astype(np.float32)
    grey, how = grey_from_colour(rgb)
    assert how["kind"] == "false colour" and how["map"] == "viridis"
    np.testing.assert_allclose(grey / scale, u, atol=1.0 / 255)
    if dtype == np.uint16 and scale == 65535:  # a dark picture of 8-bit colour: still read on 255
        dark = _mapped(0.3 * u, "inferno")
        assert dark.max() < 128
        grey, how = grey_from_colour(dark)
        assert how["map"] == "inferno"
        np.testing.assert_allclose(grey / 255, np.round(0.3 * u * 255) / 255, atol=1.0 / 255)


def test_the_real_wse2_crop_in_jet_ranks_its_defects_as_in_grey():
    """The labelled WSe2 HAADF crop exported through jet: read by luminance (the way colour was read
    before) its defect ranking was near chance -- jet's luminance rises and falls twice over the range;
    read back through the map, as in grey."""
    from stemfast.config import PipelineConfig, apply_overrides
    from stemfast.model.shipped import shipped_for_run

    cfg = apply_overrides(PipelineConfig(), {"sites.material": "wse2"})
    model = shipped_for_run(cfg)
    lxy, lname = read_labels()
    u = _crop01()
    rgb = _mapped(u, "jet")
    grey, how = grey_from_colour(rgb)
    assert how["kind"] == "false colour" and how["map"] == "jet"
    ap_grey, _ = labelled_ap(np.round(u * 255), lxy, lname, cfg, model)
    ap_jet, _ = labelled_ap(grey, lxy, lname, cfg, model)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    ap_lum, _ = labelled_ap(lum, lxy, lname, cfg, model)
    assert abs(ap_jet - ap_grey) <= 0.01 and ap_lum < ap_grey - 0.3, (ap_jet, ap_grey, ap_lum)


def test_colour_marks_on_a_grey_or_false_colour_picture_become_its_white_and_an_annotation():
    """A scale bar and its text drawn in yellow on a grey picture, or in white on a jet one: set to the
    picture's white, where find_sites finds them as a burnt-in annotation (no data). (The picture's
    range ends below its white: where the export clipped the brightest columns at the top too, only the
    bar is taken -- tests/test_nodata.py.)"""
    from stemfast.sites import find_sites

    u = 0.94 * _crop01()
    rng = np.random.default_rng(7)
    drawn = np.zeros(u.shape, bool)
    drawn[220:225, 40:130] = True
    drawn[200:212, 60:110] |= rng.random((12, 50)) < 0.35
    grey_rgb = np.repeat(np.round(u * 255).astype(np.uint8)[..., None], 3, 2)
    grey_rgb[drawn] = (255, 255, 0)
    jet_rgb = _mapped(u, "jet")
    jet_rgb[drawn] = 255
    for rgb, kind in ((grey_rgb, "grey with colour marks"), (jet_rgb, "false colour")):
        grey, how = grey_from_colour(rgb)
        assert how["kind"] == kind and how["marks"] == drawn.sum() and (grey[drawn] == grey.max()).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = find_sites(grey)
        # the annotation found covers what was drawn (to a pixel)
        x0, y0, x1, y1 = t.meta["lattice"]["no_data"]["overlay"]["box"]
        assert x0 <= 41 and y0 <= 201 and x1 >= 128 and y1 >= 224, (x0, y0, x1, y1)


@pytest.mark.parametrize("picture", ["twilight", "jet as JPEG"])
def test_colour_no_known_map_fits_is_read_by_luminance_and_said_to_be_unreliable(picture, tmp_path):
    """A cyclic map (twilight: not invertible, not among the maps) and a jet picture saved as JPEG (its
    chroma subsampling smears the colours of 5 px columns off the map): read by luminance, with the
    advice to export in grey."""
    from PIL import Image

    u = _crop01()
    if picture == "twilight":
        assert "twilight" not in COLOUR_MAPS
        rgb = _mapped(u, "twilight")
    else:
        Image.fromarray(_mapped(u, "jet")).save(tmp_path / "jet.jpg", quality=85)
        rgb = np.asarray(Image.open(tmp_path / "jet.jpg"))
    grey, how = grey_from_colour(rgb)
    assert how["kind"] == "luminance" and how["fit"] > 0.04
    assert "export the image in grey" in colour_note(how)


@pytest.mark.parametrize("kind", ["grey", "jet"])
def test_a_large_colour_picture_is_made_grey_block_by_block(kind):
    """A 16k x 16k export read as colour is 0.8 GB of bytes; made grey all at once it needed ~6 GB (grey)
    to ~20 GB (false colour) of float copies. Converted a block of pixels at a time, the memory beyond
    the result stays within a block's temporaries, and every pixel is what the whole-picture
    conversion gives (here: blocks of a few pixels against one block)."""
    import tracemalloc

    from stemfast import colour

    v = np.random.default_rng(3).integers(0, 256, (2048, 4096), dtype=np.uint8)
    lut = (matplotlib.colormaps["jet"](np.arange(256))[:, :3] * 255).round().astype(np.uint8)
    rgb = np.repeat(v[..., None], 3, 2) if kind == "grey" else lut[v]
    tracemalloc.start()
    try:
        grey, how = grey_from_colour(rgb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert how["kind"] == ("grey" if kind == "grey" else "false colour")
    assert peak <= grey.nbytes + 96 * 2**20  # whole-picture float copies: 3 x 4 bytes a pixel and more
    small = rgb[:64, :96]
    whole, how_whole = grey_from_colour(small)
    old = colour._BLOCK
    try:
        colour._BLOCK = 7
        blocked, how_blocked = grey_from_colour(small)
    finally:
        colour._BLOCK = old
    np.testing.assert_array_equal(blocked, whole)
    assert how_blocked == how_whole
