"""The deferred checks' device kernels on a GPU (marked gpu: they run where CuPy sees a
device, and skip elsewhere). Expected values come from plain NumPy computed here, never
from the code under test; the no-synchronisation test uses CuPy's own guard
(``cupyx.allow_synchronize(False)``), which raises on any device-to-host wait.
"""

import numpy as np
import pytest

from safe_layers.core import deferred
from safe_layers.kernels import batch_norm, finite
from support.devices import cupy_device

pytestmark = pytest.mark.gpu


@pytest.fixture
def cupy():
    module = cupy_device()
    if module is None:
        pytest.skip("no CuPy/GPU here")
    return module


def reference_row(host, max_abs):
    """The fault-statistics row of ``host``, in plain NumPy."""
    flat = host.reshape(-1)
    finite_mask = np.isfinite(flat)
    limit = np.inf if max_abs is None else host.dtype.type(max_abs)
    over = finite_mask & (np.abs(flat) > limit)
    bad = ~finite_mask | over
    values = flat[finite_mask]
    first = int(np.argmax(bad)) if bad.any() else -1
    return np.array([np.isnan(flat).sum(), np.isposinf(flat).sum(), np.isneginf(flat).sum(),
                     over.sum(), first, flat[first] if first >= 0 else 0.0,
                     values.min() if values.size else np.inf,
                     values.max() if values.size else -np.inf,
                     np.abs(values).sum(dtype=np.float64), values.size], np.float64)


