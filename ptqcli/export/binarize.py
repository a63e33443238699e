"""Binary inputs (XNOR-Net style) for fully binary layers, expressed in standard ONNX ops.

A binarized layer computes
    y = (W_b * sign(x - mu)) . K + W mu + b
where mu is the input's calibration channel mean, W_b the binary weights (alpha * sign(W)), and K
the mean |x - mu| over each window the layer reads (padding excluded): exactly what the BinaryConv /
BinaryGemm / BinaryMatMul kernels compute from x - mu, so the native export only swaps the
emulation for the operator. W mu is folded per output channel, with the float weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..geometry import channel_shape, flat_rows, weight_rows
from ..ops import node_attrs


@dataclass(frozen=True)
class BinaryNames:
    """Tensor and node names of one layer's emulation, shared by the QDQ and native exports."""

    node: str

    def tensor(self, part: str) -> str:
        return f"{self.node}_binary_{part}"

    @property
    def centered(self) -> str:  # x - mu: the native operator's input
        return self.tensor("centered")

    @property
    def folded_bias(self) -> str:  # b + W mu
        return self.tensor("bias")

    @property
    def output_nodes(self) -> tuple[str, str]:  # what the native operator replaces after the layer
        return self.tensor("scale_node"), self.tensor("bias_node")


def _conv_window_mean(names: BinaryNames, magnitude: str, w: np.ndarray, node: NodeProto):
    """Sum of |x - mu| over each window / number of real elements in it: two Convs with an all-ones
    kernel, one over |x - mu| and one over ones (which counts the unpadded taps)."""
    attrs = {k: v for k, v in node_attrs(node).items() if k in ("strides", "pads", "dilations", "group", "auto_pad")}
    groups = int(attrs.get("group", 1))
    rows = 1 if groups == 1 else w.shape[0]
    ones_kernel = np.ones((rows,) + w.shape[1:], dtype=np.float32)
    kernel, ones, shape = names.tensor("ones_kernel"), names.tensor("ones"), names.tensor("shape")
    total, count, mean = names.tensor("window_sum"), names.tensor("window_count"), names.tensor("window_mean")
    nodes = [
        helper.make_node("Shape", [magnitude], [shape], name=shape + "_node"),
        helper.make_node("ConstantOfShape", [shape], [ones], name=ones + "_node",
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Conv", [magnitude, kernel], [total], name=total + "_node", **attrs),
        helper.make_node("Conv", [ones, kernel], [count], name=count + "_node", **attrs),
        helper.make_node("Div", [total, count], [mean], name=mean + "_node"),
    ]
    return nodes, [numpy_helper.from_array(ones_kernel, kernel)], mean


def _row_window_mean(names: BinaryNames, magnitude: str, w: np.ndarray, node: NodeProto):
    """Mean |x - mu| over the last axis, as a MatMul by a column of 1/K (no opset-dependent Reduce)."""
    k = flat_rows(node, w).shape[1]
    column, mean = names.tensor("mean_column"), names.tensor("window_mean")
    nodes = [helper.make_node("MatMul", [magnitude, column], [mean], name=mean + "_node")]
    return nodes, [numpy_helper.from_array(np.full((k, 1), 1.0 / k, dtype=np.float32), column)], mean


def _mean_term(node: NodeProto, w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """W mu per output channel: each row against the means of the input channels it reads."""
    rows = weight_rows(node, w.astype(np.float64))          # (G, M/G, K), K input-channel major
    per_group = mean.astype(np.float64).reshape(len(rows), -1)  # (G, C/G)
    taps = rows.shape[2] // per_group.shape[1]
    return (rows @ np.repeat(per_group, taps, axis=1)[:, :, None]).reshape(-1)


def _window_mean(names: BinaryNames, magnitude: str, w: np.ndarray, node: NodeProto):
    return (_conv_window_mean if node.op_type == "Conv" else _row_window_mean)(names, magnitude, w, node)


def binarize_layer(node: NodeProto, mean: np.ndarray, w_float: np.ndarray,
                   bias: np.ndarray | None) -> tuple[list[NodeProto], list[NodeProto], list[TensorProto]]:
    """Rewires `node` (in place) to read sign(x - mu) and write its dot products; returns the nodes
    that go before it, the nodes that go after it (ending in its original output) and the new
    initializers."""
    names = BinaryNames(node.name)
    x, output = node.input[0], node.output[0]
    n_out = flat_rows(node, w_float).shape[0]
    folded = _mean_term(node, w_float, mean) + (0.0 if bias is None else bias.astype(np.float64).reshape(-1))
    inits = [
        numpy_helper.from_array(mean.astype(np.float32).reshape(channel_shape(node, mean.size)), names.tensor("mean")),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), names.tensor("zero")),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), names.tensor("plus_one")),
        numpy_helper.from_array(np.array(-1.0, dtype=np.float32), names.tensor("minus_one")),
        numpy_helper.from_array(folded.astype(np.float32).reshape(channel_shape(node, n_out)), names.folded_bias),
    ]
    negative, signs, magnitude = names.tensor("negative"), names.tensor("signs"), names.tensor("magnitude")
    before = [
        helper.make_node("Sub", [x, names.tensor("mean")], [names.centered], name=names.centered + "_node"),
        helper.make_node("Less", [names.centered, names.tensor("zero")], [negative], name=negative + "_node"),
        # sign(0) = +1, as the kernels' sign bit has it
        helper.make_node("Where", [negative, names.tensor("minus_one"), names.tensor("plus_one")], [signs],
                         name=signs + "_node"),
        helper.make_node("Abs", [names.centered], [magnitude], name=magnitude + "_node"),
    ]
    mean_nodes, mean_inits, window_mean = _window_mean(names, magnitude, w_float, node)
    dot, scaled = names.tensor("dot"), names.tensor("scaled")
    node.input[0] = signs
    del node.input[2:]  # the bias is folded with W mu
    node.output[0] = dot
    scale_node, bias_node = names.output_nodes
    after = [
        helper.make_node("Mul", [dot, window_mean], [scaled], name=scale_node),
        helper.make_node("Add", [scaled, names.folded_bias], [output], name=bias_node),
    ]
    return before + mean_nodes, after, inits + mean_inits
