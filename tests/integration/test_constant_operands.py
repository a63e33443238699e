"""A decomposed HardSwish between two convolutions stays on ORT's integer kernels: its + 3 and / 6
become quantized constant operands of QLinearAdd and QLinearMul, with no float op in between."""

import numpy as np
import onnx

from builders import hardswish_cnn_model
from ptqcli.prepare import prepare
from ptqcli.runtime import optimized_op_counts, session
from test_cli import ptq


def test_division_by_a_constant_becomes_a_product_within_float_rounding():
    model = hardswish_cnn_model()
    g = prepare(model)
    assert "Div" not in {n.op_type for n in g.graph.node} and g.facts["divisions_as_products"] == 1
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(session(g.model).run(None, {"input": x})[0], session(model).run(None, {"input": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_hardswish_runs_on_integer_kernels_between_the_convolutions(tmp_path):
    model, data, out = tmp_path / "hs.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(hardswish_cnn_model(), str(model))
    rng = np.random.default_rng(0)
    np.save(data, rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "-o", out)
    assert r.returncode == 0, r.stderr
    kernels = optimized_op_counts(onnx.load(str(out)))
    assert kernels.get("QLinearConv") == 2 and kernels.get("QLinearAdd") == 1 and kernels.get("QLinearMul") == 2, kernels
    assert not {"Add", "Mul", "Div", "Clip"} & set(kernels), kernels
    assert kernels.get("DequantizeLinear") == 1 and kernels.get("QuantizeLinear") == 1  # the input and the float tail
    x = rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    f = session(onnx.load(str(model))).run(None, {"input": x})[0]
    q = session(onnx.load(str(out))).run(None, {"input": x})[0]
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(f, q)) > 0.99


def test_an_erf_gelus_division_stays_so_that_ort_fuses_the_gelu():
    """x / sqrt(2) inside x * 0.5 * (1 + erf(x / sqrt(2))) is not rewritten: ORT fuses the pattern into
    one Gelu only with the division (MiniLM's three GELUs ran unfused after the rewrite)."""
    from onnx import TensorProto, helper, numpy_helper

    from ptqcli.runtime import optimized_model

    c = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="add"),
             helper.make_node("Mul", ["h", "a"], ["m"], name="mul"),
             helper.make_node("Mul", ["m", "half"], ["y"], name="half_mul")]
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.2, (16, 16)).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              [w, c("sqrt2", np.sqrt(2.0)), c("one", 1.0), c("half", 0.5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = prepare(model)
    assert g.facts["divisions_as_products"] == 0 and "Div" in {n.op_type for n in g.graph.node}
    fused = {n.op_type for n in optimized_model(g.model, "the prepared model").graph.node}
    assert "Erf" not in fused and fused & {"Gelu", "BiasGelu", "FastGelu"}, fused


def test_a_sum_of_two_tensors_becomes_an_add_that_runs_on_integers(tmp_path):
    """A residual join written as Sum (older exporters) is an Add after preparation, with the same
    outputs, so that ORT's QLinearAdd takes it instead of a float Sum between Q/DQ pairs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda name: numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["input", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu0"),
             helper.make_node("Conv", ["r", "w1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sum", ["r", "b"], ["s"], name="join"),
             helper.make_node("Relu", ["s"], ["rs"], name="relu1"),
             helper.make_node("Conv", ["rs", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
                              [w("w0"), w("w1"), w("w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = prepare(model)
    assert g.facts["sums_as_adds"] == 1 and "Sum" not in {n.op_type for n in g.graph.node}
    x = rng.normal(0, 1, (4, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(session(g.model).run(None, {"input": x})[0], session(model).run(None, {"input": x})[0])
    path, data, out = tmp_path / "residual.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(model, str(path))
    np.save(data, rng.normal(0, 1, (64, 8, 8, 8)).astype(np.float32))
    # every activation quantized (no damage measurement), as a Sum could not be before
    r = ptq("quantize", path, "--data", data, "--act-damage-limit", "inf", "-o", out)
    assert r.returncode == 0, r.stderr
    kernels = optimized_op_counts(onnx.load(str(out)))
    assert kernels.get("QLinearAdd") == 1 and "Sum" not in kernels, kernels
