"""Binary-input layers: the ONNX emulation equals the XNOR-popcount reference, which the native
Binary* operators equal bit for bit (tests/unit/test_native_kernels.py)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli.export import native_ref as R
from ptqcli.export.binarize import binarize_layer
from ptqcli.runtime import session


def _run_emulation(op_type, x, w_binary, w_float, mean, bias, **attrs):
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = helper.make_node(op_type, inputs, ["y"], name="layer", **attrs)
    before, after, inits = binarize_layer(node, mean, w_float, bias)
    consts = [numpy_helper.from_array(w_binary, "w")] + ([numpy_helper.from_array(bias, "b")] if bias is not None else [])
    graph = helper.make_graph(before + [node] + after, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], consts + inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return session(model).run(["y"], {"x": x})[0]


def _binary(w_rows, rng):
    alpha = np.abs(w_rows).mean(axis=1).astype(np.float32)
    return alpha, (np.where(w_rows < 0, -1, 1) * alpha[:, None]).astype(np.float32)


@pytest.mark.parametrize("group,pads,strides,dilations", [
    (1, (1, 1, 1, 1), (1, 1), (1, 1)),
    (1, (0, 2, 1, 0), (2, 1), (1, 2)),
    (2, (1, 1, 1, 1), (2, 2), (1, 1)),
    (6, (1, 1, 1, 1), (1, 1), (1, 1)),  # depthwise
])
def test_binary_conv_emulation_is_the_xnor_reference(group, pads, strides, dilations):
    rng = np.random.default_rng(group)
    c, n, kernel = 6, 6, (3, 3)
    x = rng.normal(0.5, 1.0, size=(2, c, 9, 8)).astype(np.float32)
    w = rng.normal(size=(n, c // group) + kernel).astype(np.float32)
    mean = rng.normal(0.5, 0.2, size=c).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    alpha, w_bin = _binary(w.reshape(n, -1), rng)
    y = _run_emulation("Conv", x, w_bin.reshape(w.shape), w, mean, bias, group=group, pads=list(pads),
                       strides=list(strides), dilations=list(dilations))
    rows = w.reshape(n, -1)
    want = R.conv_reference(x - mean.reshape(1, c, 1, 1),
                            lambda r, valid, cols: R.binary_gemm_reference(r, rows[cols], alpha[cols], None, valid),
                            n, kernel, strides, pads, dilations, group, masked=True)
    folded = np.einsum("mct,mc->m", w.reshape(n, c // group, -1),
                       mean.reshape(group, -1)[np.arange(n) // (n // group)]) + bias
    np.testing.assert_allclose(y, want + folded.reshape(1, n, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type,trans_b", [("Gemm", 1), ("Gemm", 0), ("MatMul", 0)])
def test_binary_gemm_and_matmul_emulation_is_the_xnor_reference(op_type, trans_b):
    rng = np.random.default_rng(3)
    k, n = 70, 5
    x = rng.normal(0.3, 1.0, size=(4, k)).astype(np.float32)
    rows = rng.normal(size=(n, k)).astype(np.float32)
    w = rows if trans_b else rows.T.copy()
    mean = rng.normal(0.3, 0.1, size=k).astype(np.float32)
    alpha, w_bin_rows = _binary(rows, rng)
    w_bin = w_bin_rows if trans_b else w_bin_rows.T.copy()
    bias = rng.normal(size=n).astype(np.float32) if op_type == "Gemm" else None
    attrs = {"transB": trans_b} if op_type == "Gemm" else {}
    y = _run_emulation(op_type, x, w_bin, w, mean, bias, **attrs)
    want = R.binary_gemm_reference(x - mean, rows, alpha) + rows @ mean + (0 if bias is None else bias)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
