"""SafeInfogainLoss beside Caffe's InfogainLoss in one real net, and where Caffe's goes wrong.

Each net feeds the same logits to both layers through separate learnable Bias layers
(bias 0), so each loss's gradient lands in its own blob and backward runs without
force_backward (which would make Caffe's layer abort on its H input).
"""

import re
import zlib

import numpy as np
import pytest

from safe_layers import reporting
from safe_layers.core.params import ParamError
from support.gradients import numeric_gradient


def _dims(shape):
    return " ".join("dim: %d" % d for d in shape)


def side_by_side(shape, label_shape, caffe_h, ours_param, caffe_param="", ours_h=True,
                 ours_loss_weight=1.0):
    """Input logits -> Bias -> Caffe InfogainLoss 'l_caffe'; same logits -> Bias -> ours 'l_ours'.

    caffe_h: 'bottom' (H is the Input blob 'H') or a file path for infogain_loss_param.source.
    ours_h: True to give our layer bottom[2] = H; False when its param_str names a source.
    """
    k = shape[1]
    text = ('name: "infogain"\n'
            'layer { name: "in" type: "Input" top: "xc" top: "xo" top: "y" top: "H" input_param { '
            'shape { %s } shape { %s } shape { %s } shape { dim: 1 dim: 1 dim: %d dim: %d } } }\n'
            % (_dims(shape), _dims(shape), _dims(label_shape), k, k))
    for src, dst in (("xc", "c"), ("xo", "o")):
        text += ('layer { name: "bias_%s" type: "Bias" bottom: "%s" top: "x_%s" '
                 'bias_param { axis: 0 num_axes: 0 } }\n' % (dst, src, dst))
    caffe_bottoms = 'bottom: "x_c" bottom: "y"' + (' bottom: "H"' if caffe_h == "bottom" else "")
    source = "" if caffe_h == "bottom" else 'infogain_loss_param { source: "%s" } ' % caffe_h
    text += ('layer { name: "caffe" type: "InfogainLoss" %s top: "l_caffe" %s%s}\n'
             % (caffe_bottoms, source, caffe_param))
    ours_bottoms = 'bottom: "x_o" bottom: "y"' + (' bottom: "H"' if ours_h else "")
    text += ('layer { name: "ours" type: "Python" %s top: "l_ours" loss_weight: %g python_param { '
             'module: "safe_layers" layer: "SafeInfogainLoss" param_str: "%s" } }\n'
             % (ours_bottoms, ours_loss_weight, ours_param))
    return text


def fill(net, logits, labels, h):
    net.blobs["xc"].data[...] = logits
    net.blobs["xo"].data[...] = logits
    net.blobs["y"].data[...] = labels
    net.blobs["H"].data[...] = h.reshape(net.blobs["H"].data.shape)
    net.forward()
    net.backward()


def make_h(kind, k, rng):
    if kind == "identity":
        return np.eye(k, dtype=np.float32)
    if kind == "row_stochastic":
        h = rng.random((k, k))
        return (h / h.sum(axis=1, keepdims=True)).astype(np.float32)
    return (rng.random((k, k)) * 3).astype(np.float32)  # non-negative, unnormalized


CAFFE_NORMALIZATION = 'loss_param { %snormalization: %s } '


