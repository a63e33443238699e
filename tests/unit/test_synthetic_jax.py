"""The jax backend of synthetic calibration data: each jax op against its numpy operator, the
BatchNorm loss and gradient against the numpy backend's, fitting, determinism, the choice of
backend and what is recorded about it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli.calibrate import synthetic
from ptqcli.errors import PtqError
from ptqcli.numeric import jax_program, vjp

ASSETS = Path(__file__).resolve().parents[2] / "ptqcli" / "assets"
FASHION = ASSETS / "fashion_cnn.onnx"


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- #
# One op at a time: forward and input cotangent against the numpy operators
# --------------------------------------------------------------------------- #

RNG = np.random.default_rng(0)
X4 = RNG.normal(size=(2, 4, 7, 6))

OP_CASES = [
    ("Conv", [X4, RNG.normal(size=(6, 4, 3, 3)), RNG.normal(size=6)], {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("Conv", [X4, RNG.normal(size=(4, 2, 3, 2))], {"group": 2, "dilations": [2, 1], "auto_pad": "SAME_UPPER"}),
    ("Conv", [X4, RNG.normal(size=(4, 1, 3, 3)), RNG.normal(size=4)], {"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("Conv", [X4, RNG.normal(size=(8, 1, 3, 3))], {"group": 4, "pads": [0, 1, 2, 1], "dilations": [2, 1]}),
    ("Conv", [X4, RNG.normal(size=(5, 4, 1, 1)), RNG.normal(size=5)], {"strides": [2, 2]}),
    ("ConvTranspose", [X4, RNG.normal(size=(4, 3, 3, 2)), RNG.normal(size=6)],
     {"group": 2, "strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
    ("Gemm", [RNG.normal(size=(5, 3)), RNG.normal(size=(4, 5)), RNG.normal(size=4)],
     {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("MatMul", [RNG.normal(size=(2, 3, 5)), RNG.normal(size=(5, 4))], {}),
    ("Relu", [X4], {}),
    ("LeakyRelu", [X4], {"alpha": 0.1}),
    ("Clip", [X4, np.array(-0.5), np.array(0.7)], {}),
    ("Sigmoid", [X4], {}),
    ("HardSigmoid", [X4], {"alpha": 0.3, "beta": 0.4}),
    ("HardSwish", [4 * X4], {}),
    ("Softmax", [X4], {"axis": 1}),
    ("Add", [X4, RNG.normal(size=(4, 1, 1))], {}),
    ("Sub", [X4, RNG.normal(size=(6,))], {}),
    ("Mul", [X4, RNG.normal(size=(1, 4, 7, 1))], {}),
    ("Div", [X4, RNG.uniform(1, 2, size=(4, 1, 1))], {}),
    ("BatchNormalization", [X4, *RNG.uniform(0.5, 2, size=(4, 4))], {"epsilon": 1e-3}),
    ("MaxPool", [X4], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    ("MaxPool", [X4], {"kernel_shape": [2, 2], "dilations": [2, 1]}),
    ("AveragePool", [X4], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", [X4], {"kernel_shape": [2, 3], "pads": [1, 1, 0, 1], "count_include_pad": 1, "ceil_mode": 1,
                           "strides": [2, 2]}),
    ("GlobalAveragePool", [X4], {}),
    ("Reshape", [X4, np.array([0, -1, 3])], {}),
    ("Flatten", [X4], {"axis": 2}),
    ("Squeeze", [X4[:, :1], np.array([1])], {}),
    ("Unsqueeze", [X4, np.array([0, -1])], {}),
    ("Identity", [X4], {}),
    ("Transpose", [X4], {"perm": [0, 2, 3, 1]}),
    ("Pad", [X4, np.array([0, 0, 2, -1, 0, 0, 1, 2]), np.array(0.5)], {"mode": "constant"}),
    ("Pad", [X4, np.array([0, 0, 2, 1, 0, 0, 1, 2])], {"mode": "reflect"}),
    ("Pad", [X4, np.array([0, 0, 1, 3, 0, 0, 2, 0])], {"mode": "edge"}),
    ("Slice", [X4, np.array([1, -1]), np.array([6, 0]), np.array([2, 3]), np.array([2, -2])], {}),
]


def _case_id(case) -> str:
    op, _, attrs = case
    return op + ("-" + "-".join(f"{k}{v}" for k, v in attrs.items()) if attrs else "")


@pytest.mark.parametrize("op, inputs, attrs", OP_CASES, ids=[_case_id(c) for c in OP_CASES])
def test_each_jax_op_matches_its_numpy_operator(op, inputs, attrs):
    """Values and the data input's cotangent, in float32 against the float64 numpy reference."""
    inputs = [np.asarray(v) for v in inputs]
    rest = [v.astype(np.float32) if v.dtype.kind == "f" else v for v in inputs[1:]]

    def fn(x):
        return jax_program.OPS[op]([x, *rest], attrs)[0]

    y, pullback = jax.vjp(fn, inputs[0].astype(np.float32))
    g = RNG.normal(size=y.shape)
    outputs, cotangents = vjp(op, inputs, attrs, g, [True] + [False] * (len(inputs) - 1))
    expected, dx = outputs[0], cotangents[0]
    assert y.shape == expected.shape
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    (jax_dx,) = pullback(g.astype(np.float32))
    np.testing.assert_allclose(np.asarray(jax_dx), dx, rtol=1e-5, atol=1e-5)


