"""safe_layers.kernels.clip on NumPy, and on CuPy where a GPU is present."""

import numpy as np
import pytest

from safe_layers.kernels import clip
from safe_layers.kernels.xp import to_numpy
from support.devices import array_modules


def _grad(xp, seed=0, shape=(6, 3, 4)):
    host = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return xp.asarray(host), host.astype(np.float64)


@pytest.mark.parametrize("xp", array_modules())
class TestClipKernels:
    def test_zero_nonfinite(self, xp):
        host = np.array([1.0, np.nan, -np.inf, np.inf, -2.0], np.float32)
        g = xp.asarray(host)
        clip.zero_nonfinite_(g)
        np.testing.assert_array_equal(to_numpy(g), [1.0, 0.0, 0.0, 0.0, -2.0])

    def test_clip_by_value(self, xp):
        g, host = _grad(xp)
        clip.clip_by_value_(g, 0.3)
        np.testing.assert_allclose(to_numpy(g), np.clip(host, -0.3, 0.3), rtol=1e-6)

    def test_l2_norms_whole_and_per_sample(self, xp):
        g, host = _grad(xp)
        assert float(clip.l2_norms(g)) == pytest.approx(np.sqrt((host ** 2).sum()), rel=1e-6)
        np.testing.assert_allclose(to_numpy(clip.l2_norms(g, per_sample=True)),
                                   np.sqrt((host.reshape(6, -1) ** 2).sum(axis=1)), rtol=1e-6)

    def test_l2_norm_does_not_overflow_in_float32(self, xp):
        g = xp.asarray(np.full(4, 1e30, np.float32))  # squares overflow float32
        assert float(clip.l2_norms(g)) == pytest.approx(2e30, rel=1e-6)

    def test_l2_norm_finite_only(self, xp):
        g = xp.asarray(np.array([3.0, np.nan, 4.0, np.inf], np.float32))
        assert float(clip.l2_norms(g, finite_only=True)) == pytest.approx(5.0)
        assert np.isnan(float(clip.l2_norms(g)))

    def test_clip_by_norm_whole(self, xp):
        g, host = _grad(xp)
        norm = np.sqrt((host ** 2).sum())
        seen = clip.clip_by_norm_(g, 1.5)
        assert float(seen) == pytest.approx(norm, rel=1e-6)
        np.testing.assert_allclose(to_numpy(g), host * 1.5 / (norm + 1e-6), rtol=1e-5)

    def test_clip_by_norm_leaves_small_gradients(self, xp):
        g, host = _grad(xp)
        clip.clip_by_norm_(g, 1e3)
        np.testing.assert_array_equal(to_numpy(g), host.astype(np.float32))

    def test_clip_by_norm_per_sample(self, xp):
        g, host = _grad(xp)
        norms = np.sqrt((host.reshape(6, -1) ** 2).sum(axis=1))
        clip.clip_by_norm_(g, 3.0, per_sample=True)
        expected = host * np.minimum(1.0, 3.0 / (norms + 1e-6))[:, None, None]
        np.testing.assert_allclose(to_numpy(g), expected, rtol=1e-5)

    def test_zero_gradient_stays_zero(self, xp):
        g = xp.zeros((3, 2), xp.float32)
        clip.clip_by_norm_(g, 1.0)
        assert not to_numpy(g).any()
