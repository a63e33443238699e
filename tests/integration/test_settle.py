"""Activations that feed no integer GEMM kernel stay in float where quantizing them costs fidelity,
decided from measured damage: the attention-mask Add of a padded batch is the case in point."""

import numpy as np
import onnx
import pytest

from builders import masked_attention_model
from ptqcli import rundir, stages
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
    measured = plan.config["activation_damage"]
    assert "masked" in measured and "masked" not in plan.tensors  # the scores plus -3.4e38 padding
    for gemm_input in ("x", "k", "probs", "ctx"):  # read by MatMuls (k through a Transpose): never a candidate
        assert gemm_input in plan.tensors and gemm_input not in measured
    damages = {t: d["damage"] for t, d in measured.items() if "damage" in d}
    assert damages["masked"] > 100 * max(d for t, d in damages.items() if t != "masked")
    # MatMul outputs read only by float ops buy no kernel (ORT's MatMulIntegerToFloat writes float):
    # the projection before the residual Add, the Add itself, and the scores once the mask Add is float.
    for idle in ("o", "res"):
        assert idle not in plan.tensors and idle not in damages and not measured[idle]["quantized"]
    assert "scores" not in plan.tensors and not measured["scores"]["quantized"]

    stages.calibrate(model, QuantConfig(act_damage_limit=None), data, tmp / "every")
    assert "masked" in rundir.read_plan(tmp / "every").tensors
    settled, every = _cosine(tmp / "run", tmp / "settled.onnx", tmp / "eval.npz"), _cosine(
        tmp / "every", tmp / "every.onnx", tmp / "eval.npz")
    assert settled > 0.99 and settled > every + 0.05