def test_every_numpy_operator_with_a_cotangent_has_a_jax_implementation():
    from ptqcli.numeric import REGISTRY

    differentiable = {op for op, impl in REGISTRY.items() if impl.vjp is not None}
    assert differentiable <= set(jax_program.OPS)


# --------------------------------------------------------------------------- #
# The BatchNorm loss and its gradient against the numpy backend
# --------------------------------------------------------------------------- #


def _mobile_model() -> onnx.ModelProto:
    """input[N,3,9,9] -> Pad(reflect) -> Conv s2 -> BN0 -> HardSwish -> depthwise Conv (multiplier 2,
    pads, stride 2) -> BN1 -> Clip -> AveragePool -> 1x1 Conv -> BN2 -> HardSigmoid x Sigmoid ->
    MaxPool -> GlobalAveragePool -> Flatten -> Gemm -> BN3."""
    rng = np.random.default_rng(3)
    inits = []

    def init(name, array, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def bn(x, name, channels):
        args = [init(f"{name}.{k}", v) for k, v in (("s", rng.uniform(0.5, 2, channels)),
                                                     ("b", rng.normal(0, 0.2, channels)),
                                                     ("m", rng.normal(0, 0.5, channels)),
                                                     ("v", rng.uniform(0.3, 2, channels)))]
        return helper.make_node("BatchNormalization", [x, *args], [name], name=name, epsilon=1e-3)

    n = helper.make_node
    nodes = [
        n("Pad", ["input", init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], ["p0"], mode="reflect"),
        n("Conv", ["p0", init("w0", rng.normal(0, 0.4, (8, 3, 3, 3)))], ["c0"], strides=[2, 2]),
        bn("c0", "bn0", 8),
        n("HardSwish", ["bn0"], ["a0"]),
        n("Conv", ["a0", init("w1", rng.normal(0, 0.4, (16, 1, 3, 3))), init("b1", rng.normal(0, 0.1, 16))], ["c1"],
          group=8, pads=[1, 1, 1, 1], strides=[2, 2]),
        bn("c1", "bn1", 16),
        n("Clip", ["bn1", init("lo", 0.0), init("hi", 1.5)], ["a1"]),
        n("AveragePool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
        n("Conv", ["p1", init("w2", rng.normal(0, 0.3, (12, 16, 1, 1)))], ["c2"]),
        bn("c2", "bn2", 12),
        n("HardSigmoid", ["bn2"], ["h2"]),
        n("Sigmoid", ["bn2"], ["s2"]),
        n("Mul", ["h2", "s2"], ["a2"]),
        n("MaxPool", ["a2"], ["m2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("GlobalAveragePool", ["m2"], ["g2"]),
        n("Flatten", ["g2"], ["f2"]),
        n("Gemm", ["f2", init("w3", rng.normal(0, 0.5, (6, 12))), init("b3", rng.normal(0, 0.1, 6))], ["c3"],
          transB=1),
        bn("c3", "bn3", 6),
    ]
    graph = helper.make_graph(nodes, "mobile", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("bn3", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _objectives(model, dtype=None):
    """The jax objective, and the numpy one in ``dtype`` (float64 for a reference)."""
    jax_objective = synthetic.bn_objective(model, "jax")
    fit = synthetic.bn_program(model, dtype=dtype)
    return jax_objective, lambda x, size: synthetic.stacked_loss_and_grad(*fit, x.astype(dtype or x.dtype), size)


@pytest.mark.parametrize("model, shape", [(FASHION, (12, 1, 28, 28)), (_mobile_model(), (6, 3, 9, 9))],
                         ids=["embedded", "mobile"])
def test_jax_loss_and_gradient_equal_numpy_ones(model, shape):
    """Per part (two batches of half the samples, each with its own statistics), against the
    float64 numpy backend; float32 numpy errs about as much."""
    jax_objective, numpy64 = _objectives(model, np.float64)
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    size = shape[0] // 2
    losses, grad = jax_objective.losses_and_grad(x, size)
    reference_losses, reference = numpy64(x, size)
    assert jax_objective.backend == "jax" and len(losses) == 2 and grad.dtype == np.float32
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
    assert _relative_error(grad, reference) < 2e-5
    _, grad32 = _objectives(model)[1](x, size)
    assert _relative_error(grad, reference) < 3 * _relative_error(grad32, reference) + 1e-6
    np.testing.assert_allclose(jax_objective.losses(x, size), losses, rtol=1e-6)


def test_a_jax_fit_reduces_the_loss_as_the_numpy_one_does():
    kwargs = dict(num_samples=16, batch_size=16, iters=40, lr=0.2)
    (by_jax,) = synthetic.iter_generate(FASHION, backend="jax", **kwargs)
    (by_numpy,) = synthetic.iter_generate(FASHION, backend="numpy", **kwargs)
    assert by_jax.initial_loss / by_jax.final_loss >= 10
    assert by_jax.initial_loss == pytest.approx(by_numpy.initial_loss, rel=1e-5)
    assert by_jax.final_loss == pytest.approx(by_numpy.final_loss, rel=0.05)


def test_same_seed_gives_the_same_bytes_on_jax():
    kwargs = dict(num_samples=4, batch_size=4, iters=4, lr=0.1, tv_weight=0.01, l2_weight=0.01, backend="jax")
    a = synthetic.generate(FASHION, seed=3, **kwargs)
    b = synthetic.generate(FASHION, seed=3, **kwargs)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, synthetic.generate(FASHION, seed=4, **kwargs))


# --------------------------------------------------------------------------- #
# Choosing the backend, and recording it
# --------------------------------------------------------------------------- #


def _with_erf() -> onnx.ModelProto:
    model = _mobile_model()
    erf = helper.make_node("Erf", ["a0"], ["a0e"], name="erf1")
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "HardSwish") + 1
    nodes.insert(at, erf)
    next(n for n in nodes if n.input and n.input[0] == "a0" and n.op_type == "Conv").input[0] = "a0e"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_an_op_without_a_jax_implementation_is_named_in_one_line():
    with pytest.raises(PtqError, match=re.escape("no jax implementation of Erf (node 'erf1')")) as info:
        synthetic.bn_objective(_with_erf(), "jax")
    assert "\n" not in str(info.value)


def test_auto_falls_back_to_numpy_for_an_op_jax_lacks(monkeypatch):
    assert synthetic.bn_objective(_mobile_model()).backend == "jax"
    monkeypatch.delitem(jax_program.OPS, "HardSwish")
    assert synthetic.bn_objective(_mobile_model()).backend == "numpy"
    assert jax_program.uncovered_ops(_mobile_model()) == ["HardSwish"]


def test_without_jax_auto_is_numpy_and_jax_is_refused(monkeypatch):
    monkeypatch.setattr(synthetic, "_jax_program", lambda: None)
    assert synthetic.bn_objective(FASHION).backend == "numpy"
    with pytest.raises(PtqError, match=re.escape("pip install 'ptqcli[jax]'")):
        synthetic.bn_objective(FASHION, "jax")
    with pytest.raises(PtqError, match="backend must be one of"):
        synthetic.bn_objective(FASHION, "torch")


def test_the_recipe_records_the_backend_and_a_resume_keeps_it(tmp_path):
    kwargs = dict(num_samples=6, batch_size=4, iters=3, lr=0.1, seed=2)  # batches of 4 and 2, fitted apart
    whole = synthetic.generate(FASHION, out_path=tmp_path / "whole.npz", backend="numpy", **kwargs)

    class Interrupted(Exception):
        pass

    def stop_in_batch_one(batch, iteration, loss):
        if batch == 1:
            raise Interrupted

    part = tmp_path / "part.npz"
    with pytest.raises(Interrupted):
        synthetic.generate(FASHION, out_path=part, backend="numpy", progress=stop_in_batch_one, **kwargs)
    with np.load(part) as npz:
        assert json.loads(str(npz[synthetic.RECIPE_KEY]))["backend"] == "numpy"
    # auto would choose jax, but the batches already made came from numpy
    resumed = list(synthetic.iter_generate(FASHION, out_path=part, **kwargs))
    assert [b.resumed for b in resumed] == [True, False]
    assert np.concatenate([b.inputs for b in resumed]).tobytes() == whole.tobytes()
    with pytest.raises(PtqError, match="other settings"):
        synthetic.generate(FASHION, out_path=part, backend="jax", **kwargs)


def test_importing_ptqcli_does_not_import_jax():
    code = ("import sys, ptqcli, ptqcli.cli, ptqcli.stages, ptqcli.numeric, ptqcli.calibrate.synthetic; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
