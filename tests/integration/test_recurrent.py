"""Recurrent layers: LSTM, GRU and RNN weights (W and R) on int8 grids with one scale per gate row,
as QDQ that stock ORT runs; time-major sequences [T, N, F] fed whole."""

import json

import numpy as np
import onnx
import pytest

from builders import recurrent_model
from ptqcli.calibrate.data import InputSpec, count_samples, iter_batches, model_inputs
from ptqcli.config import DataConfig
from ptqcli.graph import Graph
from ptqcli.runtime import session
from test_cli import ptq


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_weights_are_quantized_per_gate_row(tmp_path, op):
    model, data, out = tmp_path / f"{op}.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(recurrent_model(op), str(model))
    rng = np.random.default_rng(0)
    np.save(data, rng.normal(0, 1, (20, 64, 12)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "-o", out)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    rnn = next(layer for layer in plan["layers"] if layer["node"] == "rnn")
    assert rnn["weight"] == "W" and rnn["extra_weights"] == ["R"] and rnn["activation"] is None
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    for name in ("W", "R"):
        tq = plan["tensors"][name]
        assert tq["spec"]["bits"] == 8 and tq["spec"]["axis"] == 1 and tq["scale_shape"] == [gates * 16]
    quantized = onnx.load(str(out))
    # decoded from their int8 codes when ORT loads the model (export/container.py)
    assert {n.output[0] for n in quantized.graph.node} >= {"W_dequantized", "R_dequantized"}
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in ("W_dequantized", "R_dequantized")
                   for n in quantized.graph.node)
    assert not {"W", "R"} & {t.name for t in quantized.graph.initializer}  # only their int8 codes are stored
    x = rng.normal(0, 1, (20, 32, 12)).astype(np.float32)
    f, q = session(onnx.load(str(model))).run(None, {"x": x})[0], session(quantized).run(None, {"x": x})[0]
    assert np.mean(f.argmax(1) == q.argmax(1)) >= 0.9
    assert np.corrcoef(f.ravel(), q.ravel())[0, 1] > 0.999


def test_a_time_major_sequence_is_fed_whole(tmp_path):
    """[T, N, F] with the batch named on axis 1: a file is one feed, never cut into time steps."""
    g = Graph(recurrent_model())
    (spec,) = model_inputs(g)
    assert not spec.batched
    np.save(tmp_path / "x.npy", np.zeros((20, 3, 12), np.float32))
    batches = list(iter_batches(tmp_path / "x.npy", [spec], DataConfig(), limit=10))
    assert len(batches) == 1 and batches[0].feeds["x"].shape == (20, 3, 12)
    assert count_samples(tmp_path / "x.npy", [spec], DataConfig()) == 1


def test_whole_feeds_takes_each_file_as_it_is(tmp_path):
    spec = InputSpec("x", (None, None, 12), np.dtype(np.float32))  # no dimension names to go by
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, steps in enumerate((7, 11)):
        np.save(folder / f"f{i}.npy", np.ones((steps, 2, 12), np.float32))
    cut = list(iter_batches(folder, [spec], DataConfig(batch_size=4), limit=100))
    assert [b.feeds["x"].shape[0] for b in cut] == [4, 4, 4, 4, 2]  # split along axis 0 by default
    whole = list(iter_batches(folder, [spec], DataConfig(whole_feeds=True), limit=100))
    assert [b.feeds["x"].shape for b in whole] == [(7, 2, 12), (11, 2, 12)]
    assert count_samples(folder, [spec], DataConfig(whole_feeds=True)) == 2


def _with_clip(model):
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    node.attribute.append(onnx.helper.make_attribute("clip", 3.0))
    return model


@pytest.mark.parametrize("clipped", [False, True])
def test_native_export_runs_an_lstm_on_integers_with_tables_fitted_on_the_calibration_data(tmp_path, clipped):
    """--format native puts the LSTM on ptqcli's IntLSTM (int8 weights and inputs, int16 gates and
    cell, piecewise-linear sigmoid and tanh fitted at calibration); an LSTM it cannot run (a
    clipped cell) stays the QDQ LSTM and the export says why."""
    model = recurrent_model("LSTM")
    if clipped:
        model = _with_clip(model)
    path, data, out = tmp_path / "lstm.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    np.save(data, rng.normal(0, 1, (20, 64, 12)).astype(np.float32))
    r = ptq("quantize", path, "--data", data, "--format", "native", "-o", out, "--no-latency")
    if clipped:  # its only other layer, an int8 Gemm, has no native kernel either
        assert r.returncode == 1 and "rnn: it clips its cell" in r.stderr and not out.exists()
        return
    assert r.returncode == 0, r.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    assert "IntLSTM" in ops and "LSTM" not in ops
    tables = plan["config"]["integer_lstm"]["rnn"]
    assert len(tables["tables"]) == 1 and len(tables["tables"][0]) == 3 and 0 <= tables["cell_frac"] <= 15
    x = rng.normal(0, 1, (20, 32, 12)).astype(np.float32)
    f = session(model).run(None, {"x": x})[0]
    q = session(onnx.load(str(out))).run(None, {"x": x})[0]
    assert np.mean(f.argmax(1) == q.argmax(1)) >= 0.9
    assert np.corrcoef(f.ravel(), q.ravel())[0, 1] > 0.999