@pytest.mark.parametrize("h_kind", ["identity", "row_stochastic", "nonnegative"])
@pytest.mark.parametrize("normalization", ["VALID", "BATCH_SIZE", "FULL", "NONE"])
@pytest.mark.parametrize("ignore", [False, True], ids=["no_ignore", "ignore_label"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 3)], ids=["NxK", "NxKxHxW"])
def test_matches_caffe_infogain_loss(make_net, h_kind, normalization, ignore, shape):
    rng = np.random.default_rng(zlib.crc32(repr((h_kind, normalization, ignore, shape)).encode()))
    k = shape[1]
    label_shape = (shape[0],) + shape[2:]
    labels = rng.integers(0, k, size=label_shape).astype(np.float32)
    if ignore:
        labels.flat[::3] = -1
    ignore_caffe = "ignore_label: -1 " if ignore else ""
    ignore_ours = ", ignore_label: -1" if ignore else ""
    net = make_net(side_by_side(shape, label_shape, "bottom",
                                "{normalization: %s%s}" % (normalization, ignore_ours),
                                CAFFE_NORMALIZATION % (ignore_caffe, normalization)))
    logits = (rng.standard_normal(shape) * 2).astype(np.float32)
    fill(net, logits, labels, make_h(h_kind, k, rng))
    assert float(net.blobs["l_ours"].data) == pytest.approx(float(net.blobs["l_caffe"].data), rel=2e-6, abs=1e-7)
    # Caffe forms p*S - H in float32: its rounding error scales with the largest gradient.
    caffe_grad = net.blobs["x_c"].diff
    np.testing.assert_allclose(net.blobs["x_o"].diff, caffe_grad, rtol=1e-5, atol=2e-6 * np.abs(caffe_grad).max())
    if ignore:  # ignored positions get no gradient from either layer
        mask = labels == -1
        moved = np.moveaxis(net.blobs["x_o"].diff, 1, -1)
        assert not moved[mask].any()


def test_h_from_files_matches_caffe_binaryproto(make_net, tmp_path, caffe):
    rng = np.random.default_rng(11)
    h = make_h("nonnegative", 5, rng)
    proto = tmp_path / "H.binaryproto"
    proto.write_bytes(caffe.io.array_to_blobproto(h.reshape(1, 1, 5, 5)).SerializeToString())
    npy = tmp_path / "H.npy"
    np.save(npy, h)
    labels = rng.integers(0, 5, size=8).astype(np.float32)
    logits = rng.standard_normal((8, 5)).astype(np.float32)
    for our_source in (proto, npy):
        net = make_net(side_by_side((8, 5), (8,), str(proto), "{source: '%s'}" % our_source, ours_h=False))
        fill(net, logits, labels, np.zeros((5, 5), np.float32))  # the Input H is unused here
        assert float(net.blobs["l_ours"].data) == pytest.approx(float(net.blobs["l_caffe"].data), rel=2e-6)
        np.testing.assert_allclose(net.blobs["x_o"].diff, net.blobs["x_c"].diff, rtol=1e-5, atol=1e-7)


def test_loss_weight_scales_loss_and_gradient_like_caffe(make_net):
    rng = np.random.default_rng(5)
    net = make_net(side_by_side((6, 3), (6,), "bottom", "{}", caffe_param="loss_weight: 2.5 ",
                                ours_loss_weight=2.5))
    fill(net, rng.standard_normal((6, 3)), rng.integers(0, 3, 6), make_h("nonnegative", 3, rng))
    np.testing.assert_allclose(net.blobs["x_o"].diff, net.blobs["x_c"].diff, rtol=1e-5, atol=1e-7)
    assert np.abs(net.blobs["x_o"].diff).max() > 0


def test_second_top_gives_the_softmax_probabilities(make_net):
    net = make_net('name: "p"\nlayer { name: "in" type: "Input" top: "x" top: "y" top: "H" input_param { '
                   'shape { dim: 2 dim: 3 } shape { dim: 2 } shape { dim: 3 dim: 3 } } }\n'
                   'layer { name: "ours" type: "Python" bottom: "x" bottom: "y" bottom: "H" top: "l" top: "prob" '
                   'loss_weight: 1 loss_weight: 0 python_param { module: "safe_layers" layer: "SafeInfogainLoss" } }\n')
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, -1.0]], np.float32)
    net.blobs["x"].data[...] = x
    net.blobs["H"].data[...] = np.eye(3)
    net.forward()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(net.blobs["prob"].data, e / e.sum(axis=1, keepdims=True), rtol=1e-6)


