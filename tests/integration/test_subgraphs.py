"""Control flow: an If whose branches hold MatMuls (one on a weight of its own, one on a weight the
main graph also quantizes). The main graph quantizes, each branch the calibration data takes is
quantized as a model of its own (tests/integration/test_branches.py), and the exported model is
valid and runs whichever branch is taken."""

import json

import numpy as np
import onnx
import pytest

from builders import branching_model
from ptqcli.runtime import session
from test_cli import ptq


@pytest.mark.parametrize("acts", ["uint8", "dynamic"])
def test_layers_inside_an_if_quantize_with_the_branch_the_data_takes(tmp_path, acts):
    model, data, out = tmp_path / "branching.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(branching_model(), str(model))
    rng = np.random.default_rng(1)
    np.save(data, rng.normal(0, 1, (64, 16)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "--acts", acts, "-o", out)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "q.card.json").read_text())
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    assert {layer["node"] for layer in plan["layers"]} == {"mm0", "mm_out", "mm_side"}
    # Calibration batches take both branches (the sign of their sum): both quantize, none is listed float.
    assert not {k for k in plan["float_nodes"] if "/" in k} and not {k for k in card["tradeoffs"]["float_nodes"] if "/" in k}
    outcome = json.loads((tmp_path / "q.onnx.run" / "branches.json").read_text())
    assert outcome == {"branch.then_branch": "quantized: 1 layers", "branch.else_branch": "quantized: 1 layers"}
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    f, q = session(onnx.load(str(model))), session(quantized)
    for sign in (1, -1):  # both branches
        x = np.abs(rng.normal(0, 1, (8, 16))).astype(np.float32) * sign
        for a, b in zip(f.run(None, {"x": x}), q.run(None, {"x": x})):
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_an_initializer_only_a_branch_reads_survives_preparation(tmp_path):
    """Folding constants drops initializers nothing reads; one that only an If branch reads is read
    (ONNX Runtime refused the prepared copy of such models)."""
    from onnx import TensorProto, helper, numpy_helper

    from ptqcli.prepare import prepare

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "branch_only")
    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "branch_only"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    g = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "branch_only" in g.initializers
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(session(g.model).run(None, {"x": x})[0], 2 * x)


def test_decoding_weights_at_load_keeps_what_only_a_branch_reads(tmp_path):
    """A weight-only Conv's weights are decoded at load, which drops the scale tensors nothing reads
    any more; an initializer only an If branch reads is read, so it stays and the model loads
    (silero-vad's op-15 export lost its branch constants that way)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    branch_only = numpy_helper.from_array(np.full((1, 4, 8, 8), 2.0, np.float32), "branch_only")
    then_branch = helper.make_graph([helper.make_node("Mul", ["c", "branch_only"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4, 8, 8])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["c"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["flag"], name="positive"),
             helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array(0, np.float32), "zero"), branch_only])
    model, data, out = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    np.save(data, rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "--acts", "none", "--weights", "int4", "-o", out)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "q.card.json").read_text())
    assert set(card["model"]["container"]["decoded"]) == {"conv"}
    quantized = onnx.load(str(out))
    assert "branch_only" in {t.name for t in quantized.graph.initializer}
    x = np.abs(rng.normal(0, 1, (2, 3, 8, 8))).astype(np.float32)
    f, q = session(onnx.load(str(model))).run(None, {"x": x})[0], session(quantized).run(None, {"x": x})[0]
    assert np.corrcoef(f.ravel(), q.ravel())[0, 1] > 0.99
