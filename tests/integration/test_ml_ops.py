"""ai.onnx.ml graphs (scikit-learn exports): a classifier whose outputs include a sequence of maps
(ZipMap) passes through, with fidelity measured on its tensor outputs."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from test_cli import ptq


def _linear_classifier():
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [
        n("Scaler", ["x"], ["scaled"], domain="ai.onnx.ml", offset=[0.0] * 4, scale=[1.0] * 4),
        n("LinearClassifier", ["scaled"], ["label", "scores"], domain="ai.onnx.ml",
          coefficients=rng.normal(0, 1, 12).tolist(), intercepts=[0.1, -0.2, 0.0], classlabels_ints=[0, 1, 2]),
    ]
    return _with_zipmap(nodes, [], "scores", 4, helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))


def _with_zipmap(nodes: list, inits: list, scores: str, width: int, tensor_output) -> onnx.ModelProto:
    """A model of input x [N, width] whose outputs are `tensor_output` and `scores` as a ZipMap over
    three classes (a sequence of maps), as skl2onnx writes classifiers."""
    nodes = nodes + [helper.make_node("ZipMap", [scores], ["probabilities"], domain="ai.onnx.ml",
                                      classlabels_int64s=[0, 1, 2])]
    seq = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(nodes, "ml", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [tensor_output, helper.make_value_info("probabilities", seq)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 1)])


def _quantize(tmp_path, model: onnx.ModelProto, samples: int):
    """`ptq quantize` of `model` on normal samples; its result and the quantized model."""
    path, data, out = tmp_path / "ml.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(model, str(path))
    width = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    np.save(data, np.random.default_rng(1).normal(0, 1, (samples, width)).astype(np.float32))
    r = ptq("quantize", path, "--data", data, "-o", out)
    assert r.returncode == 0, r.stderr
    return r, onnx.load(str(out))


def test_a_classifier_with_a_zipmap_output_passes_through(tmp_path):
    r, quantized = _quantize(tmp_path, _linear_classifier(), 32)
    assert "nothing" in r.stdout.lower() or "0 / 0 / 0" in r.stdout
    assert quantized.graph.output[1].type.HasField("sequence_type")


def _mlp_classifier():
    """scikit-learn's MLPClassifier as skl2onnx writes it: MatMul/Add/Relu layers, a Softmax, and
    the probabilities both as a tensor and as a ZipMap."""
    rng = np.random.default_rng(2)
    n = helper.make_node
    inits = [helper.make_tensor(name, TensorProto.FLOAT, v.shape, v.ravel().tolist()) for name, v in (
        ("w1", rng.normal(0, 0.5, (8, 16))), ("b1", rng.normal(0, 0.1, 16)),
        ("w2", rng.normal(0, 0.5, (16, 3))), ("b2", rng.normal(0, 0.1, 3)))]
    nodes = [
        n("MatMul", ["x", "w1"], ["h_mm"], name="mm1"), n("Add", ["h_mm", "b1"], ["h_b"], name="add1"),
        n("Relu", ["h_b"], ["h"], name="relu1"),
        n("MatMul", ["h", "w2"], ["o_mm"], name="mm2"), n("Add", ["o_mm", "b2"], ["o"], name="add2"),
        n("Softmax", ["o"], ["probs"], name="softmax", axis=1),
    ]
    return _with_zipmap(nodes, inits, "probs", 8, helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]))


def test_an_mlp_with_a_zipmap_output_quantizes_its_layers(tmp_path):
    """The activation measurement compares the tensor outputs and passes over the sequence of maps."""
    _, quantized = _quantize(tmp_path, _mlp_classifier(), 64)
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    assert quantized.graph.output[1].type.HasField("sequence_type")
