"""stemfast.blocks: block means of large images."""
import numpy as np
import pytest

from stemfast.blocks import block_means


@pytest.mark.parametrize("shape, f", [((64, 64), 1), ((64, 64), 2), ((64, 64), 4), ((67, 130), 4), ((101, 83), 5),
                                      ((1030, 70), 16), ((5, 9), 32)])
@pytest.mark.parametrize("square", [False, True])
def test_block_means_are_the_float64_means_of_whole_blocks(shape, f, square):
    rng = np.random.default_rng(0)
    img = rng.normal(10.0, 3.0, shape).astype(np.float32)
    fe = min(f, *shape)  # at most the short side
    h, w = shape[0] // fe, shape[1] // fe
    v = img[:h * fe, :w * fe].astype(np.float64)
    want = ((np.square(img[:h * fe, :w * fe]).astype(np.float64) if square else v)
            .reshape(h, fe, w, fe).mean(axis=(1, 3)).astype(np.float32))
    got = block_means(img, f, square=square, rows=24)  # several strips
    assert got.dtype == np.float32 and got.shape == (h, w)
    assert np.array_equal(got, want)


def test_block_means_take_any_real_dtype_and_refuse_other_shapes():
    img = np.arange(36, dtype=np.uint16).reshape(6, 6)
    assert np.array_equal(block_means(img, 3), [[7.0, 10.0], [25.0, 28.0]])
    assert np.array_equal(block_means(img > 17, 3), [[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="2-D"):
        block_means(np.zeros((2, 2, 2)), 2)


@pytest.mark.parametrize("f", range(1, 12))
def test_narrow_blocks_are_summed_as_numpy_sums_them(f):
    """Blocks under 8 columns are summed over strided column slices (:func:`stemfast.blocks._block_sums`):
    the same additions in the same order as NumPy's reduction over the block, bit for bit."""
    from stemfast.blocks import _block_sums

    col = np.random.default_rng(f).normal(0.0, 1e3, (37, 24 * f))
    col[3, :f] = -0.0
    want = col.reshape(37, -1, f).sum(axis=2)
    assert np.array_equal(_block_sums(col, f), want) and np.array_equal(np.signbit(_block_sums(col, f)), np.signbit(want))
