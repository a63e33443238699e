"""The numpy graph executor: whole models against ONNX Runtime, reverse pass against finite
differences."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli.errors import PtqError
from ptqcli.numeric import Program, batch_stats, batch_stats_vjp, grad_graph, run_graph
from ptqcli.runtime import session, with_outputs

ASSETS = Path(__file__).resolve().parents[2] / "ptqcli" / "assets"


def _small_cnn(seed: int = 0) -> onnx.ModelProto:
    """input[N,3,8,8] -> Conv -> BatchNorm -> Relu -> MaxPool -> GlobalAveragePool -> Reshape -> Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    inits = [
        init("w1", rng.normal(0, 0.4, (6, 3, 3, 3))), init("b1", rng.normal(0, 0.1, 6)),
        init("bn_scale", rng.uniform(0.5, 2, 6)), init("bn_bias", rng.normal(0, 0.2, 6)),
        init("bn_mean", rng.normal(0, 0.3, 6)), init("bn_var", rng.uniform(0.5, 2, 6)),
        init("fc_w", rng.normal(0, 0.5, (4, 6))), init("fc_b", rng.normal(0, 0.1, 4)),
    ]
    shape = helper.make_tensor("shape_value", TensorProto.INT64, [2], [0, -1])
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
        helper.make_node("Constant", [], ["shape"], name="shape", value=shape),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def fashion() -> onnx.ModelProto:
    return onnx.load(str(ASSETS / "fashion_cnn.onnx"))


@pytest.fixture(scope="module")
def fashion_samples() -> np.ndarray:
    return np.load(ASSETS / "fashion_test.npz")["input"][:8]


def _projected_fd(loss, x: np.ndarray, u: np.ndarray, eps: float = 1e-6) -> float:
    return (loss(x + eps * u) - loss(x - eps * u)) / (2 * eps)


def test_small_cnn_forward_matches_onnxruntime():
    model = _small_cnn()
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    ours = run_graph(model, {"input": x}, keep=["bn", "p"])
    theirs = session(with_outputs(model, ["bn", "p"])).run(["logits", "bn", "p"], {"input": x})
    assert list(ours) == ["logits", "bn", "p"]
    for got, expected in zip(ours.values(), theirs):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_small_cnn_gradients_match_finite_differences():
    """Input and weight cotangents of <v, logits> in float64, each checked along a random direction."""
    model = _small_cnn()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 8, 8))
    v = rng.normal(size=(2, 4))
    weights = ["w1", "bn_scale", "fc_w", "fc_b"]
    grads = grad_graph(model, {"input": x}, {"logits": v}, initializers=weights, dtype=np.float64)
    assert set(grads) == {"input", *weights}
    program = Program(model, dtype=np.float64)
    for name in ["input", *weights]:
        base = x if name == "input" else program.constants[name]
        u = rng.normal(size=base.shape)

        def loss(value, name=name):
            feeds = {"input": x, name: value}
            return float(np.vdot(v, program.run(feeds)["logits"]))

        assert float(np.vdot(grads[name], u)) == pytest.approx(_projected_fd(loss, base, u), rel=1e-5, abs=1e-7), name


def test_fashion_model_matches_onnxruntime(fashion, fashion_samples):
    ours = run_graph(fashion, {"input": fashion_samples}, keep=["bn2", "pool2"])
    theirs = session(with_outputs(fashion, ["bn2", "pool2"])).run(["logits", "bn2", "pool2"],
                                                                 {"input": fashion_samples})
    for got, expected in zip(ours.values(), theirs):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (ours["logits"].argmax(1) == theirs[0].argmax(1)).all()


def test_fashion_input_gradient_matches_finite_differences(fashion, fashion_samples):
    rng = np.random.default_rng(4)
    # Blank background makes exact ties in MaxPool windows, where the max is not differentiable.
    x = fashion_samples[:2] + rng.normal(0, 0.01, size=(2, 1, 28, 28))
    v, u = rng.normal(size=(2, 10)), rng.normal(size=x.shape)
    grads = grad_graph(fashion, {"input": x}, {"logits": v}, dtype=np.float64)
    program = Program(fashion, dtype=np.float64)

    def loss(value):
        return float(np.vdot(v, program.run({"input": value})["logits"]))

    assert float(np.vdot(grads["input"], u)) == pytest.approx(_projected_fd(loss, x, u), rel=1e-5)