# Sizes around the kernel's block (256 threads) and grid (1024 blocks x 4 per thread) edges.
SIZES = [1, 7, 255, 256, 257, 1023, 1025, 256 * 1024 * 4 + 3, (1 << 22) + 5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("max_abs", [None, 3.0])
def test_fault_stats_kernel_against_numpy(cupy, dtype, size, max_abs):
    rng = np.random.default_rng(size)
    host = rng.standard_normal(size).astype(dtype)
    for position, value in ((size * 2 // 3, np.nan), (size // 2, np.inf), (size - 1, -np.inf),
                            (size // 5, 4.5)):
        host[position] = value
    want = reference_row(host, max_abs)
    row = finite.empty_rows(cupy, 1)[0]
    got = cupy.asnumpy(finite.fault_stats(cupy.asarray(host), row, max_abs))[:finite.EXTRA]
    np.testing.assert_array_equal(got[:finite.SUM_ABS], want[:finite.SUM_ABS])
    np.testing.assert_allclose(got[finite.SUM_ABS], want[finite.SUM_ABS], rtol=1e-12)
    assert got[finite.FINITE] == want[finite.FINITE]


def test_fault_stats_kernel_on_a_clean_and_an_all_nan_array(cupy):
    row = finite.empty_rows(cupy, 1)[0]
    clean = cupy.asnumpy(finite.fault_stats(cupy.ones(10000, cupy.float32), row))
    assert list(clean[:finite.FIRST + 1]) == [0, 0, 0, 0, -1]
    dead = cupy.asnumpy(finite.fault_stats(cupy.full(5000, cupy.nan, cupy.float32), row))
    assert dead[finite.NAN] == 5000 and dead[finite.FIRST] == 0 and dead[finite.FINITE] == 0
    assert dead[finite.FINITE_MIN] == np.inf and dead[finite.FINITE_MAX] == -np.inf


@pytest.mark.parametrize("flagged", [False, True])
def test_flagged_repairs_on_the_device(cupy, flagged):
    host = np.array([np.nan, np.inf, -np.inf, 5.0, -5.0, 1.0], np.float32)
    row = cupy.zeros(finite.ROW, cupy.float64)
    row[finite.OVER] = 1 if flagged else 0  # what the row says, not what the array holds
    got = cupy.asnumpy(finite.clamp_flagged_(cupy.asarray(host), row, 0.25, 2.0, 3.0))
    expected = np.array([0.25, 2.0, -2.0, 2.0, -2.0, 1.0], np.float32) if flagged else host
    np.testing.assert_array_equal(got, expected)
    zeroed = cupy.asnumpy(finite.zero_flagged_(cupy.asarray(host), row))
    np.testing.assert_array_equal(zeroed, np.zeros(6, np.float32) if flagged else host)
    nonfinite_zeroed = cupy.asnumpy(finite.clamp_flagged_(cupy.asarray(host), row, 0.0, 0.0))
    expected = np.array([0, 0, 0, 5, -5, 1], np.float32) if flagged else host
    np.testing.assert_array_equal(nonfinite_zeroed, expected)
    assert not np.signbit(nonfinite_zeroed[2]) or not flagged  # -Inf -> +0, as nan_to_num


def test_clamp_on_the_device_is_one_fused_pass_equal_to_numpy(cupy):
    host = np.array([np.nan, np.inf, -np.inf, 5.0, -5.0, 1.0], np.float32)
    expected = finite.clamp_(host.copy(), 0.5, 2.0, 3.0)  # the NumPy path: nan_to_num + mask
    got = cupy.asnumpy(finite.clamp_(cupy.asarray(host), 0.5, 2.0, 3.0))
    np.testing.assert_array_equal(got, [0.5, 2.0, -2.0, 2.0, -2.0, 1.0])
    np.testing.assert_array_equal(got, expected)


def test_wide_squares_and_the_statistics_update_on_the_device(cupy):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 70)).astype(np.float32) * 1e19
    got = cupy.asnumpy(batch_norm.channel_sum_squares_wide(cupy.asarray(x)))
    np.testing.assert_allclose(got, (x.astype(np.float64) ** 2).sum(axis=(0, 2)), rtol=1e-12)
    m, v, s = cupy.zeros(2, cupy.float32), cupy.ones(2, cupy.float32), cupy.ones(1, cupy.float32)
    facts = batch_norm.update_running_stats_where(m, v, s, cupy.asarray([1.0, 1.0]),
                                                  cupy.asarray([0.0, 5e38]), 4, 0.5,
                                                  cupy.asarray(True))
    np.testing.assert_array_equal(cupy.asnumpy(facts), [1.0, 1.0, 1.0, 0.5 + 4 / 3 * 5e38])
    assert cupy.asnumpy(s).tolist() == [1.0]  # kept out
    batch_norm.update_running_stats_where(m, v, s, cupy.asarray([1.0, 2.0]), cupy.asarray([0.0, 3.0]),
                                          4, 0.5, cupy.asarray(True))
    assert cupy.asnumpy(m).tolist() == [1.0, 2.0] and cupy.asnumpy(s).tolist() == [1.5]
    np.testing.assert_allclose(cupy.asnumpy(v), [0.5, 0.5 + 4.0], rtol=1e-6)


class _Entry:
    def __init__(self):
        self.rows = []

    def resolve(self, row):
        self.rows.append(row.copy())
        return None


def test_a_deferred_check_and_its_repair_never_synchronise_until_the_board_is_read(cupy):
    import cupyx
    board = deferred.Board()
    entries = [_Entry(), _Entry()]
    x = cupy.asarray(np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32))
    y = cupy.asarray(np.ones((3, 3), np.float32))
    finite.fault_stats(x, finite.empty_rows(cupy, 1)[0])  # compile outside the guard
    finite.clamp_flagged_(y, finite.empty_rows(cupy, 1)[0], 0.0, 1.0)
    with cupyx.allow_synchronize(False):
        for entry, array in zip(entries, (x, y)):
            row = board.add(entry, entry, "forward", array)
            finite.fault_stats(array, row, max_abs=None)
            finite.clamp_flagged_(array, row, 0.0, 7.0)
    board.read()  # the one synchronisation
    assert entries[0].rows[0][finite.NAN] == 1 and entries[0].rows[0][finite.POSINF] == 1
    assert entries[1].rows[0][finite.NAN] == 0
    np.testing.assert_array_equal(cupy.asnumpy(x), [[1.0, 0.0], [7.0, 2.0]])  # repaired
    np.testing.assert_array_equal(cupy.asnumpy(y), np.ones((3, 3), np.float32))  # untouched


def test_the_compile_check_builds_the_sources_cupy_compiles_for_these_kernels(cupy, monkeypatch):
    from cupy.cuda import compiler
    from safe_layers.kernels import xp
    from test_gpu_path import _compile_check
    check = _compile_check()
    seen = []
    real = compiler._compile_module_with_cache

    def recording(source, options=(), *args, **kwargs):
        seen.append(source)
        return real(source, options, *args, **kwargs)
    monkeypatch.setattr(compiler, "_compile_module_with_cache", recording)
    cupy._util.clear_memo()
    xp.kernel.cache_clear()
    finite._fault_stats_functions.cache_clear()
    try:
        x = cupy.arange(5000, dtype=cupy.float32)
        row = finite.empty_rows(cupy, 1)[0]
        finite.fault_stats(x, row)
        finite.clamp_flagged_(x, row, 0.0, 1.0)
        finite.zero_flagged_(x, row)
        finite.clamp_(x, 0.0, 1.0)
        cupy.cuda.Device().synchronize()
    finally:
        xp.kernel.cache_clear()
        finite._fault_stats_functions.cache_clear()
    compiled = set(seen)
    generator = check.Generator()
    for spec in (finite.FAULT_STATS, finite.CLAMP_FLAGGED, finite.ZERO_FLAGGED, finite.CLAMP):
        for path, (source, _) in generator.sources(spec, np.float32).items():
            assert source in compiled, "CuPy compiled another %s source of %s" % (path, spec.name)
