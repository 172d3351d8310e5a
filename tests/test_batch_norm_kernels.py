"""safe_layers.kernels.batch_norm on NumPy, and on CuPy where a GPU is present."""

import numpy as np
import pytest

from conftest import array_modules
from safe_layers.kernels import batch_norm
from safe_layers.kernels.xp import to_numpy


def _x(shape=(5, 3, 2, 4), seed=0, loc=0.0):
    return (np.random.default_rng(seed).standard_normal(shape) + loc).astype(np.float32)


def _loss_of_x(x, w, eps):
    """sum(w * normalize(x)) with batch statistics, in float64: what backward differentiates."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    return float((w * (x64 - mean) / np.sqrt(var + eps)).sum())


@pytest.mark.parametrize("xp", array_modules())
class TestBatchNormKernels:
    def test_batch_moments_are_float64_two_pass(self, xp):
        x = _x(loc=1e4)
        mean, var = batch_norm.batch_moments(xp.asarray(x))
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(to_numpy(mean), x64.mean(axis=(0, 2, 3)), rtol=1e-15)
        np.testing.assert_allclose(to_numpy(var), x64.var(axis=(0, 2, 3)), rtol=1e-10)

    def test_variance_of_a_constant_channel_is_zero_not_negative(self, xp):
        x = np.full((7, 2, 3), 0.1, np.float32)
        mean, var = batch_norm.batch_moments(xp.asarray(x))
        assert (to_numpy(var) >= 0).all() and to_numpy(var).max() < 1e-20

    def test_update_running_stats(self, xp):
        m, v, s = (xp.asarray(np.array(a, np.float32)) for a in ([1.0, 2.0], [3.0, 4.0], [2.0]))
        batch_norm.update_running_stats(m, v, s, xp.asarray(np.array([0.5, -1.0])),
                                        xp.asarray(np.array([2.0, 0.0])), 5, 0.9)
        np.testing.assert_allclose(to_numpy(m), [0.9 + 0.5, 1.8 - 1.0], rtol=1e-6)
        np.testing.assert_allclose(to_numpy(v), [2.7 + 5 / 4 * 2.0, 3.6], rtol=1e-6)
        np.testing.assert_allclose(to_numpy(s), [2.8], rtol=1e-6)
        batch_norm.update_running_stats(m, v, s, xp.zeros(2), xp.ones(2), 1, 0.0)  # m = 1: no correction
        np.testing.assert_allclose(to_numpy(v), [1.0, 1.0])

    def test_running_stats(self, xp):
        def stats(mean, var, scale):
            return [xp.asarray(np.array(a, np.float32)) for a in (mean, var, scale)]
        mean, var = batch_norm.running_stats(*stats([2.0, 4.0], [1.0, -0.5], [2.0]))
        np.testing.assert_allclose(to_numpy(mean), [1.0, 2.0])
        np.testing.assert_allclose(to_numpy(var), [0.5, 0.0])  # -0.25 clamped
        for bad in (([1.0, 1.0], [1.0, 1.0], [0.0]), ([1.0, np.nan], [1.0, 1.0], [1.0]),
                    ([1.0, 1.0], [np.inf, 1.0], [1.0]), ([1.0, 1.0], [1.0, 1.0], [np.nan])):
            assert batch_norm.running_stats(*stats(*bad)) is None

    def test_normalize(self, xp):
        x = _x()
        mean, var = np.array([0.1, -0.2, 0.3]), np.array([1.0, 0.5, 4.0])
        y, inv_std = batch_norm.normalize(xp.asarray(x), xp.asarray(mean), xp.asarray(var), 1e-5)
        expected = (x - mean[None, :, None, None]) / np.sqrt(var + 1e-5)[None, :, None, None]
        np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-12)

    def test_backward_batch_stats_is_the_derivative(self, xp):
        x = _x((4, 3, 5), seed=1)
        w = np.random.default_rng(2).standard_normal(x.shape)
        mean, var = batch_norm.batch_moments(xp.asarray(x))
        y, inv_std = batch_norm.normalize(xp.asarray(x), mean, var, 1e-5)
        dx = to_numpy(batch_norm.backward_batch_stats(xp.asarray(w), y, inv_std))
        numeric = np.zeros(x.shape)
        for index in np.ndindex(*x.shape):
            plus, minus = x.astype(np.float64), x.astype(np.float64)
            plus[index] += 1e-4
            minus[index] -= 1e-4
            numeric[index] = (_loss_of_x(plus, w, 1e-5) - _loss_of_x(minus, w, 1e-5)) / 2e-4
        np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-7)

    def test_backward_global_stats(self, xp):
        dy = _x((2, 3))
        inv_std = np.array([1.0, 2.0, 0.5])
        dx = batch_norm.backward_global_stats(xp.asarray(dy), xp.asarray(inv_std))
        np.testing.assert_allclose(to_numpy(dx), dy * inv_std[None, :], rtol=1e-7)
