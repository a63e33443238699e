"""Embedding tables (float tables only Gathers read by token id) are stored as int8 with one scale
per row; a lookup gathers the codes and the row scales and multiplies. A table tied to an output
projection is looked up in that projection's MatMulNBits codes."""

import numpy as np
import onnx
import pytest

from builders import text_encoder_model
from ptqcli.runtime import session
from test_cli import ptq
from transformer_builders import tied_head_language_model, token_data


@pytest.mark.parametrize("embeddings", ["int8", "float", "tied"])  # tied: no output projection shares it
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


def test_embeddings_takes_int8_int4_or_float(tmp_path):
    from test_cli import assert_user_error

    model = tmp_path / "encoder.onnx"
    onnx.save(text_encoder_model(), str(model))
    assert_user_error(ptq("quantize", model, "--acts", "dynamic", "--embeddings", "int2", "-o", tmp_path / "q.onnx"),
                      "--embeddings takes int8, int4, float, tied (got int2)")


@pytest.mark.parametrize("zeros", [(), ("--weight-zero-points",)])
def test_int4_embeddings_are_gathered_by_ort_from_the_blocks_the_plan_holds(tmp_path, zeros):
    """--embeddings int4: GatherBlockQuantized (ORT's own kernel, run here) returns exactly the plan's
    dequantized rows, from half of int8's bytes plus the block scales."""
    from ptqcli import rundir
    from ptqcli.quant import dequantize, quantize

    model, data, out = tmp_path / "encoder.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(text_encoder_model(hidden=128), str(model))
    np.savez(data, **token_data(64))
    r = ptq("quantize", model, "--data", data, "--acts", "dynamic", "--embeddings", "int4", "--block-size", "32",
            *zeros, "-o", out, "--run-dir", tmp_path / "run", "--no-latency")
    assert r.returncode == 0, r.stderr
    quantized = onnx.load(str(out))
    gathers = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and {a.name: a.i for a in gathers[0].attribute}["block_size"] == 32
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert inits["embeddings_quantized"].shape == (40, 64) and inits["embeddings_row_scale"].shape == (40, 4)
    assert ("embeddings_zero_points" in inits) == bool(zeros)
    tq = rundir.read_plan(tmp_path / "run").tensors["embeddings"]
    table = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(model)).graph.initializer if t.name == "embeddings"))
    expected = dequantize(quantize(table, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)
    looked_up = gathers[0].output[0]
    probe = onnx.load(str(out))
    probe.graph.output.append(onnx.helper.make_tensor_value_info(looked_up, onnx.TensorProto.FLOAT, None))
    feeds = token_data(8, seed=1)
    rows = session(probe).run([looked_up], feeds)[0]
    np.testing.assert_allclose(rows, expected[feeds["input_ids"]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scaled", [False, True])
def test_a_tied_table_is_looked_up_in_the_output_projections_codes(tmp_path, scaled):
    """--embeddings tied: the table is stored once, as the output projection's MatMulNBits codes;
    GatherBlockQuantized (ORT's kernel, run here) returns exactly the projection's dequantized
    columns, divided by the factors folded into its rows where it holds the table times them. Rows
    of 48 in blocks of 32: MatMulNBits pads the last block and the lookup drops the padding."""
    from ptqcli import rundir
    from ptqcli.calibrate.select import twin_factors
    from ptqcli.graph import Graph

    factors = np.random.default_rng(3).uniform(0.5, 2.0, 48).astype(np.float32) if scaled else None
    model = tmp_path / "lm.onnx"
    onnx.save(tied_head_language_model(head_factors=factors), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(32))
    sizes = {}
    for embeddings in ("int8", "tied"):
        out = tmp_path / f"lm.{embeddings}.onnx"
        r = ptq("quantize", model, "--data", tmp_path / "calib.npz", "--acts", "none", "--weights", "int4",
                "--block-size", "32", "--weight-zero-points", "--rounding", "nearest", "--embeddings", embeddings,
                "-o", out, "--run-dir", tmp_path / embeddings, "--no-latency")
        assert r.returncode == 0, r.stderr
        sizes[embeddings] = out.stat().st_size
    quantized = onnx.load(str(tmp_path / "lm.tied.onnx"))
    inits = {t.name for t in quantized.graph.initializer}
    assert {"embed", "embed_quantized", "embed_row_scale"}.isdisjoint(inits)  # no table of its own
    (lookup,) = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"
               and n.output[0] == "logits"]
    assert lookup.input[0] == head.input[1]
    assert sizes["tied"] < sizes["int8"] - 160 * 48 * 0.9  # the int8 table's bytes are gone
    plan = rundir.read_plan(tmp_path / "tied")
    assert plan.tensors["embed"].source["tied_to"] == "lm_head"
    prepared = Graph(onnx.load(str(tmp_path / "tied" / "model.float.onnx")))
    weight = prepared.constant("lm_head")
    folded = twin_factors(weight, prepared.constant("embed"))
    assert folded is not None and np.all(folded == 1) != scaled
    columns = plan.tensors["lm_head"].on_grid(weight).T
    if not np.all(folded == 1):
        columns = columns * (1 / folded.astype(np.float64)).astype(np.float32)
    feeds = token_data(8, seed=1)
    probe = onnx.load(str(tmp_path / "lm.tied.onnx"))
    probe.graph.output.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None))
    rows = session(probe).run(["h"], feeds)[0]
    np.testing.assert_allclose(rows, columns[feeds["input_ids"]], rtol=1e-6, atol=1e-6)
