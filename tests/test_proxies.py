"""benchmarks/wse2_proxies.py: the held-out-like copies of a labelled image keep each label on the
pixel it labelled (rotation, flip, row jumps move the labels with the image; streaks and
contamination only add to the image)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def proxies(benchmark_script):
    return benchmark_script("wse2_proxies")


def _labelled_image(rng, shape=(96, 128), n=60):
    img = rng.uniform(0.0, 1.0, shape)
    xy = np.column_stack([rng.integers(0, shape[1], n), rng.integers(0, shape[0], n)]).astype(float)
    return img, xy


def _at(img, xy):
    return img[xy[:, 1].astype(int), xy[:, 0].astype(int)]


def test_every_label_stays_on_its_pixel(proxies):
    img, xy = _labelled_image(np.random.default_rng(0))
    out = proxies.make_proxies(img, xy, seeds=(0, 1))
    assert set(out) == {"rot90", "flip", "rowjump0", "rowjump1", "streak0", "streak1", "contam0", "contam1"}
    for name in ("rot90", "flip", "rowjump0", "rowjump1"):
        im, lab = out[name]
        inside = (lab[:, 0] >= 0) & (lab[:, 0] < im.shape[1])
        assert inside.all(), name
        np.testing.assert_array_equal(_at(im, lab), _at(img, xy), err_msg=name)
    assert out["rot90"][0].shape == img.shape[::-1]


def test_glitches_change_the_image_not_the_labels(proxies):
    img, xy = _labelled_image(np.random.default_rng(1))
    out = proxies.make_proxies(img, xy, seeds=(3,))
    for name in ("streak3", "contam3"):
        im, lab = out[name]
        np.testing.assert_array_equal(lab, xy)
        assert im.shape == img.shape and not np.allclose(im, img)
    changed_rows = np.flatnonzero(np.any(out["streak3"][0] != img, axis=1))
    assert 1 <= len(changed_rows) <= 6  # single scan lines
    jumped = np.flatnonzero(np.any(out["rowjump3"][0] != img, axis=1))
    assert 5 <= len(jumped) <= 3 * 40  # up to 3 bands of 5-40 lines


def test_proxy_files_round_trip(proxies, tmp_path):
    import stemfast

    img, xy = _labelled_image(np.random.default_rng(2))
    np.save(tmp_path / "im.npy", img.astype(np.float32))
    with open(tmp_path / "im.labels.csv", "w") as fh:
        fh.write("x,y,class_id,class_name\n")
        fh.writelines(f"{x:.3f},{y:.3f},0,W\n" for x, y in xy)
    assert proxies.main([str(tmp_path / "im.npy"), str(tmp_path / "im.labels.csv"), str(tmp_path / "out"),
                         "--seeds", "0"]) == 0
    im = stemfast.read(tmp_path / "out" / "im_rot90.npy").data
    lab, rows = proxies._read_labels(tmp_path / "out" / "im_rot90.labels.csv")
    assert len(rows) == len(xy) and rows[0]["class_name"] == "W"
    np.testing.assert_allclose(_at(np.asarray(im), lab), _at(img, xy).astype(np.float32))


def test_mos2_distorted_copies_move_a_point_as_their_matrix_says(benchmark_script):
    """benchmarks/mos2_proxies.py's scan-distorted copies: the copy at ``p`` shows the input at
    ``M (p - centre) + centre``, so an off-centre dot lands where the matrix says (within a pixel);
    the area scales are the matrices' inverse determinants (what the checker's spacing is scaled by)."""
    mp = benchmark_script("mos2_proxies")
    img = np.zeros((101, 121), np.float32)
    q = np.array([80.0, 95.0])  # (row, col) of a bright dot, off the centre
    img[80, 95] = 1.0
    centre = np.array(img.shape, np.float64) / 2
    for name, (M, area) in mp.DISTORTIONS.items():
        M = np.asarray(M, np.float64)
        assert abs(1 / np.linalg.det(M) - area) < 1e-12, name
        out = mp.distorted(img, name)
        assert out.shape == img.shape and out.dtype == np.float32
        want = np.linalg.solve(M, q - centre) + centre  # out(p) = in(M (p - centre) + centre)
        got = np.array(np.unravel_index(np.argmax(out), out.shape))
        assert np.abs(got - want).max() <= 1.0, (name, got, want)
