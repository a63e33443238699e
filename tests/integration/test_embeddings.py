"""Embedding tables (float tables only Gathers read by token id) are stored as int8 with one scale
per row; a lookup gathers the codes and the row scales and multiplies."""

import numpy as np
import onnx
import pytest

from builders import text_encoder_model
from ptqcli.runtime import session
from test_cli import ptq
from transformer_builders import token_data


@pytest.mark.parametrize("embeddings", ["int8", "float"])
def test_a_large_embedding_table_is_stored_as_int8_rows(tmp_path, embeddings):
    model, data, out = tmp_path / "encoder.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(text_encoder_model(hidden=128), str(model))  # 40 x 128 = 5,120 values
    np.savez(data, **token_data(64))
    r = ptq("quantize", model, "--data", data, "--embeddings", embeddings, "-o", out)
    assert r.returncode == 0, r.stderr
    quantized = onnx.load(str(out))
    inits = {t.name: t for t in quantized.graph.initializer}
    if embeddings == "float":
        assert inits["embeddings"].data_type == onnx.TensorProto.FLOAT
        return
    assert "embeddings" not in inits and inits["embeddings_quantized"].data_type == onnx.TensorProto.INT8
    assert list(inits["embeddings_row_scale"].dims) == [40, 1]
    feeds = token_data(32, seed=1)
    for f, q in zip(session(onnx.load(str(model))).run(None, feeds), session(quantized).run(None, feeds)):
        cos = np.sum(f * q, -1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(q, axis=-1)
        assert cos.min() > 0.99


def test_embeddings_takes_int8_or_float(tmp_path):
    from test_cli import assert_user_error

    model = tmp_path / "encoder.onnx"
    onnx.save(text_encoder_model(), str(model))
    assert_user_error(ptq("quantize", model, "--acts", "dynamic", "--embeddings", "int4", "-o", tmp_path / "q.onnx"),
                      "--embeddings takes int8 or float (got int4)")
