"""Shared check for tests: two :class:`stemfast.model.Encoding` of the same patches agree to float32
rounding (the compiled engine against torch, a GPU against the CPU)."""
from __future__ import annotations

import numpy as np


def angle_diff(a, b, period):
    """Absolute angle difference modulo ``period`` (degrees)."""
    return np.abs((np.asarray(a, np.float64) - b + period / 2) % period - period / 2)


def assert_same_encoding(enc_a, enc_b, period):
    """``enc_b`` equals the reference ``enc_a`` to float32 rounding: latents, errors, angles."""
    scale = float(np.abs(enc_a.mu).max()) + 1e-6
    np.testing.assert_allclose(enc_b.mu, enc_a.mu, rtol=0, atol=2e-4 * scale)
    np.testing.assert_allclose(enc_b.logvar, enc_a.logvar, rtol=0, atol=2e-4 * (np.abs(enc_a.logvar).max() + 1e-6))
    np.testing.assert_allclose(enc_b.recon_error, enc_a.recon_error, rtol=1e-3, atol=1e-7)
    if np.isnan(enc_a.angle).all():
        assert np.isnan(enc_b.angle).all() and np.isnan(enc_b.angle_strength).all()
    else:
        # a patch whose harmonic is nearly zero has no orientation to agree on
        sure = enc_a.angle_strength > 1e-3 * np.median(enc_a.angle_strength)
        assert sure.mean() > 0.9
        assert angle_diff(enc_b.angle[sure], enc_a.angle[sure], period).max() < 0.02
        np.testing.assert_allclose(enc_b.angle_strength, enc_a.angle_strength, rtol=1e-3, atol=1e-6)