def test_batchnorm_statistics_loss_gradient(fashion, fashion_samples):
    """The synthetic-data objective: match each BatchNorm input's batch statistics to the layer's
    running ones; cotangents enter at intermediate tensors and meet on the way to the input."""
    program = Program(fashion, dtype=np.float64)
    bns = [n for n in fashion.graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(5).normal(size=(3, 1, 28, 28))

    def loss_and_seeds(values):
        loss, seeds = 0.0, {}
        for bn in bns:
            mean, var = batch_stats(values[bn.input[0]])
            d_mean = mean - program.constants[bn.input[3]]
            d_var = var - program.constants[bn.input[4]]
            loss += 0.5 * float(d_mean @ d_mean + d_var @ d_var)
            seeds[bn.input[0]] = batch_stats_vjp(values[bn.input[0]], d_mean, d_var)
        return loss, seeds

    keep = [bn.input[0] for bn in bns]
    tape = program.record({"input": x}, wrt=["input"], keep=keep)
    _, seeds = loss_and_seeds(tape.values)
    grad = tape.backward(seeds)["input"]
    u = np.random.default_rng(6).normal(size=x.shape)
    numeric = _projected_fd(lambda t: loss_and_seeds(program.run({"input": t}, keep=keep))[0], x, u)
    assert float(np.vdot(grad, u)) == pytest.approx(numeric, rel=1e-5)


def test_tape_saves_less_when_only_the_input_gradient_is_wanted(fashion, fashion_samples):
    program = Program(fashion)
    weights = [t.name for t in fashion.graph.initializer]
    input_only = program.record({"input": fashion_samples}, wrt=["input"]).saved_bytes()
    everything = program.record({"input": fashion_samples}, wrt=["input", *weights]).saved_bytes()
    nothing = program.record({"input": fashion_samples}, wrt=[]).saved_bytes()
    assert nothing == 0
    # No Conv or BatchNorm activations: masks, pooling winners and the weights themselves.
    assert input_only < everything / 3


def test_unreached_tensors_get_zero_cotangents():
    model = _small_cnn()
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    bn = run_graph(model, {"input": x}, keep=["bn"])["bn"]
    grads = grad_graph(model, {"input": x}, {"bn": np.ones_like(bn)}, initializers=["fc_w"])
    assert not grads["fc_w"].any() and grads["fc_w"].shape == (4, 6)
    assert grads["input"].any()


def test_tape_backward_runs_once():
    program = Program(_small_cnn())
    tape = program.record({"input": np.zeros((1, 3, 8, 8), np.float32)}, wrt=["input"])
    tape.backward({"logits": np.ones((1, 4))})
    with pytest.raises(RuntimeError):
        tape.backward({"logits": np.ones((1, 4))})


def test_old_opset_is_converted_first():
    """Opset 6 Clip holds its bounds in attributes; the executor runs opset-13 semantics."""
    node = helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)
    graph = helper.make_graph([node], "clip6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 7
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_graph(model, {"x": x})["y"], np.clip(x, -0.5, 0.25))


def _with_node(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.insert(3, node)
    return out


@pytest.mark.parametrize("node, message", [
    (helper.make_node("Erf", ["r"], ["erf"], name="erf1"), "does not support Erf (node 'erf1')"),
    (helper.make_node("Gelu", ["r"], ["gelu"], name="g", domain="com.microsoft"), "does not support com.microsoft.Gelu"),
    (helper.make_node("MaxPool", ["r"], ["mp", "idx"], name="mp", kernel_shape=[2, 2]), "only its first 1 output"),
])
def test_unsupported_op_is_a_one_line_error(node, message):
    with pytest.raises(PtqError, match=re.escape(message)) as info:
        run_graph(_with_node(_small_cnn(), node), {"input": np.zeros((1, 3, 8, 8), np.float32)})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call, message", [
    (lambda p, x: p.run({}), "no value fed for model input 'input'"),
    (lambda p, x: p.run({"input": x, "nope": x}), "feed 'nope'"),
    (lambda p, x: p.run({"input": x}, keep=["nope"]), "tensor 'nope'"),
    (lambda p, x: p.run({"input": np.zeros((1, 4, 8, 8), np.float32)}), "Conv node 'conv' failed"),
    (lambda p, x: p.record({"input": x}, wrt=["c1"]), "differentiate with respect to 'c1'"),
    (lambda p, x: p.record({"input": x}, wrt=["input"]).backward({"nope": 1.0}), "'nope'"),
    (lambda p, x: p.record({"input": x}, wrt=["input"]).backward({"logits": np.ones(4)}), "shape"),
])
def test_bad_requests_are_one_line_errors(call, message):
    with pytest.raises(PtqError, match=message) as info:
        call(Program(_small_cnn()), np.zeros((1, 3, 8, 8), np.float32))
    assert "\n" not in str(info.value)


def test_feeds_may_replace_initializers():
    model = _small_cnn()
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    program = Program(model)
    zero_fc = program.run({"input": x, "fc_w": np.zeros((4, 6), np.float32)})["logits"]
    np.testing.assert_allclose(zero_fc, np.broadcast_to(program.constants["fc_b"], (1, 4)), atol=1e-7)
    assert not np.allclose(program.run({"input": x})["logits"], zero_fc)
