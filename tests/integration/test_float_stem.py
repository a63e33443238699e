"""A shallow stem Conv (one input channel) stays float, and the Relu (or LeakyRelu) -> MaxPool after
it is written so that ORT runs the MaxPool in float instead of on uint8 in NCHW layout."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli import stages
from ptqcli.calibrate.select import float_stems, select
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.graph import Graph
from ptqcli.plan import STEM_REASON
from ptqcli.runtime import optimized_op_counts, session


def _stem_model(channels: int = 1, kernel: int = 3, normalize: bool = False, act: str = "Relu") -> onnx.ModelProto:
    """input [N, C, 16, 16] (-> Sub mean) -> Conv -> `act` -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten."""
    rng = np.random.default_rng(0)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)  # noqa: E731
    n = helper.make_node
    pad = kernel // 2
    nodes = [n("Sub", ["input", "mean"], ["x"], name="normalize")] if normalize else []
    nodes += [n("Conv", ["x" if normalize else "input", "w1", "b1"], ["c1"], name="stem", pads=[pad] * 4),
              n(act, ["c1"], ["r1"], name="relu1"),
              n("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
              n("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
              n("Relu", ["c2"], ["r2"], name="relu2"),
              n("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
              n("GlobalAveragePool", ["p2"], ["gap"], name="gap"),
              n("Flatten", ["gap"], ["features"], name="flatten")]
    inits = [c("w1", rng.normal(0, 0.5, (8, channels, kernel, kernel))), c("b1", rng.normal(0, 0.1, 8)),
             c("w2", rng.normal(0, 0.3, (16, 8, 3, 3))), c("b2", rng.normal(0, 0.1, 16)), c("mean", 0.5)]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 16, 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_only_shallow_convs_on_the_model_input_are_stems():
    assert float_stems(Graph(_stem_model(1))) == ["stem"]
    assert float_stems(Graph(_stem_model(1, normalize=True))) == ["stem"]  # a normalisation first
    assert float_stems(Graph(_stem_model(2))) == ["stem"]  # 18 multiply-accumulates per output
    assert float_stems(Graph(_stem_model(3))) == []  # an RGB 3x3 stem: 27
    assert float_stems(Graph(_stem_model(1, kernel=7))) == []  # 49


def test_a_stem_stays_float_unless_asked_and_only_with_8bit_activations():
    g = Graph(_stem_model(1))
    sel = select(g, QuantConfig())
    assert sel.float_nodes == {"stem": STEM_REASON}
    assert [layer.node for layer in sel.layers] == ["conv2"] and "input" not in sel.activations
    assert "stem" in [layer.node for layer in select(g, QuantConfig(float_stem=False)).layers]
    assert "stem" in [layer.node for layer in select(g, QuantConfig(acts="none")).layers]  # weight-only


@pytest.fixture(scope="module", params=["Relu", "LeakyRelu"])
def exported(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("stem")
    model, calib = tmp / "m.onnx", tmp / "calib.npy"
    onnx.save(_stem_model(1, act=request.param), str(model))
    x = np.random.default_rng(1).random((32, 1, 16, 16), dtype=np.float32)
    np.save(calib, x)
    paths = {}
    for name, float_stem in (("float_stem", True), ("quantized_stem", False)):
        run = tmp / name
        stages.calibrate(model, QuantConfig(float_stem=float_stem), DataConfig(path=str(calib)), run)
        paths[name] = tmp / f"{name}.onnx"
        stages.export(run, paths[name], None, 0, latency=False)
    return model, paths, x


def test_the_pool_runs_before_the_relu_and_in_float(exported):
    model, paths, x = exported
    q = onnx.load(str(paths["float_stem"]))
    act = q.graph.node[[n.name for n in q.graph.node].index("relu1")].op_type
    order = [n.op_type for n in q.graph.node if n.op_type in ("Conv", act, "MaxPool", "QuantizeLinear")]
    assert order[:4] == ["Conv", "MaxPool", act, "QuantizeLinear"]  # the stem's, then conv2's as before
    assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"p1", "r2"}  # no Q/DQ on c1, r1
    ops = optimized_op_counts(q)
    assert ops.get("QLinearConv") == 1 and "QLinearLeakyRelu" not in ops  # conv2; the activation in float
    # the stem's pool in float (ORT's blocked NCHWc layout); only conv2's pool runs on uint8, in NHWC
    assert ops.get("NhwcMaxPool") == 1 and ops.get("MaxPool") == 1
    # the same model: against the float model as close as with the stem quantized, the pool rewrite exact
    ref = session(onnx.load(str(model))).run(None, {"input": x})[0]
    got = {name: session(onnx.load(str(p))).run(None, {"input": x})[0] for name, p in paths.items()}
    error = {name: float(np.abs(v - ref).max()) for name, v in got.items()}
    assert error["float_stem"] <= error["quantized_stem"] and error["float_stem"] < 0.05 * np.abs(ref).max()


def test_a_quantized_stem_keeps_its_relu_before_the_pool(exported):
    _, paths, _ = exported
    q = onnx.load(str(paths["quantized_stem"]))
    order = [n.op_type for n in q.graph.node if n.op_type in ("Conv", "Relu", "LeakyRelu", "MaxPool")]
    assert order[:3] == ["Conv", q.graph.node[[n.name for n in q.graph.node].index("relu1")].op_type, "MaxPool"]
    assert order[3:] == ["Conv", "Relu", "MaxPool"]
    assert optimized_op_counts(q).get("QLinearConv") == 2


def test_the_plan_table_names_why_nodes_stay_float():
    from ptqcli.calibrate.select import GELU_REASON
    from ptqcli.report import _reason_label

    assert _reason_label(STEM_REASON) == "a stem Conv with few input channels"
    assert _reason_label(GELU_REASON) == "part of an erf GELU"
    assert _reason_label("Softmax has no quantized form here") == "Softmax"
    assert _reason_label("MatMul of two activations: no faster on 8-bit integers") == "MatMul"
