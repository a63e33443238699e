"""Graphs ORT's transformer optimizer fused: the com.microsoft Attention's QKV weight gets int8
per-column scales and the op becomes QAttention, statically or with run-time input scales."""

import numpy as np
import onnx
import pytest

from builders import fused_attention_model
from ptqcli.runtime import optimized_op_counts, session
from test_cli import ptq


@pytest.mark.parametrize("acts", ["uint8", "dynamic"])
def test_fused_attention_becomes_qattention(tmp_path, acts):
    model, data, out = tmp_path / "fused.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(fused_attention_model(), str(model))
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 9, 64).astype(np.int32)
    np.savez(data, x=rng.normal(0, 1, (64, 8, 16)).astype(np.float32), mask_index=lengths)
    r = ptq("quantize", model, "--data", data, "--acts", acts, "-o", out)
    assert r.returncode == 0, r.stderr
    quantized = onnx.load(str(out))
    (qattention,) = [n for n in quantized.graph.node if n.op_type == "QAttention"]
    inits = {t.name: t for t in quantized.graph.initializer}
    assert inits[qattention.input[1]].data_type == onnx.TensorProto.INT8
    assert list(inits[qattention.input[4]].dims) == [48]  # one scale per QKV column
    assert "qkv_w" not in inits  # only the int8 codes are stored
    kernels = optimized_op_counts(quantized)
    assert kernels.get("QAttention") == 1 and "Attention" not in kernels, kernels
    x = rng.normal(0, 1, (16, 8, 16)).astype(np.float32)
    feeds = {"x": x, "mask_index": np.full(16, 8, np.int32)}
    f, q = session(onnx.load(str(model))).run(None, feeds)[0], session(quantized).run(None, feeds)[0]
    cos = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(f, q)]
    assert min(cos) > 0.999
