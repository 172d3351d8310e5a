"""safe_layers.kernels.batch_norm on NumPy, and on CuPy where a GPU is present."""

import numpy as np
import pytest

from safe_layers.kernels import batch_norm
from safe_layers.kernels.xp import to_numpy
from support.devices import array_modules


def _x(shape=(5, 3, 2, 4), seed=0, loc=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(np.float32)


def _reference(x, eps):
    """mean, var, y of batch normalization in float64 from the float32 input."""
    x64 = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x64.mean(axis=axes)
    var = x64.var(axis=axes)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return mean, var, (x64 - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def _expand(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _loss_of_x(x, w, eps):
    """sum(w * normalize(x)) with batch statistics, in float64: what backward differentiates."""
    return float((w * _reference(x, eps)[2]).sum())


@pytest.mark.parametrize("xp", array_modules())
class TestBatchNormKernels:
    @pytest.mark.parametrize("shape", [(5, 3, 2, 4), (32, 3, 8, 8), (2, 4, 112, 112), (300, 4)])
    def test_moments_stay_exact_for_a_huge_mean(self, xp, shape):
        # 1e4 + noise of 0.05: a float32 sum loses the noise (Caffe's output is off by ~0.07).
        x = _x(shape, loc=1e4, scale=0.05)
        mean, var, y = _reference(x, 1e-5)
        centered, out = xp.empty(x.shape, xp.float32), xp.empty(x.shape, xp.float32)
        got_mean, got_var, inv_std, offset = batch_norm.normalize_batch(xp.asarray(x), 1e-5, centered, out)
        std = np.sqrt(var)
        assert np.abs(to_numpy(got_mean) - mean).max() < 1e-6 * std.min()
        np.testing.assert_allclose(to_numpy(got_var), var, rtol=1e-5)
        np.testing.assert_allclose(to_numpy(out), y, atol=2e-5)
        np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(var + 1e-5), rtol=1e-5)
        np.testing.assert_allclose(to_numpy(centered) - _expand(to_numpy(offset), x.ndim),
                                   x.astype(np.float64) - _expand(mean, x.ndim), atol=2e-6 * std.min())
        assert (np.abs(to_numpy(offset)) < batch_norm.TOLERANCE * std).all()
        # A plain float32 mean misses by far more than this tolerance: the case is not vacuous.
        naive = x.reshape(shape[0], shape[1], -1).mean(axis=(0, 2), dtype=np.float32)
        assert np.abs(naive - mean).max() > 10 * np.abs(to_numpy(got_mean) - mean).max()

    def test_normalize_batch_in_place_and_a_workspace_reusing_its_buffers(self, xp):
        x = _x()
        work = batch_norm.Workspace()
        a = xp.asarray(x.copy())
        sums = batch_norm.channel_sums(a)
        batch_norm.normalize_batch(a, 1e-5, work.get("centered", a), a, sums)  # out = x, as in place
        np.testing.assert_allclose(to_numpy(a), _reference(x, 1e-5)[2], atol=1e-6)
        scratch = work.get("scratch", a)
        assert work.get("scratch", a) is scratch  # reused, not reallocated
        assert work.get("scratch", a[:2]) is not scratch  # a new shape gets a new buffer

    def test_channel_sums_are_the_fast_finiteness_check(self, xp):
        x = _x()
        assert np.isfinite(to_numpy(batch_norm.channel_sums(xp.asarray(x)))).all()
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[3, 1, 1, 2] = bad
            sums = to_numpy(batch_norm.channel_sums(xp.asarray(y)))
            assert np.isfinite(sums).tolist() == [True, False, True]
        y = x.copy()
        y[0, 0, 0, :2] = [np.inf, -np.inf]  # +Inf and -Inf in one row: NaN, not a finite 0
        assert not np.isfinite(to_numpy(batch_norm.channel_sums(xp.asarray(y)))[0])

    def test_batch_moments(self, xp):
        x = _x(loc=3.0)
        mean, var = batch_norm.batch_moments(xp.asarray(x))
        ref_mean, ref_var, _ = _reference(x, 1e-5)
        np.testing.assert_allclose(to_numpy(mean), ref_mean, rtol=1e-7)
        np.testing.assert_allclose(to_numpy(var), ref_var, rtol=1e-5)

    def test_variance_of_a_constant_channel_is_zero_not_negative(self, xp):
        x = np.full((7, 2, 3), 0.1, np.float32)
        mean, var = batch_norm.batch_moments(xp.asarray(x))
        assert (to_numpy(var) >= 0).all() and to_numpy(var).max() < 1e-20

    def test_squares_beyond_float32_are_summed_with_float64_products(self, xp):
        x = _x((4, 2, 3), scale=1e20)
        with np.errstate(over="ignore"):
            assert not np.isfinite((x.astype(np.float32) ** 2).sum())  # float32 squares overflow
        ref_mean, ref_var, y = _reference(x, 1e-5)
        for normalize in (batch_norm.normalize_batch, batch_norm.normalize_batch_wide):
            centered, out = xp.empty(x.shape, xp.float32), xp.empty(x.shape, xp.float32)
            _, var, _, _ = normalize(xp.asarray(x), 1e-5, centered, out)
            np.testing.assert_allclose(to_numpy(var), ref_var, rtol=1e-6)
            np.testing.assert_allclose(to_numpy(out), y, atol=1e-6)

    def test_update_running_stats(self, xp):
        m, v, s = (xp.asarray(np.array(a, np.float32)) for a in ([1.0, 2.0], [3.0, 4.0], [2.0]))
        assert batch_norm.update_running_stats(m, v, s, xp.asarray(np.array([0.5, -1.0])),
                                               xp.asarray(np.array([2.0, 0.0])), 5, 0.9) is None
        np.testing.assert_allclose(to_numpy(m), [0.9 + 0.5, 1.8 - 1.0], rtol=1e-6)
        np.testing.assert_allclose(to_numpy(v), [2.7 + 5 / 4 * 2.0, 3.6], rtol=1e-6)
        np.testing.assert_allclose(to_numpy(s), [2.8], rtol=1e-6)
        batch_norm.update_running_stats(m, v, s, xp.zeros(2), xp.ones(2), 1, 0.0)  # m = 1: no correction
        np.testing.assert_allclose(to_numpy(v), [1.0, 1.0])

    def test_an_update_float32_cannot_hold_is_refused(self, xp):
        m, v, s = (xp.asarray(np.array(a, np.float32)) for a in ([1.0, 2.0], [3.0, 4.0], [2.0]))
        before = [to_numpy(a).copy() for a in (m, v, s)]
        # A batch of std 1e20: variance 1e40, beyond float32 (it would be stored as Inf).
        got = batch_norm.update_running_stats(m, v, s, xp.zeros(2), xp.asarray(np.array([1.0, 1e40])), 8, 0.999)
        assert got[:2] == ("variance", 1) and got[2] == pytest.approx(8 / 7 * 1e40)
        for a, b in zip((m, v, s), before):
            np.testing.assert_array_equal(to_numpy(a), b)  # nothing written
        m[...] = xp.asarray(np.array([-2e38, 2.0], np.float32))
        got = batch_norm.update_running_stats(m, v, s, xp.asarray(np.array([-2e38, 0.0])), xp.zeros(2), 8, 1.0)
        assert got[:2] == ("mean", 0) and got[2] == pytest.approx(-4e38, rel=1e-6)

    def test_running_stats(self, xp):
        def stats(mean, var, scale):
            return [xp.asarray(np.array(a, np.float32)) for a in (mean, var, scale)]
        mean, var = batch_norm.running_stats(*stats([2.0, 4.0], [1.0, -0.5], [2.0]))
        np.testing.assert_allclose(to_numpy(mean), [1.0, 2.0])
        np.testing.assert_allclose(to_numpy(var), [0.5, 0.0])  # -0.25 clamped
        for bad in (([1.0, 1.0], [1.0, 1.0], [0.0]), ([1.0, np.nan], [1.0, 1.0], [1.0]),
                    ([1.0, 1.0], [np.inf, 1.0], [1.0]), ([1.0, 1.0], [1.0, 1.0], [np.nan])):
            assert batch_norm.running_stats(*stats(*bad)) is None

    def test_normalize_global_cancels_a_huge_mean_exactly(self, xp):
        x = _x(loc=1e4, scale=0.05)
        mean, var, y = _reference(x, 1e-5)
        out = xp.empty(x.shape, xp.float32)
        inv_std = batch_norm.normalize_global(xp.asarray(x), xp.asarray(mean), xp.asarray(var), 1e-5, out)
        np.testing.assert_allclose(to_numpy(out), y, atol=2e-5)
        np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(var + 1e-5), rtol=1e-12)
        # Subtracting the float32-rounded mean in one step would be off by ~1e-3 / 0.05.
        one_step = (x - mean.astype(np.float32)[None, :, None, None]) * (1 / np.sqrt(var + 1e-5))[None, :, None, None]
        assert np.abs(one_step - y).max() > 100 * np.abs(to_numpy(out) - y).max()

    def test_normalize(self, xp):
        x = _x()
        mean, var = np.array([0.1, -0.2, 0.3]), np.array([1.0, 0.5, 4.0])
        y, inv_std = batch_norm.normalize(xp.asarray(x), xp.asarray(mean), xp.asarray(var), 1e-5)
        expected = (x - mean[None, :, None, None]) / np.sqrt(var + 1e-5)[None, :, None, None]
        np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("in_place", [False, True])
    @pytest.mark.parametrize("loc", [0.0, 3.0, 1e3], ids=["mean0", "mean3", "mean1e3"])
    def test_backward_batch_stats_is_the_derivative(self, xp, in_place, loc):
        x = _x((4, 3, 5), seed=1, loc=loc)
        w = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
        work = batch_norm.Workspace()
        centered, y = xp.empty(x.shape, xp.float32), xp.empty(x.shape, xp.float32)
        _, _, inv_std, offset = batch_norm.normalize_batch(xp.asarray(x), 1e-5, centered, y)
        dy = xp.asarray(w.copy())
        out = dy if in_place else xp.empty(x.shape, xp.float32)
        dx = to_numpy(batch_norm.backward_batch_stats(dy, centered, offset, inv_std, out, work))
        numeric = np.zeros(x.shape)
        for index in np.ndindex(*x.shape):
            plus, minus = x.astype(np.float64), x.astype(np.float64)
            plus[index] += 1e-4
            minus[index] -= 1e-4
            numeric[index] = (_loss_of_x(plus, w, 1e-5) - _loss_of_x(minus, w, 1e-5)) / 2e-4
        np.testing.assert_allclose(dx, numeric, rtol=1e-4, atol=1e-5)

    def test_backward_batch_stats_takes_the_offset_into_account(self, xp):
        # centered - offset is x - mean: any offset gives the same gradient.
        x = _x((4, 3, 5), seed=3)
        dy = _x((4, 3, 5), seed=4)
        mean, var, _ = _reference(x, 1e-5)
        inv_std = xp.asarray(1 / np.sqrt(var + 1e-5))
        exact = (x - _expand(mean, 3)).astype(np.float32)
        offset = np.array([0.5, -2.0, 0.0])
        shifted = (exact + _expand(offset, 3)).astype(np.float32)
        outs = [to_numpy(batch_norm.backward_batch_stats(xp.asarray(dy), xp.asarray(c), xp.asarray(o), inv_std,
                                                         xp.empty(x.shape, xp.float32), batch_norm.Workspace()))
                for c, o in ((exact, np.zeros(3)), (shifted, offset))]
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)

    def test_backward_global_stats(self, xp):
        dy = _x((2, 3))
        inv_std = np.array([1.0, 2.0, 0.5])
        out = xp.empty(dy.shape, xp.float32)
        dx = batch_norm.backward_global_stats(xp.asarray(dy), xp.asarray(inv_std), out)
        np.testing.assert_allclose(to_numpy(dx), dy * inv_std[None, :], rtol=1e-7)


def test_a_non_finite_batch_gives_nan_statistics_without_numpy_warnings():
    """The layer reports a non-finite batch itself (one clear line); NumPy's own
    'invalid value encountered in subtract' after it would only be noise."""
    import warnings
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    x[0, 1, 0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, var, _, _ = batch_norm.batch_statistics(x, 1e-5, np.empty_like(x))
    assert np.isfinite(var[[0, 2]]).all() and np.isnan(var[1])
