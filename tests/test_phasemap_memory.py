"""The memory of the phase map's Bragg filter (:func:`stemfast.phasemap.bragg_maps`).

Padding the image against the wrap round its edges (772d86f) made the padded image and its spectrum
at twice the image's size in each direction, and the support's spectrum (complex128) as well: the
filter then held 3.7 image sizes at 26 px between metal columns and 13.5 at 18 px (the real MoS2
crops' scale), 8.5 GiB for a 16k float32 image whose read-time check estimated 4 GiB. The spectrum
is now computed only on the windows the demodulation reads, to the same values.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import fft as sfft

from stemfast.phasemap import _PaddedSpectrum, _SeparableSpectrum, _window, bragg_maps


def _lattice(n: int, a: float) -> tuple[np.ndarray, np.ndarray]:
    """An ``n`` x ``n`` float32 hexagonal lattice of ``a`` px between columns and its first-ring
    reciprocal vectors (cycles / px, (x, y))."""
    k = 2.0 / (a * np.sqrt(3.0))
    g = np.array([[k, 0.0], [0.5 * k, np.sqrt(3.0) / 2 * k]])
    y, x = np.mgrid[:n, :n].astype(np.float32)
    img = sum(np.cos(2 * np.pi * (gx * x + gy * y)) for gx, gy in g).astype(np.float32)
    return img, g


@pytest.mark.parametrize("a", [26.3, 18.0])
def test_bragg_maps_holds_about_an_image_size_at_most(a):
    # 26.3 px: block-averaged by 2 (3.7 image sizes before); 18 px: not block-averaged (13.5 before)
    img, g = _lattice(2048, a)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        maps, _, _ = bragg_maps(img, g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.2 * img.nbytes, f"bragg_maps peaked at {peak / img.nbytes:.2f} image sizes"
    # and the maps are those of a lattice all over (the filter's support divided out)
    amp = np.abs(maps[0])
    assert amp.min() > 0.9 * np.median(amp)


@pytest.mark.parametrize("shape,pad", [((37, 50), (37, 50)), ((64, 31), (64, 62)), ((40, 40), (0, 0))])
def test_padded_spectrum_is_the_rfft2_of_the_padded_image(shape, pad):
    small = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    hs, ws = shape[0] + pad[0], shape[1] + pad[1]
    spec = _PaddedSpectrum(small, float(small.mean()), (hs, ws))
    spec.chunk = 64  # several strips of rows and groups of columns
    full = sfft.rfft2(np.pad(small - float(small.mean()), ((0, pad[0]), (0, pad[1]))))
    iy = np.arange(-hs // 3, hs // 3 + 1)
    ix = np.arange(-ws // 2 - 3, ws // 2 + 4)  # both signs, and beyond the last column of rfft2
    want = np.zeros((len(iy), len(ix)), np.complex128)
    for j, x in enumerate(ix):
        if abs(x) <= ws // 2:
            col = full[(iy if x >= 0 else -iy) % hs, abs(x)]
            want[:, j] = col if x >= 0 else np.conj(col)
    got = spec.window(iy, ix)
    assert np.array_equal(got, want)  # the same transforms: identical, not close
    sep = _SeparableSpectrum(sfft.fft(np.arange(hs) < shape[0]), sfft.rfft(np.arange(ws) < shape[1]), (hs, ws))
    outer = np.outer(sep.a, sep.b)
    want = np.zeros_like(want)
    for j, x in enumerate(ix):
        if abs(x) <= ws // 2:
            col = outer[(iy if x >= 0 else -iy) % hs, abs(x)]
            want[:, j] = col if x >= 0 else np.conj(col)
    assert np.array_equal(_window(sep, iy, ix), want)
