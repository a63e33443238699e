"""Activations that feed no integer GEMM kernel stay in float where quantizing them costs fidelity,
decided from measured damage: the attention-mask Add of a padded batch is the case in point."""

import numpy as np
import onnx
import pytest

from builders import masked_attention_model
from ptqcli import rundir, stages
from ptqcli.calibrate.data import iter_batches, model_inputs
from ptqcli.calibrate.settle import GEMM_INPUT_DAMAGE_LIMIT, activation_damage, candidates
from ptqcli.config import DataConfig, QuantConfig


@pytest.fixture
def attention(tmp_path):
    model = tmp_path / "attention.onnx"
    onnx.save(masked_attention_model(), str(model))
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, 96)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.float32)
    x = rng.normal(0, 1, (96, 12, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:64], mask=mask[:64])
    np.savez(tmp_path / "eval.npz", x=x[64:], mask=mask[64:])
    return model, tmp_path


def _cosine(run, out, data):
    _, fidelity = stages.export(run, out, str(data), 32)
    return fidelity.outputs["y"]["cosine"]


def test_the_mask_add_stays_float_and_the_gemm_inputs_stay_quantized(attention):
    model, tmp = attention
    data = DataConfig(path=str(tmp / "calib.npz"), num_samples=64)
    stages.calibrate(model, QuantConfig(), data, tmp / "run")
    plan = rundir.read_plan(tmp / "run")
    record = plan.config["activation_damage"]
    for gemm_input in ("x", "ctx"):  # read by the weight MatMuls: held only to GEMM_INPUT_DAMAGE_LIMIT
        assert gemm_input in plan.tensors and record[gemm_input]["quantized"]
        assert record[gemm_input]["damage"] < GEMM_INPUT_DAMAGE_LIMIT
    # The attention MatMuls between two activations stay float at 8 bits, so nothing quantized
    # reads the scores, the mask Add, the probabilities or k; MatMul outputs read only by float ops
    # buy no kernel either (ORT's MatMulIntegerToFloat writes float).
    assert {"scores", "context"} <= set(plan.float_nodes)
    for idle in ("k", "scores", "masked", "probs", "o", "res"):
        assert idle not in plan.tensors and not record[idle]["quantized"]

    stages.calibrate(model, QuantConfig(act_damage_limit=None), data, tmp / "every")
    every = rundir.read_plan(tmp / "every")
    assert "masked" in every.tensors
    settled, all_quantized = _cosine(tmp / "run", tmp / "settled.onnx", tmp / "eval.npz"), _cosine(
        tmp / "every", tmp / "every.onnx", tmp / "eval.npz")
    assert settled > 0.99 and settled > all_quantized + 0.05


def _every_tensor_quantized(attention):
    """The attention block calibrated with no activation left float, 16 of its samples, and the
    activations whose float/quantized choice is open."""
    model, tmp = attention
    data = DataConfig(path=str(tmp / "calib.npz"), num_samples=64)
    stages.calibrate(model, QuantConfig(act_damage_limit=None), data, tmp / "every")
    run = rundir.load_run(tmp / "every")
    batches = list(iter_batches(str(tmp / "calib.npz"), model_inputs(run.graph), data, limit=16))
    return run, batches, candidates(run.graph, run.plan)


def test_the_measured_damage_singles_out_the_mask_add(attention):
    """Measured alone on the plan's grid, the scores plus -3.4e38 padding leave nothing of the
    real values: the measurement that keeps such a tensor float where an integer op reads it."""
    run, batches, tensors = _every_tensor_quantized(attention)
    assert "masked" in tensors
    damage = activation_damage(run.graph, run.plan, tensors, batches)
    assert damage["masked"] > 100 * max(d for t, d in damage.items() if t != "masked")


def test_grouped_measurement_agrees_with_one_at_a_time_and_stops_at_its_budget(attention):
    """Measured in groups against the limit, the same tensors stay float as when each is measured
    alone; with no probe budget nothing is measured (the kernel-aware choice stands)."""
    run, batches, tensors = _every_tensor_quantized(attention)
    limit = 3e-4
    alone = activation_damage(run.graph, run.plan, tensors, batches)
    grouped = activation_damage(run.graph, run.plan, tensors, batches, limit=limit)
    assert set(grouped) == set(tensors)
    assert {t for t, d in grouped.items() if d > limit} == {t for t, d in alone.items() if d > limit}
    assert activation_damage(run.graph, run.plan, tensors, batches, limit=limit, budget=0) == {}


