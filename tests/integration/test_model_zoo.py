"""Real architectures from onnx's own test data (opset 9, Caffe2 ops, synthetic weights) and a
transformer encoder: every one must quantize, pass onnx.checker and run in ONNX Runtime."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import encoder_model
from test_cli import ptq
from ptqcli import stages
from ptqcli.config import DataConfig, QuantConfig

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.name for p in LIGHT.glob("light_*.onnx"))


def test_all_nine_light_models_are_present():
    assert len(LIGHT_MODELS) == 9


def _random_data(path: Path, model: onnx.ModelProto, n: int) -> Path:
    params = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in params)
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim][1:]
    np.save(path, np.random.default_rng(0).normal(0, 1, [n, *shape]).astype(np.float32))
    return path


def _ops(model):
    return {n.op_type for n in model.graph.node}


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_quantizes_checks_and_runs(tmp_path, name):
    source = onnx.load(str(LIGHT / name))
    data = _random_data(tmp_path / "x.npy", source, 3)
    out = tmp_path / "q.onnx"
    r = ptq("quantize", LIGHT / name, "--data", data, "--num-samples", 2, "--eval-samples", 1, "-o", out)
    assert r.returncode == 0, r.stderr
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(q)
    fidelity = json.loads((tmp_path / "q.onnx.run" / "fidelity.json").read_text())
    assert len(fidelity["layers"]) > 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(data)[:1]
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.all(np.isfinite(y))
    assert fidelity["held_out"]  # the third sample was held out


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_transformer_encoder_quantizes_and_stays_close(tmp_path, weights):
    model_path = tmp_path / "encoder.onnx"
    onnx.save(encoder_model(), str(model_path))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).normal(0, 1, (96, 16, 32)).astype(np.float32))
    run = tmp_path / "run"
    plan = stages.calibrate(model_path, QuantConfig(weights=weights), DataConfig(path=str(data), num_samples=64), run)
    _, fidelity = stages.export(run, tmp_path / "q.onnx", eval_samples=32)
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q)
    assert {"LayerNormalization", "Softmax", "Gelu"} <= _ops(q)
    assert len(plan.layers) == 6  # q, k, v, o, ffn_in, ffn_out projections
    # The attention MatMuls between two activations stay float at 8 bits (no faster integer kernel
    # on CPU), so the softmax output they read is not quantized; the projections' inputs are.
    assert {n for n, why in plan.float_nodes.items() if "two activations" in why} and "probs" not in plan.tensors
    assert fidelity.outputs["y"]["cosine"] > (0.99 if weights == "int8" else 0.95)
