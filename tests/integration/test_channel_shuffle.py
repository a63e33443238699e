"""ShuffleNet's channel shuffle (Reshape -> Transpose -> Reshape) is one Gather of the channel
permutation after preparation: the same values, and the quantized model runs it on uint8 without
the 5-D Transpose."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli import stages
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.prepare import prepare
from ptqcli.runtime import optimized_op_counts, session


def _shuffle_model(groups: int = 4, channels: int = 16, batch="N", split=None, perm=(0, 2, 1, 3, 4)) -> onnx.ModelProto:
    """Conv -> Relu -> channel shuffle -> Conv, batch `batch`, the split written as `split`."""
    rng = np.random.default_rng(0)
    c = lambda name, v, dtype=np.float32: numpy_helper.from_array(np.asarray(v, dtype=dtype), name)  # noqa: E731
    n = helper.make_node
    split = split or [0, groups, channels // groups, 8, 8]
    nodes = [n("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             n("Relu", ["c1"], ["r1"], name="relu1"),
             n("Reshape", ["r1", "split"], ["s1"], name="split"),
             n("Transpose", ["s1"], ["s2"], name="swap", perm=list(perm)),
             n("Reshape", ["s2", "merge"], ["shuffled"], name="merge"),
             n("Conv", ["shuffled", "w2", "b2"], ["out"], name="conv2")]
    inits = [c("w1", rng.normal(0, 0.3, (channels, 8, 3, 3))), c("b1", rng.normal(0, 0.1, channels)),
             c("w2", rng.normal(0, 0.3, (8, channels, 1, 1))), c("b2", rng.normal(0, 0.1, 8)),
             c("split", split, np.int64), c("merge", [-1, channels, 8, 8], np.int64)]
    graph = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 8, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _outputs(model, x):
    return session(model).run(None, {"input": x})[0]


@pytest.mark.parametrize("batch", ["N", 2])
def test_the_shuffle_is_one_gather_with_the_same_values(batch):
    model = _shuffle_model(batch=batch)
    g = prepare(model)
    ops = [n.op_type for n in g.graph.node]
    assert ops == ["Conv", "Relu", "Gather", "Conv"] and g.facts["shuffles_as_gathers"] == 1
    gather = g.graph.node[2]
    assert gather.output[0] == "shuffled" and gather.attribute[0].i == 1
    assert list(g.constant(gather.input[1])) == [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]
    x = np.random.default_rng(1).normal(0, 1, (2, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(g.model, x), _outputs(model, x))
    assert g.value_types["shuffled"] == TensorProto.FLOAT  # the inferred types stay


def test_other_reshape_transpose_reshape_chains_stay():
    # a different permutation, and a split that does not keep the other axes
    for model in (_shuffle_model(perm=(0, 1, 2, 4, 3)), _shuffle_model(split=[0, 4, 4, 4, 16])):
        assert [n.op_type for n in prepare(model).graph.node].count("Gather") == 0


def test_the_quantized_shuffle_runs_on_uint8_without_a_transpose(tmp_path):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npy", tmp_path / "q.onnx"
    onnx.save(_shuffle_model(batch=1), str(model))
    np.save(calib, np.random.default_rng(2).normal(0, 1, (16, 8, 8, 8)).astype(np.float32))
    stages.calibrate(model, QuantConfig(act_damage_limit=None), DataConfig(path=str(calib), batch_size=1), tmp_path / "run")
    stages.export(tmp_path / "run", out, None, 0, latency=False)
    ops = optimized_op_counts(onnx.load(str(out)))
    # conv1 on integers, the shuffle on its uint8 output (no QuantizeLinear in between: the one
    # there is the model input's), conv2 writes the float graph output
    assert ops.get("QLinearConv") == 1 and ops.get("Gather") == 1 and ops.get("QuantizeLinear") == 1
    assert "Reshape" not in ops and ops.get("Transpose", 0) <= 2  # none 5-D


def test_a_shuffle_of_the_last_axis_is_a_gather_of_that_axis():
    """Channels-last exporters shuffle the last axis: [N, H, W, C] -> [N, H, W, g, C/g] -> swap -> back."""
    n = helper.make_node
    nodes = [n("Relu", ["input"], ["r"], name="relu"),
             n("Reshape", ["r", "split"], ["s1"], name="split"),
             n("Transpose", ["s1"], ["s2"], name="swap", perm=[0, 1, 2, 4, 3]),
             n("Reshape", ["s2", "merge"], ["out"], name="merge")]
    inits = [numpy_helper.from_array(np.array([-1, 8, 8, 2, 6], np.int64), "split"),
             numpy_helper.from_array(np.array([0, 8, 8, 12], np.int64), "merge")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 8, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    g = prepare(model)
    gather = next(n for n in g.graph.node if n.op_type == "Gather")
    assert gather.attribute[0].i == 3 and "Transpose" not in {n.op_type for n in g.graph.node}
    x = np.random.default_rng(3).normal(0, 1, (3, 8, 8, 12)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(g.model, x), _outputs(model, x))
