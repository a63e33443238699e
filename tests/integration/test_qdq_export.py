"""Exported QDQ graphs: op counts, checker, ORT execution, int4, and closeness to float."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from builders import conv_bn_relu_model
from ptqcli import stages
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.export.qdq import export_qdq
from ptqcli.graph import Graph
from ptqcli import rundir


def _ops(model):
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _quantize(tmp_path, model_path, data, **quant):
    run = tmp_path / "run"
    plan = stages.calibrate(model_path, QuantConfig(**quant), DataConfig(path=str(data), num_samples=64), run)
    g = Graph(rundir.read_float_model(run))
    return export_qdq(g, plan), g, plan


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_w8a8_graph_structure(tmp_path, tiny_cnn, tiny_data):
    q, g, plan = _quantize(tmp_path, tiny_cnn, tiny_data)
    onnx.checker.check_model(q, full_check=True)
    ops = _ops(q)
    assert "BatchNormalization" not in ops  # folded before quantization
    # 5 activations (input, r1, r2, gap, flat) get Q+DQ; 3 weights and 3 biases get a DQ.
    assert ops["QuantizeLinear"] == 5
    assert ops["DequantizeLinear"] == 5 + 3 + 3
    types = {t.name: t.data_type for t in q.graph.initializer}
    assert types["w1_quantized"] == TensorProto.INT8
    assert types["conv1_bn_bias_quantized"] == TensorProto.INT32  # BN-folded bias of conv1
    bias_ints = [n for n, t in types.items() if n.endswith("_quantized") and t == TensorProto.INT32]
    assert len(bias_ints) == 3
    assert [o.name for o in q.graph.output] == ["logits"]


def test_w8a8_runs_in_ort_and_stays_close_to_float(tmp_path, tiny_cnn, tiny_data):
    q, g, _ = _quantize(tmp_path, tiny_cnn, tiny_data)
    x = np.random.default_rng(9).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    f = _run(onnx.load(str(tiny_cnn)), x)
    y = _run(q, x)
    sqnr = 10 * np.log10(np.sum(f**2) / np.sum((f - y) ** 2))
    assert sqnr > 25
    assert np.mean(f.argmax(1) == y.argmax(1)) >= 0.9


def test_int8_weights_use_ort_integer_kernels(tmp_path, tiny_cnn, tiny_data):
    from ptqcli.runtime import optimized_op_counts

    q, _, _ = _quantize(tmp_path, tiny_cnn, tiny_data)
    assert optimized_op_counts(q).get("QLinearConv") == 2


def test_int4_weights_need_opset_21_and_run(tmp_path, tiny_cnn, tiny_data):
    q, _, plan = _quantize(tmp_path, tiny_cnn, tiny_data, weights="int4")
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == 21
    types = {t.name: t.data_type for t in q.graph.initializer}
    assert types["w1_quantized"] == TensorProto.INT4
    assert all(plan.tensors[w].spec.qmax == 7 for w in ("w1", "w2", "w3"))
    x = np.random.default_rng(9).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    f, y = _run(onnx.load(str(tiny_cnn)), x), _run(q, x)
    assert np.corrcoef(f.ravel(), y.ravel())[0, 1] > 0.95


def test_int4_weight_values_are_the_plan_grid(tmp_path, tiny_cnn, tiny_data):
    q, g, plan = _quantize(tmp_path, tiny_cnn, tiny_data, weights="int4")
    w = onnx.numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "w2_quantized"))
    assert w.min() >= -7 and w.max() <= 7 and len(np.unique(w)) > 8


def test_acts_none_is_weight_only(tmp_path, tiny_cnn, tiny_data):
    q, _, _ = _quantize(tmp_path, tiny_cnn, tiny_data, acts="none")
    ops = _ops(q)
    assert "QuantizeLinear" not in ops and ops["DequantizeLinear"] == 3  # weights only; no int32 bias


def test_excluded_nodes_stay_float(tmp_path, tiny_cnn, tiny_data):
    q, _, plan = _quantize(tmp_path, tiny_cnn, tiny_data, exclude_nodes=("fc",))
    assert "w3" not in plan.tensors and plan.float_nodes["fc"] == "excluded by the recipe"
    fc = next(n for n in q.graph.node if n.name == "fc")
    assert fc.input[1] == "w3"


def test_per_tensor_weights(tmp_path, tiny_cnn, tiny_data):
    _, _, plan = _quantize(tmp_path, tiny_cnn, tiny_data, granularity="tensor")
    assert all(np.size(plan.tensors[w].scale) == 1 for w in ("w1", "w2", "w3"))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_every_method_exports_a_working_model(tmp_path, tiny_cnn, tiny_data, method):
    q, _, _ = _quantize(tmp_path, tiny_cnn, tiny_data, method=method)
    y = _run(q, np.zeros((2, 3, 8, 8), np.float32))
    assert np.all(np.isfinite(y))


def test_models_too_big_for_one_protobuf_go_through_external_data(tmp_path, tiny_cnn, tiny_data, monkeypatch):
    """The > 2 GB path, exercised by lowering the size at which it kicks in."""
    import ptqcli.graph

    monkeypatch.setattr(ptqcli.graph, "EXTERNAL_DATA_THRESHOLD", 500)
    wide = tmp_path / "wide.onnx"
    onnx.save(conv_bn_relu_model(channels=32), str(wide))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    stages.calibrate(wide, QuantConfig(), DataConfig(path=str(tiny_data), num_samples=32), tmp_path / "run")
    _, fidelity = stages.export(tmp_path / "run", out, eval_samples=16)
    assert {"q.onnx", "q.onnx.data"} <= {p.name for p in out.parent.iterdir()}
    assert (tmp_path / "run" / "model.float.onnx.data").is_file()
    assert (out.parent / "q.onnx.data").stat().st_size > out.stat().st_size / 4  # tensors live in .data
    assert fidelity.outputs["logits"]["cosine"] > 0.99
    x = np.random.default_rng(2).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("weights,qmax", [("int3", 3), ("int2", 1)])
def test_sub_4_bit_weights_live_on_their_grid_in_int4_containers(tmp_path, tiny_cnn, tiny_data, weights, qmax):
    q, _, plan = _quantize(tmp_path, tiny_cnn, tiny_data, weights=weights)
    onnx.checker.check_model(q)
    w = onnx.numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "w2_quantized"))
    assert next(t for t in q.graph.initializer if t.name == "w2_quantized").data_type == TensorProto.INT4
    assert set(np.unique(w)) <= set(range(-qmax, qmax + 1))
    assert w.min() == -qmax or w.max() == qmax  # the grid's ends are used
    assert np.all(np.isfinite(_run(q, np.ones((2, 3, 8, 8), np.float32))))


@pytest.mark.parametrize("weights", ["binary", "ternary", "pow2:4", "exp:3"])
def test_level_set_weights_export_and_run(tmp_path, tiny_cnn, tiny_data, weights):
    q, _, plan = _quantize(tmp_path, tiny_cnn, tiny_data, weights=weights)
    onnx.checker.check_model(q, full_check=True)
    scheme = weights.split(":")[0]
    # binary/ternary keep the first and last layer at int8 by default
    expected = {"w1": "int", "w2": scheme, "w3": "int"} if scheme in ("binary", "ternary") else \
        {"w1": scheme, "w2": scheme, "w3": scheme}
    assert {w: plan.tensors[w].spec.scheme for w in ("w1", "w2", "w3")} == expected
    codes = onnx.numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "w2_quantized"))
    assert len(np.unique(codes)) <= 2 ** plan.tensors["w2"].spec.bits
    x = np.random.default_rng(9).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    assert np.all(np.isfinite(_run(q, x)))
