"""Quantize/dequantize in numpy must agree exactly with ONNX Runtime's QuantizeLinear/DequantizeLinear."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli.export.qdq import onnx_int_type
from ptqcli.graph import make_initializer
from ptqcli.quant import channel_ranges, dequantize, quantize, scale_zero_point, sqnr_db
from ptqcli.formats import QuantSpec, quant_range


def _ort_quantize(x, scale, zp, spec):
    """Run QuantizeLinear then DequantizeLinear in ORT; return (integers, dequantized floats)."""
    opset = 21 if spec.storage_bits == 4 else 13
    attrs = {"axis": spec.axis} if spec.axis is not None else {}
    qtype = onnx_int_type(spec)
    np_type = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT4: np.int8,
               TensorProto.UINT4: np.uint8}[qtype]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
    ]
    inits = [numpy_helper.from_array(scale.astype(np.float32), "s"), make_initializer("z", zp.astype(np_type), qtype)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("q32", TensorProto.INT32, None),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = sess.run(["q32", "y"], {"x": x})
    return q, y


CASES = [
    QuantSpec(8, signed=True, symmetric=True, axis=0),
    QuantSpec(8, signed=True, symmetric=True, axis=0, reduce_range=True),
    QuantSpec(8, signed=False, symmetric=False),
    QuantSpec(8, signed=True, symmetric=False),
    QuantSpec(4, signed=True, symmetric=True, axis=0),
    QuantSpec(4, signed=True, symmetric=True, axis=1),
    QuantSpec(4, signed=False, symmetric=False),
]


@pytest.mark.parametrize("spec", CASES, ids=str)
def test_quantize_dequantize_match_onnxruntime_exactly(spec):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5, 3, 3)) * rng.uniform(0.1, 3, (6, 1, 1, 1))).astype(np.float32)
    # Values exactly on half-steps exercise round-half-to-even.
    x.flat[:20] = (np.arange(20) - 10) * 0.5
    lo, hi = channel_ranges(x, spec.axis)
    scale, zp = scale_zero_point(lo, hi, spec)
    if spec.axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    q = quantize(x, scale, zp, spec)
    ort_q, ort_y = _ort_quantize(x, scale, zp, spec)
    np.testing.assert_array_equal(q, ort_q)
    np.testing.assert_array_equal(dequantize(q, scale, zp, spec), ort_y)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax


def test_ranges_of_grids():
    assert quant_range(QuantSpec(8, True, True)) == (-127, 127)
    assert quant_range(QuantSpec(8, True, False)) == (-128, 127)
    assert quant_range(QuantSpec(8, True, True, reduce_range=True)) == (-63, 63)
    assert quant_range(QuantSpec(8, False, False)) == (0, 255)
    assert quant_range(QuantSpec(4, True, True)) == (-7, 7)
    assert quant_range(QuantSpec(4, False, False)) == (0, 15)


def test_zero_is_exactly_representable_and_range_covered():
    spec = QuantSpec(8, signed=False, symmetric=False)
    scale, zp = scale_zero_point(np.array(-0.3), np.array(2.1), spec)
    assert dequantize(quantize(np.zeros(1, np.float32), scale, zp, spec), scale, zp, spec)[0] == 0.0
    edges = dequantize(quantize(np.array([-0.3, 2.1], np.float32), scale, zp, spec), scale, zp, spec)
    np.testing.assert_allclose(edges, [-0.3, 2.1], atol=float(scale))


def test_all_zero_channel_gets_a_usable_scale():
    spec = QuantSpec(8, True, True, axis=0)
    w = np.zeros((2, 4), np.float32)
    w[1] = [1, -2, 3, 0.5]
    scale, zp = scale_zero_point(*channel_ranges(w, 0), spec)
    assert np.all(scale > 0)
    np.testing.assert_array_equal(dequantize(quantize(w, scale, zp, spec), scale, zp, spec)[0], 0)


def test_sqnr_matches_definition():
    x = np.array([1.0, 2.0, 3.0])
    y = x + np.array([0.1, -0.1, 0.0])
    assert sqnr_db(x, y) == pytest.approx(10 * np.log10(14 / 0.02))
    assert sqnr_db(x, x) == float("inf")


def test_mse_weight_clipping_never_worse_than_minmax_and_matches_brute_force():
    from ptqcli.calibrate.planner import CLIP_RATIOS, clip_ratio, quantize_weight

    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(6, 40)).astype(np.float32)  # heavy tails: clipping pays
    spec = QuantSpec(3, signed=True, symmetric=True, axis=0)
    mse, mm = quantize_weight(w, spec, "mse"), quantize_weight(w, spec, "minmax")
    assert mse.source["sqnr_db"] > mm.source["sqnr_db"]
    ratios = clip_ratio(w, spec)
    for c in range(6):
        peak = np.abs(w[c]).max()
        errs = [np.sum((w[c] - np.clip(np.rint(w[c] / (peak * r / 3)), -3, 3) * (peak * r / 3)) ** 2) for r in CLIP_RATIOS]
        assert ratios[c] == CLIP_RATIOS[int(np.argmin(errs))]


@pytest.mark.parametrize("shape, axis, block, symmetric", [
    ((40, 24), None, None, True), ((40, 24), 0, None, False), ((40, 24), 1, None, True),
    ((64, 24), 0, 16, False), ((24, 64), 1, 16, True), ((6, 5, 3, 3), 0, None, True),
])
def test_slice_by_slice_quantization_is_the_whole_tensor_quantization(monkeypatch, shape, axis, block, symmetric):
    """codes() and grid_sqnr_db() cut large weights into slices; with slices of a few dozen values
    they must still give what one whole-tensor pass gives."""
    from ptqcli import quant
    from ptqcli.quant import block_ranges, codes, grid_sqnr_db

    rng = np.random.default_rng(len(shape) + (axis or 0))
    w = rng.normal(size=shape).astype(np.float32)
    spec = QuantSpec(bits=4, signed=True, symmetric=symmetric, axis=axis, block_size=block)
    lo, hi = (block_ranges(w, axis, block) if block else channel_ranges(w, axis))
    scale, zp = scale_zero_point(lo, hi, spec)
    whole = quantize(w, scale, zp, spec)
    expected_sqnr = sqnr_db(w, dequantize(whole, scale, zp, spec))
    monkeypatch.setattr(quant, "SLICE_VALUES", 50)
    assert len(list(quant.slices(w.shape, spec))) > 1
    np.testing.assert_array_equal(codes(w, scale, zp, spec, np.int16), whole)
    assert grid_sqnr_db(w, scale, zp, spec) == pytest.approx(expected_sqnr, rel=1e-9)
