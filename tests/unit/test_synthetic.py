"""Data-free calibration inputs fitted to BatchNorm statistics: the objective, its gradient,
determinism, resuming and refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli.calibrate import synthetic
from ptqcli.calibrate.data import count_samples, iter_batches, model_inputs
from ptqcli.config import DataConfig
from ptqcli.errors import PtqError
from ptqcli.graph import Graph

ASSETS = Path(__file__).resolve().parents[2] / "ptqcli" / "assets"
FASHION = ASSETS / "fashion_cnn.onnx"


def _two_stage_model(batch: int | str = "N", with_bn: bool = True, extra: list | None = None) -> onnx.ModelProto:
    """input[N,3,6,6] -> BN0 -> Conv -> BN1 -> Relu -> Conv(depthwise) -> BN2 -> Relu -> GAP -> Shape...

    BN0 reads the graph input itself; a Shape node after the last BatchNorm has no numpy
    implementation and must never run.
    """
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    inits = [init("w1", rng.normal(0, 0.4, (4, 3, 3, 3))), init("b1", rng.normal(0, 0.1, 4)),
             init("w2", rng.normal(0, 0.4, (4, 1, 3, 3))), init("b2", rng.normal(0, 0.1, 4))]
    nodes = []

    def bn(name, x, channels):
        inits.extend([init(f"{name}.s", rng.uniform(0.5, 2, channels)), init(f"{name}.b", rng.normal(0, 0.2, channels)),
                      init(f"{name}.m", rng.normal(0, 0.5, channels)), init(f"{name}.v", rng.uniform(0.3, 2, channels))])
        if with_bn:
            nodes.append(helper.make_node("BatchNormalization", [x, f"{name}.s", f"{name}.b", f"{name}.m", f"{name}.v"],
                                          [name], name=name, epsilon=1e-3))
        else:
            nodes.append(helper.make_node("Identity", [x], [name], name=name))
        return name

    x = bn("bn0", "input", 3)
    nodes.append(helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    nodes.extend(extra or [])
    x = bn("bn1", "c1", 4)
    nodes.append(helper.make_node("Relu", [x], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=4))
    x = bn("bn2", "c2", 4)
    nodes.append(helper.make_node("Relu", [x], ["r2"], name="relu2"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Shape", ["gap"], ["shape"], name="shape"))
    graph = helper.make_graph(
        nodes, "two_stage", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _projected_fd(loss, x: np.ndarray, u: np.ndarray, eps: float = 1e-6) -> float:
    return (loss(x + eps * u) - loss(x - eps * u)) / (2 * eps)


def test_targets_are_the_batchnorm_inputs_and_running_statistics():
    targets = synthetic.bn_targets(FASHION)
    model = onnx.load(str(FASHION))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert [t.tensor for t in targets] == [n.input[0] for n in bns] and len(targets) == 3
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for target, node in zip(targets, bns):
        np.testing.assert_array_equal(target.mean, inits[node.input[3]])
        np.testing.assert_array_equal(target.var, inits[node.input[4]])


def test_loss_falls_tenfold_on_the_embedded_model():
    batches = list(synthetic.iter_generate(FASHION, num_samples=16, batch_size=16, iters=40, lr=0.2))
    (batch,) = batches
    assert batch.initial_loss / batch.final_loss >= 10
    # Real training-distribution images set the floor the synthetic batch heads for.
    real = np.load(ASSETS / "fashion_calib.npz")["input"][:16]
    assert synthetic.bn_loss(FASHION, real, batch_size=16)[0] < batch.initial_loss / 10


def test_bn_loss_gradient_matches_finite_differences():
    """Cotangents enter at three tensors (the graph input among them) and meet on the way back."""
    program, targets, name = synthetic.bn_program(_two_stage_model(), dtype=np.float64)
    rng = np.random.default_rng(1)
    x, u = rng.normal(size=(3, 3, 6, 6)), rng.normal(size=(3, 3, 6, 6))
    loss, grad = synthetic.bn_loss_and_grad(program, targets, name, x)
    assert loss == pytest.approx(synthetic.bn_loss_value(program, targets, name, x))
    numeric = _projected_fd(lambda t: synthetic.bn_loss_value(program, targets, name, t), x, u)
    assert float(np.vdot(grad, u)) == pytest.approx(numeric, rel=1e-6)


def test_prior_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, u = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(2, 3, 5, 4))
    _, grad = synthetic.prior_loss_and_grad(x, tv_weight=0.7, l2_weight=0.3)
    numeric = _projected_fd(lambda t: synthetic.prior_loss_and_grad(t, 0.7, 0.3)[0], x, u)
    assert float(np.vdot(grad, u)) == pytest.approx(numeric, rel=1e-7)
    assert synthetic.prior_loss_and_grad(x, 0.0, 0.0) == (0.0, None)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not():
    kwargs = dict(num_samples=6, batch_size=4, iters=4, lr=0.1, tv_weight=0.01, l2_weight=0.01)
    a = synthetic.generate(FASHION, seed=3, **kwargs)
    b = synthetic.generate(FASHION, seed=3, **kwargs)
    c = synthetic.generate(FASHION, seed=4, **kwargs)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_resume_after_an_interruption_gives_the_same_bytes(tmp_path):
    kwargs = dict(num_samples=10, batch_size=4, iters=3, lr=0.1, seed=5)
    whole = synthetic.generate(_two_stage_model(), out_path=tmp_path / "whole.npz", **kwargs)

    class Interrupted(Exception):
        pass

    def stop_in_batch_two(batch, iteration, loss):
        if batch == 2 and iteration == 2:
            raise Interrupted

    part = tmp_path / "part.npz"
    with pytest.raises(Interrupted):
        synthetic.generate(_two_stage_model(), out_path=part, progress=stop_in_batch_two, **kwargs)
    with np.load(part) as npz:
        assert npz["input"].shape == (8, 3, 6, 6) and npz[synthetic.LOSS_KEY].shape == (2, 2)

    calls = []
    resumed = list(synthetic.iter_generate(_two_stage_model(), out_path=part,
                                           progress=lambda *a: calls.append(a), **kwargs))
    assert [b.resumed for b in resumed] == [True, True, False]
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert np.concatenate([b.inputs for b in resumed]).tobytes() == whole.tobytes()
    with np.load(part) as p, np.load(tmp_path / "whole.npz") as w:
        assert p["input"].tobytes() == w["input"].tobytes()
        np.testing.assert_array_equal(p[synthetic.LOSS_KEY], w[synthetic.LOSS_KEY])


def test_a_file_from_other_settings_is_not_resumed(tmp_path):
    out = tmp_path / "synthetic.npz"
    synthetic.generate(_two_stage_model(), num_samples=4, batch_size=4, iters=2, out_path=out)
    with pytest.raises(PtqError, match="other settings") as info:
        synthetic.generate(_two_stage_model(), num_samples=4, batch_size=4, iters=2, seed=1, out_path=out)
    assert "\n" not in str(info.value)


def test_output_file_is_calibration_data_as_it_stands(tmp_path):
    out = tmp_path / "synthetic.npz"
    model = _two_stage_model()
    made = synthetic.generate(model, num_samples=5, batch_size=2, iters=2, out_path=out)
    assert count_samples(out) == 5
    inputs = model_inputs(Graph(model))
    read = np.concatenate([b.feeds["input"] for b in iter_batches(out, inputs, DataConfig(str(out)), limit=5)])
    np.testing.assert_array_equal(read, made)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_shapes_and_dtypes_follow_the_model_input(kind):
    """A fixed batch of 1 still gets batch_size samples per optimised batch."""
    batches = list(synthetic.iter_generate(_two_stage_model(batch=1), kind=kind, num_samples=7, batch_size=3,
                                           iters=2))
    assert [b.inputs.shape for b in batches] == [(3, 3, 6, 6), (3, 3, 6, 6), (1, 3, 6, 6)]
    assert all(b.inputs.dtype == np.float32 for b in batches)
    if kind == "bn":
        assert all(b.final_loss < b.initial_loss for b in batches)
    else:
        assert all(b.initial_loss is None and b.final_loss is None for b in batches)
    steps = []
    synthetic.generate(_two_stage_model(), kind=kind, num_samples=7, batch_size=3, iters=2,
                       progress=lambda batch, step, loss: steps.append((batch, step)))
    per_batch = synthetic.steps_per_batch(kind, 2)
    # batches of one size are optimised together: their steps interleave, each batch's in order
    assert sorted(steps) == [(i, s) for i in range(3) for s in range(1, per_batch + 1)]
    assert all([s for b, s in steps if b == i] == list(range(1, per_batch + 1)) for i in range(3))
    if kind == "uniform":
        assert all(np.abs(b.inputs).max() <= 1 for b in batches)
    fashion = synthetic.generate(FASHION, kind=kind, num_samples=2, batch_size=2, iters=1)
    assert fashion.shape == (2, 1, 28, 28) and fashion.dtype == np.float32


def test_a_model_without_batchnorm_is_refused_in_one_line():
    model = _two_stage_model(with_bn=False)
    for call in (lambda: synthetic.bn_targets(model), lambda: synthetic.generate(model, num_samples=2, iters=1)):
        with pytest.raises(PtqError, match=re.escape("TrainingMode.PRESERVE")) as info:
            call()
        assert "--data" in str(info.value) and "\n" not in str(info.value)
    # The noise baselines need no BatchNorm.
    assert synthetic.generate(model, kind="gaussian", num_samples=2).shape == (2, 3, 6, 6)


def test_an_unsupported_op_before_a_batchnorm_is_named():
    erf = helper.make_node("Erf", ["c1"], ["c1e"], name="erf1")
    model = _two_stage_model(extra=[erf])
    next(n for n in model.graph.node if n.name == "bn1").input[0] = "c1e"
    with pytest.raises(PtqError, match=re.escape("does not support Erf (node 'erf1')")) as info:
        synthetic.generate(model, num_samples=2, iters=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="images"), "kind must be one of"),
    (dict(num_samples=0), "num_samples"),
    (dict(iters=-1), "iters"),
    (dict(lr=0.0), "lr"),
    (dict(tv_weight=-1.0), "prior weights"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(PtqError, match=message) as info:
        synthetic.generate(_two_stage_model(), **kwargs)
    assert "\n" not in str(info.value)