def test_other_axis(make_net):
    # Classes on axis 2 of an N x T x K blob; labels N x T.
    rng = np.random.default_rng(9)
    text = ('name: "ax"\nlayer { name: "in" type: "Input" top: "xo" top: "y" top: "H" input_param { '
            'shape { dim: 2 dim: 3 dim: 4 } shape { dim: 2 dim: 3 } shape { dim: 4 dim: 4 } } }\n'
            'layer { name: "b" type: "Bias" bottom: "xo" top: "x" bias_param { axis: 0 num_axes: 0 } }\n'
            'layer { name: "ours" type: "Python" bottom: "x" bottom: "y" bottom: "H" top: "l" loss_weight: 1 '
            'python_param { module: "safe_layers" layer: "SafeInfogainLoss" param_str: "{axis: -1}" } }\n')
    net = make_net(text)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 3))
    h = make_h("nonnegative", 4, rng)
    net.blobs["xo"].data[...] = x
    net.blobs["y"].data[...] = labels
    net.blobs["H"].data[...] = h
    net.forward()
    net.backward()
    log_p = x - x.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    expected = -(h[labels] * log_p).sum(-1).sum() / labels.size
    assert float(net.blobs["l"].data) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(net.blobs["x"].diff, numeric_gradient(net, "xo", "l", eps=1e-2),
                               rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("param_str", ["{}", "{class_weighting: batch_frequency, ignore_label: 0}"])
def test_backward_matches_finite_differences(make_net, param_str):
    rng = np.random.default_rng(21)
    net = make_net(side_by_side((5, 3, 2), (5, 2), "bottom", param_str))
    fill(net, rng.standard_normal((5, 3, 2)), rng.integers(0, 3, (5, 2)), make_h("nonnegative", 3, rng))
    numeric = numeric_gradient(net, "xo", "l_ours", eps=1e-2)
    np.testing.assert_allclose(net.blobs["x_o"].diff, numeric, rtol=2e-3, atol=2e-4)


def test_probabilities_input_after_softmax_equals_caffe_on_logits(make_net):
    """A pre-2017 prototxt (Softmax -> InfogainLoss on probabilities) with input: probabilities
    gives the loss and logit gradient of today's Caffe layer on logits."""
    rng = np.random.default_rng(4)
    text = side_by_side((6, 4), (6,), "bottom", "{input: probabilities}")
    text = text.replace('bottom: "x_o" bottom: "y"', 'bottom: "p_o" bottom: "y"').replace(
        'layer { name: "ours"', 'layer { name: "softmax" type: "Softmax" bottom: "x_o" top: "p_o" }\n'
                                'layer { name: "ours"')
    net = make_net(text)
    fill(net, rng.standard_normal((6, 4)) * 2, rng.integers(0, 4, 6), make_h("nonnegative", 4, rng))
    assert float(net.blobs["l_ours"].data) == pytest.approx(float(net.blobs["l_caffe"].data), rel=2e-6)
    np.testing.assert_allclose(net.blobs["x_o"].diff, net.blobs["x_c"].diff, rtol=1e-4, atol=1e-7)


# ---- where Caffe's layer goes non-finite or wrong -------------------------------------

def test_nan_logits_caffe_goes_nan_ours_reports_and_clamps(make_net, capfd):
    rng = np.random.default_rng(1)
    net = make_net(side_by_side((4, 3), (4,), "bottom", "{name: ig, follows: fc, action: clamp}"))
    logits = rng.standard_normal((4, 3)).astype(np.float32)
    logits[2, 1] = np.nan
    h = make_h("row_stochastic", 3, rng)
    labels = np.array([0, 1, 2, 1])
    fill(net, logits, labels, h)
    assert np.isnan(net.blobs["l_caffe"].data)
    assert np.isfinite(net.blobs["l_ours"].data) and np.isfinite(net.blobs["x_o"].diff).all()
    # The loss is that of the repaired logits (NaN -> 0) ...
    repaired = np.where(np.isnan(logits), 0, logits).astype(np.float64)
    log_p = repaired - np.log(np.exp(repaired).sum(1, keepdims=True))
    expected = -(h.astype(np.float64)[labels] * log_p).sum() / 4
    assert float(net.blobs["l_ours"].data) == pytest.approx(expected, rel=1e-6)
    # ... repaired on a copy: the layer below still owns its NaN.
    assert np.isnan(net.blobs["x_o"].data[2, 1])
    report = reporting.fault_logs("ig")[-1].last
    assert (report.nan, report.first_index, report.pass_) == (1, (2, 1), "forward data")
    assert "SafeInfogainLoss ig (after fc) in TRAIN: non-finite forward data" in capfd.readouterr().err


@pytest.mark.parametrize("action", ["warn", "clamp", "abort"])
def test_a_loss_float32_cannot_hold_is_reported(make_net, action):
    # Finite logits of +-3.4e38 with normalization NONE: the exact loss is ~6.8e38.
    net = make_net(side_by_side((2, 3), (2,), "bottom", "{name: big, normalization: NONE, action: %s}" % action))
    logits = np.array([[3.4e38, -3.4e38, 0], [0, 1, 2]], np.float32)
    if action == "abort":
        with pytest.raises(reporting.FaultAbort) as info:
            fill(net, logits, [1, 0], np.eye(3, dtype=np.float32))
        report = info.value.report
    else:
        fill(net, logits, [1, 0], np.eye(3, dtype=np.float32))
        report = reporting.fault_logs("big")[-1].last
        loss = float(net.blobs["l_ours"].data)
        assert loss == (np.inf if action == "warn" else np.finfo(np.float32).max)
        assert np.isfinite(net.blobs["x_o"].diff).all()  # p - H stays bounded
    assert (report.blob, report.blob_index, report.shape, report.posinf) == ("top", 0, (), 1)
    assert report.detail == "the loss 6.8e+38 overflows float32"
    assert "top[0] shape scalar: nan=0 +inf=1 -inf=0" in report.line()


@pytest.mark.parametrize("phase, loss_weight, warned", [("TRAIN", None, True), ("TRAIN", 1.0, False),
                                                         ("TEST", None, False)])
def test_a_loss_without_loss_weight_is_warned_once(make_net, capfd, tmp_path, monkeypatch, phase, loss_weight,
                                                   warned):
    monkeypatch.chdir(tmp_path)
    text = ('name: "lw"\nlayer { name: "in" type: "Input" top: "x" top: "y" input_param { '
            'shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n'
            'layer { name: "ours" type: "Python" bottom: "x" bottom: "y" top: "l" %s'
            'python_param { module: "safe_layers" layer: "SafeInfogainLoss" param_str: "{name: lw, source: H.npy}" } }\n'
            % ("loss_weight: %g " % loss_weight if loss_weight else ""))
    np.save("H.npy", np.eye(3))
    net = make_net(text, phase=phase)
    net.forward()
    net.forward()
    err = capfd.readouterr().err
    assert err.count("SafeInfogainLoss lw in %s: top[0] has loss weight 0" % phase) == (1 if warned else 0)
    if warned:
        assert "write loss_weight: 1 in the layer (with a second top: loss_weight: 1 loss_weight: 0)" in err


def test_label_count_is_checked_when_the_net_is_built(make_net):
    with pytest.raises(ValueError, match=r"SafeInfogainLoss cnt in TRAIN: 5 labels for 4 positions "
                                         r"\(bottom\[0\] shape \(4, 3\), axis 1: outer 4 x inner 1\)"):
        make_net(side_by_side((4, 3), (5,), "bottom", "{name: cnt}").replace(
            'layer { name: "caffe"', '# layer { name: "caffe"'))


def test_nan_logits_abort(make_net):
    net = make_net(side_by_side((4, 3), (4,), "bottom", "{name: iga, action: abort}"))
    logits = np.ones((4, 3), np.float32)
    logits[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"SafeInfogainLoss iga in TRAIN: .* \+inf=1 .* first bad at \[0, 0\]"):
        fill(net, logits, [0, 1, 2, 1], np.eye(3, dtype=np.float32))


def test_huge_logits_ours_is_exact_where_caffe_caps_at_log_1e20(make_net):
    net = make_net(side_by_side((2, 3), (2,), "bottom", "{}"))
    logits = np.array([[0.0, 200.0, -200.0], [5.0, 0.0, 1.0]], np.float32)
    labels = np.array([0, 0])
    fill(net, logits, labels, np.eye(3, dtype=np.float32))
    x = logits.astype(np.float64)
    log_p = x - x.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    exact = -(log_p[0, 0] + log_p[1, 0]) / 2  # ~ (200 + 0.02) / 2
    assert float(net.blobs["l_ours"].data) == pytest.approx(exact, rel=1e-6)
    # Caffe floors p at 1e-20: sample 0 contributes at most -log(1e-20) = 46.05.
    assert float(net.blobs["l_caffe"].data) < exact / 2
    np.testing.assert_allclose(net.blobs["x_o"].diff, net.blobs["x_c"].diff, rtol=1e-5, atol=1e-7)


def test_normalize_h_rows_matches_caffe_on_the_normalized_matrix(make_net):
    rng = np.random.default_rng(8)
    h = make_h("nonnegative", 4, rng) * 100  # class weights of ~100: ~100x the gradient in Caffe
    net = make_net(side_by_side((6, 4), (6,), "bottom", "{normalize_h: rows}"))
    logits, labels = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    fill(net, logits, labels, h)
    raw_caffe_grad = np.abs(net.blobs["x_c"].diff).max()
    reference = make_net(side_by_side((6, 4), (6,), "bottom", "{}"))
    fill(reference, logits, labels, h / h.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(net.blobs["x_o"].diff, reference.blobs["x_c"].diff, rtol=1e-5, atol=1e-7)
    assert raw_caffe_grad > 20 * np.abs(net.blobs["x_o"].diff).max()


@pytest.mark.parametrize("bad, message", [
    ((0, 1, -0.5), r"H\[0, 1\] = -0.5 is negative"),
    ((2, 2, np.inf), r"H\[2, 2\] = inf is not finite"),
    ((1, 0, np.nan), r"H\[1, 0\] = nan is not finite"),
])
def test_bad_h_in_a_file_fails_at_setup(make_net, tmp_path, bad, message):
    h = np.eye(3)
    h[bad[0], bad[1]] = bad[2]
    np.save(tmp_path / "H.npy", h)
    text = side_by_side((4, 3), (4,), "bottom", "{name: hf, source: '%s'}" % (tmp_path / "H.npy"), ours_h=False)
    with pytest.raises(ParamError, match="SafeInfogainLoss 'hf' param_str: key 'source' = .*: " + message):
        make_net(text)


def test_bad_h_from_a_bottom_fails_at_forward(make_net):
    net = make_net(side_by_side((4, 3), (4,), "bottom", "{name: hb}"))
    h = np.eye(3, dtype=np.float32)
    h[1, 2] = -1
    with pytest.raises(ValueError, match=r"SafeInfogainLoss hb in TRAIN: H\[1, 2\] = -1.0 is negative"):
        fill(net, np.zeros((4, 3)), [0, 1, 2, 0], h)


def test_wrong_size_h_file_and_missing_file(make_net, tmp_path):
    np.save(tmp_path / "H.npy", np.ones((2, 2)))
    with pytest.raises(ParamError, match=r"H has 4 values \(shape \(2, 2\)\); K = 3 classes need K\*K = 9"):
        make_net(side_by_side((4, 3), (4,), "bottom", "{source: '%s'}" % (tmp_path / "H.npy"), ours_h=False))
    with pytest.raises(ParamError, match="does not exist"):
        make_net(side_by_side((4, 3), (4,), "bottom", "{source: '%s'}" % (tmp_path / "no.npy"), ours_h=False))


def test_zero_row_cannot_be_normalized(make_net, tmp_path):
    h = np.eye(3)
    h[1] = 0
    np.save(tmp_path / "H.npy", h)
    with pytest.raises(ParamError, match="row 1 of H sums to 0"):
        make_net(side_by_side((4, 3), (4,), "bottom", "{source: '%s', normalize_h: rows}" % (tmp_path / "H.npy"),
                              ours_h=False))


@pytest.mark.parametrize("label, position", [(3.0, (2, 1)), (-2.0, (0, 0)), (np.nan, (1, 1))])
def test_out_of_range_label_is_an_error_naming_label_and_position(make_net, label, position):
    # Caffe's release build reads H out of bounds here; it is not run on these labels.
    text = side_by_side((3, 3, 2), (3, 2), "bottom", "{name: lab, ignore_label: -1}")
    text = text.replace('layer { name: "caffe"', '# layer { name: "caffe"')
    net = make_net(text)
    labels = np.zeros((3, 2), np.float32)
    labels[0, 1] = -1  # ignored: fine
    labels[position] = label
    with pytest.raises(ValueError, match=r"SafeInfogainLoss lab in TRAIN: label %s at position \(%d, %d\) \(outer, inner\) "
                                         r"is outside \[0, 3\) and is not ignore_label \(-1\)"
                                         % (re.escape(repr(float(label))), position[0], position[1])):
        fill(net, np.zeros((3, 3, 2)), labels, np.eye(3))


def test_all_ignored_batch_gives_zero_loss_and_gradient_like_caffe(make_net):
    net = make_net(side_by_side((4, 3), (4,), "bottom", "{ignore_label: 2}",
                                CAFFE_NORMALIZATION % ("ignore_label: 2 ", "VALID")))
    fill(net, np.random.default_rng(0).standard_normal((4, 3)), [2, 2, 2, 2], np.eye(3))
    assert float(net.blobs["l_ours"].data) == 0.0 == float(net.blobs["l_caffe"].data)
    assert not net.blobs["x_o"].diff.any() and not net.blobs["x_c"].diff.any()


def test_batch_frequency_weighting_stays_finite_with_an_absent_class(make_net):
    """The seed's loss normalized per label by its count in the batch divides by zero when a
    class is absent; ours weights present classes only."""
    rng = np.random.default_rng(2)
    net = make_net(side_by_side((6, 4), (6,), "bottom", "{class_weighting: batch_frequency}"))
    labels = np.array([0, 0, 0, 0, 1, 3])  # class 2 absent
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    h = make_h("row_stochastic", 4, rng)
    fill(net, logits, labels, h)
    x = logits.astype(np.float64)
    log_p = x - x.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    per_sample = -(h.astype(np.float64)[labels] * log_p).sum(1)
    counts = {0: 4, 1: 1, 3: 1}
    weights = np.array([6 / (3 * counts[c]) for c in labels])  # n_valid / (present * count)
    expected = (weights * per_sample).sum() / 6
    assert float(net.blobs["l_ours"].data) == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(net.blobs["x_o"].diff).all()
    # The gradient is that weighted loss's: sample 4 (class 1, alone) weighs 4x a class-0 sample.
    p = np.exp(log_p)
    s_row = h.astype(np.float64).sum(1)[labels]
    grad = (p * s_row[:, None] - h.astype(np.float64)[labels]) * weights[:, None] / 6
    np.testing.assert_allclose(net.blobs["x_o"].diff, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("param_str, message", [
    ("{normalization: MEAN}", "key 'normalization' has value 'MEAN'; allowed: one of VALID, BATCH_SIZE, FULL, NONE"),
    ("{input: probs}", "key 'input' has value 'probs'; allowed: one of logits, probabilities"),
    ("{axis: 3}", "key 'axis' has value 3; bottom\\[0\\] has 2 axes"),
    ("{source: H.npy}", "needs H from exactly one place"),
])
def test_bad_params_fail_at_setup(make_net, param_str, message):
    with pytest.raises(ParamError, match="SafeInfogainLoss param_str: " + message):
        make_net(side_by_side((4, 3), (4,), "bottom", param_str))
