"""float16 graphs: computed in float32 inside, their float16 inputs and outputs kept, quantized onto
ORT's integer kernels; bfloat16 refused in one line."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from builders import as_float16, conv_bn_relu_model
from ptqcli.prepare import prepare
from ptqcli.runtime import optimized_op_counts, session
from test_cli import assert_user_error, ptq


def test_a_float16_cnn_quantizes_onto_integer_kernels_and_keeps_its_float16_interface(tmp_path):
    model, data, out = tmp_path / "cnn16.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(as_float16(conv_bn_relu_model()), str(model))
    x = np.random.default_rng(0).normal(0, 1, (96, 3, 8, 8)).astype(np.float16)
    np.save(data, x)
    r = ptq("quantize", model, "--data", data, "-o", out)
    assert r.returncode == 0, r.stderr
    quantized = onnx.load(str(out))
    assert [i.type.tensor_type.elem_type for i in quantized.graph.input] == [TensorProto.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in quantized.graph.output] == [TensorProto.FLOAT16]
    kernels = optimized_op_counts(quantized)
    assert kernels.get("QLinearConv") == 2 and kernels.get("QGemm", 0) + kernels.get("QLinearMatMul", 0) == 1, kernels
    assert not any(t.data_type == TensorProto.FLOAT16 for t in quantized.graph.initializer)
    f = session(onnx.load(str(model))).run(None, {"input": x})[0]
    q = session(quantized).run(None, {"input": x})[0]
    assert q.dtype == np.float16
    assert np.mean(f.argmax(1) == q.argmax(1)) >= 0.95


def test_float16_inside_subgraphs_and_casts_is_widened():
    """Cast(to=float16) and float16 constants, in the main graph and in an If branch."""
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT16, [1], [2.0])),
         helper.make_node("Mul", ["h", "c"], ["b_out"])],
        "branch", [], [helper.make_tensor_value_info("b_out", TensorProto.FLOAT16, ["N", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["o_out"])], "other", [],
                              [helper.make_tensor_value_info("o_out", TensorProto.FLOAT16, ["N", 4])])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other)],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = prepare(model)
    assert g.facts["float16_widened"] >= 4
    assert not any(a.i == TensorProto.FLOAT16 for n in g.graph.node if n.op_type == "Cast"
                   and n.name != "y__to_float16" for a in n.attribute)
    feeds = {"ids": np.arange(8, dtype=np.int64).reshape(2, 4), "flag": np.array(True)}
    expected = session(model).run(None, feeds)[0]
    got = session(g.model).run(None, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, expected)


def test_bfloat16_is_refused_in_one_line(tmp_path):
    model = tmp_path / "bf16.onnx"
    onnx.save(as_float16(conv_bn_relu_model(), TensorProto.BFLOAT16), str(model))
    assert_user_error(ptq("quantize", model, "--acts", "dynamic", "-o", tmp_path / "q.onnx"),
                      "bfloat16 tensors, which ONNX Runtime's CPU provider cannot run")
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "q.onnx.run").exists()
