"""safe_layers.kernels.finite on NumPy, and the same tests on CuPy where a GPU is present.

Expected values come from what each test injects (positions, counts, values), never from
the code under test.
"""

import numpy as np
import pytest

from safe_layers.kernels import finite
from safe_layers.kernels.xp import to_numpy
from support.devices import array_modules

F32_MAX = np.finfo(np.float32).max


def _injected(xp, shape=(3, 4, 5, 6), seed=0):
    """A float32 array with NaN, +Inf, -Inf and one huge finite value at known places."""
    rng = np.random.default_rng(seed)
    host = rng.standard_normal(shape).astype(np.float32)
    faults = {(0, 1, 2, 3): np.nan, (1, 0, 0, 0): np.nan, (2, 3, 4, 5): np.inf,
              (1, 2, 3, 4): -np.inf, (0, 3, 0, 1): -np.inf}
    for index, value in faults.items():
        host[index] = value
    host[(2, 0, 0, 0)] = 5e3  # finite, over a threshold of 1e3
    return xp.asarray(host), host, faults


@pytest.mark.parametrize("xp", array_modules())
class TestKernels:
    def test_all_finite_true_on_finite_input(self, xp):
        x = xp.asarray(np.random.default_rng(1).standard_normal((64, 1000)).astype(np.float32))
        assert finite.all_finite(x)
        assert finite.all_finite(x, max_abs=100.0)
        assert finite.all_finite(xp.zeros((0, 3), xp.float32))

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("position", [0, 12345, 99999])
    def test_all_finite_catches_any_single_fault(self, xp, value, position):
        host = np.ones(100000, np.float32)
        host[position] = value
        assert not finite.all_finite(xp.asarray(host))
        assert not finite.all_finite(xp.asarray(host), max_abs=10.0)

    def test_threshold_is_inclusive_and_symmetric(self, xp):
        x = xp.asarray(np.array([1.0, -10.0, 10.0], np.float32))
        assert finite.all_finite(x, max_abs=10.0)
        assert not finite.all_finite(x, max_abs=9.5)
        assert not finite.all_finite(xp.asarray(np.array([1.0, -10.0], np.float32)), max_abs=9.5)

    def test_large_finite_values_are_finite_even_when_their_squares_overflow(self, xp):
        host = np.random.default_rng(2).standard_normal(5000).astype(np.float32)
        host[17] = 1e20  # its square overflows float32; the element itself is finite
        host[4000] = -3e37
        assert finite.all_finite(xp.asarray(host))
        host[4999] = -np.inf
        assert not finite.all_finite(xp.asarray(host))

    def test_threshold_decided_exactly_when_the_energy_bound_is_inconclusive(self, xp):
        # 1000 x 9.0: sum of squares 81000 > 10**2, yet every |x| <= 10.
        host = np.full(1000, 9.0, np.float32)
        assert finite.all_finite(xp.asarray(host), max_abs=10.0)
        host[999] = -10.5
        assert not finite.all_finite(xp.asarray(host), max_abs=10.0)
        host[999] = np.nan
        assert not finite.all_finite(xp.asarray(host), max_abs=10.0)

    def test_overflowing_sum_is_confirmed_finite_by_the_exact_count(self, xp):
        x = xp.asarray(np.full(8, 3e38, np.float32))
        # The fast check may raise a false alarm (the sum overflows); the exact count clears it.
        counts = finite.count_faults(x)
        assert counts == {"nan": 0, "posinf": 0, "neginf": 0, "over": 0}

    def test_count_faults_is_exact(self, xp):
        x, host, faults = _injected(xp)
        counts = finite.count_faults(x, max_abs=1e3)
        assert counts == {"nan": 2, "posinf": 1, "neginf": 2, "over": 1}
        assert finite.count_faults(x)["over"] == 0

    def test_first_fault_is_the_first_in_c_order(self, xp):
        x, host, faults = _injected(xp)
        index, value = finite.first_fault(x)
        assert index == min(faults)  # tuples compare in C order
        assert np.isnan(value)
        index, value = finite.first_fault(xp.asarray(np.ones((2, 2), np.float32)))
        assert index is None and value is None

    def test_first_fault_includes_threshold_hits(self, xp):
        host = np.zeros((4, 4), np.float32)
        host[1, 2] = -50.0
        host[3, 3] = np.inf
        index, value = finite.first_fault(xp.asarray(host), max_abs=10.0)
        assert index == (1, 2) and value == -50.0

    def test_finite_stats_ignore_nonfinite(self, xp):
        x, host, faults = _injected(xp)
        good = host[np.isfinite(host)].astype(np.float64)
        fmin, fmax, fmean = finite.finite_stats(x)
        assert fmin == pytest.approx(good.min()) and fmax == pytest.approx(good.max())
        assert fmean == pytest.approx(np.abs(good).mean(), rel=1e-6)
        assert finite.finite_stats(xp.asarray(np.full(3, np.nan, np.float32))) == (None, None, None)

    def test_clamp_repairs_every_fault_kind(self, xp):
        x, host, faults = _injected(xp)
        finite.clamp_(x, nan_value=-1.0, bound=7.0, max_abs=1e3)
        out = to_numpy(x)
        for index, value in faults.items():
            expected = -1.0 if np.isnan(value) else np.sign(value) * 7.0
            assert out[index] == expected, index
        assert out[(2, 0, 0, 0)] == 7.0
        untouched = np.isfinite(host) & (np.abs(host) <= 1e3)
        np.testing.assert_array_equal(out[untouched], host[untouched])

    def test_clamp_without_threshold_keeps_large_finite_values(self, xp):
        host = np.array([np.inf, -np.inf, np.nan, 3e38, -2.0], np.float32)
        x = xp.asarray(host)
        finite.clamp_(x)
        out = to_numpy(x)
        np.testing.assert_array_equal(out, np.array([F32_MAX, -F32_MAX, 0.0, 3e38, -2.0], np.float32))
