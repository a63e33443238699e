"""A zero Pad in front of a Conv (TensorFlow's "same" padding, as EfficientNet-Lite exports have it)
becomes the Conv's own padding, so the quantized model runs it inside QLinearConv instead of as a
float Pad between a dequantize and a quantize; other Pads are left as they are."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptqcli.prepare import prepare
from ptqcli.runtime import optimized_op_counts, session
from test_cli import ptq


def _padded_cnn(second_pad_mode: str = "constant", second_value: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "same_pads"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "other_pads"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(second_value, np.float32), "value")]
    nodes = [helper.make_node("Pad", ["x", "same_pads", "zero"], ["p1"], name="pad1"),
             helper.make_node("Conv", ["p1", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Pad", ["r1", "other_pads"] + (["value"] if second_pad_mode == "constant" else []), ["p2"],
                              name="pad2", mode=second_pad_mode),
             helper.make_node("Conv", ["p2", "w2"], ["y"], name="conv2", pads=[1, 0, 0, 1])]
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _same_outputs(a, b):
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(session(a).run(None, {"x": x})[0], session(b).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_zero_pads_fold_into_the_convolutions_and_other_pads_stay():
    model = _padded_cnn()
    g = prepare(model)
    assert "Pad" not in {n.op_type for n in g.graph.node} and g.facts["pads_folded"] == 2
    conv2 = g.node_by_name["conv2"]
    assert next(list(a.ints) for a in conv2.attribute if a.name == "pads") == [2, 2, 2, 2]  # [1, 0, 0, 1] + the Pad's [1, 2, 2, 1]
    _same_outputs(g.model, model)
    for mode, value in (("reflect", 0.0), ("constant", 0.5)):
        other = _padded_cnn(mode, value)
        kept = prepare(other)
        assert [n.name for n in kept.graph.node if n.op_type == "Pad"] == ["pad2"] and kept.facts["pads_folded"] == 1
        _same_outputs(kept.model, other)


def test_the_quantized_model_runs_no_float_pad(tmp_path):
    model, data, out = tmp_path / "padded.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(_padded_cnn(), str(model))
    np.save(data, np.random.default_rng(0).normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "-o", out, "--no-latency")
    assert r.returncode == 0, r.stderr
    kernels = optimized_op_counts(onnx.load(str(out)))
    assert kernels.get("QLinearConv") and "Pad" not in kernels, kernels  # the last Conv writes the float output
