"""safe_layers.kernels.infogain on NumPy, and on CuPy where a GPU is present.

References are explicit per-position loops over the textbook formulas in float64."""

import numpy as np
import pytest

from safe_layers.kernels import infogain
from safe_layers.kernels.xp import to_numpy
from support.devices import array_modules


def _case(seed=0, outer=3, k=4, inner=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((outer, k, inner)) * 3
    y = rng.integers(0, k, (outer, inner))
    h = rng.random((k, k)) * 2
    return x, y, h


def _reference(x, y, h, weights, scale):
    outer, k, inner = x.shape
    loss, grad = 0.0, np.zeros_like(x)
    for i in range(outer):
        for j in range(inner):
            z = x[i, :, j] - x[i, :, j].max()
            p = np.exp(z) / np.exp(z).sum()
            c = y[i, j]
            loss += weights[i, j] * -sum(h[c, l] * np.log(p[l]) for l in range(k))
            grad[i, :, j] = (p * h[c].sum() - h[c]) * weights[i, j] * scale
    return loss, grad


@pytest.mark.parametrize("xp", array_modules())
class TestInfogainKernels:
    def test_loss_and_gradient_match_the_reference(self, xp):
        x, y, h = _case()
        weights = np.ones(y.shape)
        weights[0, 0] = 0.0
        p, log_p = infogain.log_softmax(xp.asarray(x), axis=1)
        loss = infogain.infogain_loss(log_p, xp.asarray(y), xp.asarray(weights), xp.asarray(h))
        grad = infogain.infogain_grad_logits(p, xp.asarray(y), xp.asarray(weights), xp.asarray(h), 0.5)
        ref_loss, ref_grad = _reference(x, y, h, weights, 0.5)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-12)
        np.testing.assert_allclose(to_numpy(grad), ref_grad, rtol=1e-10, atol=1e-14)

    def test_log_softmax_is_stable_for_huge_logits(self, xp):
        x = xp.asarray(np.array([[1e30, -1e30, 0.0]]).T[None, :, :].reshape(1, 3, 1))
        p, log_p = infogain.log_softmax(x, axis=1)
        assert np.isfinite(to_numpy(log_p)).all()
        np.testing.assert_allclose(to_numpy(p).ravel(), [1.0, 0.0, 0.0])
        assert float(to_numpy(log_p)[0, 1, 0]) == pytest.approx(-2e30)

    def test_probability_gradient(self, xp):
        p = np.array([[[0.5], [0.25], [0.25]]])
        h = np.eye(3)
        g = infogain.infogain_grad_probabilities(xp.asarray(p), xp.asarray(np.array([[1]])),
                                                 xp.asarray(np.ones((1, 1))), xp.asarray(h), 2.0)
        np.testing.assert_allclose(to_numpy(g).ravel(), [0.0, -2.0 / 0.25, 0.0])
        floor = infogain.probability_log(xp.asarray(np.array([0.0, 1e-30, 0.5])))
        np.testing.assert_allclose(to_numpy(floor), np.log([1e-20, 1e-20, 0.5]))

    def test_label_positions(self, xp):
        labels = xp.asarray(np.array([[0.0, 2.9, -1.0], [1.0, -1.0, 2.0]]))
        y, valid = infogain.label_positions(labels, 3, ignore_label=-1)
        np.testing.assert_array_equal(to_numpy(y), [[0, 2, 0], [1, 0, 2]])  # 2.9 truncates to 2
        np.testing.assert_array_equal(to_numpy(valid), [[True, True, False], [True, False, True]])
        for bad, where in ((3.0, (1, 2)), (-2.0, (0, 0)), (np.nan, (0, 1))):
            host = np.zeros((2, 3))
            host[where] = bad
            with pytest.raises(ValueError, match=r"position \(%d, %d\)" % where):
                infogain.label_positions(xp.asarray(host), 3, ignore_label=-1)

    def test_batch_frequency_weights(self, xp):
        y = xp.asarray(np.array([[0, 0, 0, 1, 3, 3]]))
        valid = xp.asarray(np.array([[True, True, True, True, True, False]]))
        w = to_numpy(infogain.batch_frequency_weights(y, valid, 4))
        # n_valid 5, classes present {0, 1, 3} -> 5 / (3 * count)
        np.testing.assert_allclose(w, [[5 / 9, 5 / 9, 5 / 9, 5 / 3, 5 / 3, 0.0]])
        assert w.sum() == pytest.approx(5.0)
        none = to_numpy(infogain.batch_frequency_weights(y, xp.zeros((1, 6), dtype=bool), 4))
        assert np.isfinite(none).all() and not none.any()

    def test_matrix_checks(self, xp):
        h = infogain.check_infogain_matrix(xp.asarray(np.arange(4.0)), 2)
        assert h.shape == (2, 2)
        np.testing.assert_allclose(to_numpy(infogain.normalize_rows(h)), [[0, 1], [0.4, 0.6]])
        for bad, message in ((np.array([[1.0, -1.0], [0, 1]]), "H\\[0, 1\\] = -1.0 is negative"),
                             (np.array([[1.0, 0], [np.inf, 1]]), "H\\[1, 0\\] = inf is not finite"),
                             (np.ones(3), "H has 3 values")):
            with pytest.raises(infogain.InfogainMatrixError, match=message):
                infogain.check_infogain_matrix(xp.asarray(bad), 2)
        with pytest.raises(infogain.InfogainMatrixError, match="row 0 of H sums to 0"):
            infogain.normalize_rows(xp.asarray(np.array([[0.0, 0.0], [1.0, 1.0]])))


def test_normalizer_never_below_one():
    assert infogain.normalizer("VALID", 4, 3, 0) == 1.0
    assert infogain.normalizer("VALID", 4, 3, 7) == 7.0
    assert infogain.normalizer("BATCH_SIZE", 4, 3, 7) == 4.0
    assert infogain.normalizer("FULL", 4, 3, 7) == 12.0
    assert infogain.normalizer("NONE", 4, 3, 7) == 1.0
    with pytest.raises(ValueError, match="allowed: VALID, BATCH_SIZE, FULL, NONE"):
        infogain.normalizer("MEAN", 1, 1, 1)