@pytest.mark.parametrize("size, expected", [(8, 512), (384, None)])
def test_the_probe_budget_shrinks_with_the_multiply_accumulates_of_a_pass(size, expected):
    """A small model gets every probe pass; one whose pass costs more than PROBE_MACS / 512 gets
    fewer, in proportion, so that a high-resolution detector's measurement stays bounded."""
    from onnx import TensorProto, helper, numpy_helper

    from ptqcli.calibrate.data import Batch
    from ptqcli.calibrate.select import select
    from ptqcli.calibrate.planner import build_plan
    from ptqcli.calibrate.settle import MIN_PROBE_SAMPLES, PROBE_MACS, PROBE_SAMPLES, probe_budget
    from ptqcli.graph import Graph

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(32, 16, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    g = Graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    quant = QuantConfig(acts="dynamic")
    plan = build_plan(g, select(g, quant), {}, quant)
    batch = Batch({"x": rng.normal(size=(3, 16, size, size)).astype(np.float32)}, None)
    macs = 32 * 16 * 9 * size * size
    budget = probe_budget(g, plan, batch)
    if expected is not None:
        assert budget == expected == PROBE_SAMPLES
    else:
        assert budget == max(MIN_PROBE_SAMPLES, PROBE_MACS // macs) < PROBE_SAMPLES


def _log_power_model(seed=0):
    """x -> (x W1)^2 -> W2 -> log: a log-power front end (STFT, power, mel filter bank, log) whose
    power spectrum spans decades, so that an 8-bit grid over its range zeroes the quiet samples."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.125, (64, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.abs(rng.normal(0, 0.125, (64, 16))).astype(np.float32), "w2"),
             numpy_helper.from_array(np.asarray(1e-6, dtype=np.float32), "eps")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["y"], name="stft"), n("Mul", ["y", "y"], ["power"], name="power"),
             n("MatMul", ["power", "w2"], ["mel"], name="mel"), n("Add", ["mel", "eps"], ["mel_eps"], name="floor"),
             n("Log", ["mel_eps"], ["out"], name="log")]
    graph = helper.make_graph(nodes, "logmel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_gemm_input_that_alone_ruins_the_outputs_stays_float(tmp_path):
    model = tmp_path / "logmel.onnx"
    onnx.save(_log_power_model(), str(model))
    rng = np.random.default_rng(1)
    # loudness over four decades, as audio frames have
    x = (rng.normal(size=(96, 64)) * 10 ** rng.uniform(-2, 2, (96, 1))).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:64])
    np.savez(tmp_path / "eval.npz", x=x[64:])
    data = DataConfig(path=str(tmp_path / "calib.npz"), num_samples=64)
    stages.calibrate(model, QuantConfig(), data, tmp_path / "run")
    record = rundir.read_plan(tmp_path / "run").config["activation_damage"]
    assert not record["power"]["quantized"] and record["power"]["damage"] > GEMM_INPUT_DAMAGE_LIMIT
    assert "outputs' power" in record["power"]["reason"]
    stages.calibrate(model, QuantConfig(act_damage_limit=None), data, tmp_path / "every")
    settled = stages.export(tmp_path / "run", tmp_path / "settled.onnx", str(tmp_path / "eval.npz"), 32)[1]
    every = stages.export(tmp_path / "every", tmp_path / "every.onnx", str(tmp_path / "eval.npz"), 32)[1]
    assert settled.outputs["out"]["cosine"] > 0.99 and "non_finite" not in settled.outputs["out"]
    # quantized throughout, the quiet frames' log power is not even finite: counted, measured as
    # zeros, and no gate passes such a card
    assert every.outputs["out"]["non_finite"] > 0 and every.outputs["out"]["cosine"] < 0.9
    from cli_runner import run_in_process as ptq

    r = ptq("gate", tmp_path / "every.card.json", "--max-drop", "100")
    assert r.returncode == 1 and "finite outputs" in r.stdout + r.stderr


def test_a_conv_whose_output_went_float_leaves_its_input_float_too(tmp_path):
    """QLinearConv writes integers: once the damage measurement sends a Conv's output back to float,
    ORT runs that Conv in float whatever its input, so the quantized input buys nothing (a Q/DQ
    pair and the weights dequantized on every run) and is dropped; the Conv becomes weight-only."""
    from builders import conv_bn_relu_model
    from dataclasses import replace

    from ptqcli.calibrate.settle import without_idle

    model = tmp_path / "cnn.onnx"
    onnx.save(conv_bn_relu_model(), str(model))
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32))
    stages.calibrate(model, QuantConfig(act_damage_limit=None), DataConfig(path=str(tmp_path / "calib.npz")), tmp_path / "run")
    run = rundir.load_run(tmp_path / "run")
    g, plan = run.graph, run.plan
    conv1 = next(layer for layer in plan.layers if layer.node == "conv1")
    assert conv1.activation == "input" and without_idle(g, plan).tensors.keys() == plan.tensors.keys()
    written, tensor = set(), conv1.output
    while tensor is not None:  # the Conv's output and the Relu ORT fuses into it
        written.add(tensor)
        readers = g.consumers.get(tensor, [])
        tensor = readers[0].output[0] if len(readers) == 1 and readers[0].op_type == "Relu" else None
    assert written & set(plan.tensors)
    settled = without_idle(g, replace(plan, tensors={k: v for k, v in plan.tensors.items() if k not in written}))
    assert "input" not in settled.tensors
    assert settled.config["activation_damage"]["input"] == {"quantized": False,
                                                             "reason": "no integer kernel reads or writes it"}
    assert {"w1", "w2"} <= set(settled.tensors)  # the weights stay quantized: conv1 is weight-only now
