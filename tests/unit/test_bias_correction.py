"""Bias correction: the computed shift equals the measured output mean shift."""

import numpy as np
from onnx import helper

from ptqcli.calibrate.bias_correction import output_shift


def _conv(x, w, group):
    """Direct grouped 'valid' convolution, stride 1: the slow reference."""
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    out = np.zeros((n, cout, h - kh + 1, wd - kw + 1))
    per_group = cout // group
    for o in range(cout):
        g = o // per_group
        xs = x[:, g * cin_g:(g + 1) * cin_g]
        for i in range(h - kh + 1):
            for j in range(wd - kw + 1):
                out[:, o, i, j] = np.einsum("nckl,ckl->n", xs[:, :, i:i + kh, j:j + kw], w[o])
    return out


def test_grouped_conv_shift_matches_measured_mean_shift():
    rng = np.random.default_rng(0)
    group = 2
    w = rng.normal(size=(4, 3, 3, 3))
    wq = np.round(w * 2) / 2
    # Inputs constant over space per channel: the mean shift is then exact, borders included.
    x = rng.normal(size=(16, 6, 1, 1)) + rng.normal(size=(1, 6, 1, 1)) * 3
    x = np.broadcast_to(x, (16, 6, 5, 5)).copy()
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    measured = (_conv(x, w, group) - _conv(x, wq, group)).mean(axis=(0, 2, 3))
    shift = output_shift(node, w, wq, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(shift, measured, rtol=1e-10, atol=1e-10)


def test_gemm_and_matmul_shift_is_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 5)) + 2.0
    for transB, w in ((1, rng.normal(size=(3, 5))), (0, rng.normal(size=(5, 3)))):
        wq = np.round(w)
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=transB)
        y, yq = (x @ (w.T if transB else w)), (x @ (wq.T if transB else wq))
        np.testing.assert_allclose(output_shift(node, w, wq, x.mean(0)), (y - yq).mean(0), rtol=1e-10)
    w = rng.normal(size=(5, 3))
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    np.testing.assert_allclose(output_shift(node, w, np.round(w), x.mean(0)), (x @ w - x @ np.round(w)).mean(0),
                               rtol=1e-10)


def test_unsupported_shapes_give_none():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    assert output_shift(node, np.ones((4, 3, 1, 1)), np.zeros((4, 3, 1, 1)), np.ones(5)) is None


def test_layerwise_rounding_turns_default_bias_correction_off():
    from ptqcli.config import QuantConfig

    assert QuantConfig(weights="int4", rounding="nearest").corrects_bias
    assert not QuantConfig(weights="int4", rounding="adaround").corrects_bias
    assert not QuantConfig(weights="pow2:4", rounding="adaquant").corrects_bias
    assert QuantConfig(weights="int4", rounding="adaround", bias_correction=True).corrects_bias
    assert not QuantConfig(weights="int8", rounding="nearest").corrects_bias
    assert QuantConfig(weights="int4").corrects_bias  # auto, unresolved (no calibration): as nearest
