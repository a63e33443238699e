"""One description of a weighted layer's geometry, built on the per-op facts of ops.py.

Every stage that looks inside a weight sees it the same way:
- rows: ``(groups, outputs per group, K)``, each output channel's weights in the order its input
  columns are laid out (Conv: input channel major, then kernel taps; Gemm/MatMul: K). Rounding,
  re-fits, native packing and binarized layers all work on these rows.
- columns: the layer's inputs as ``(groups, K, positions)``, so ``rows @ columns`` is the layer's
  output (Conv: image patches; Gemm/MatMul: the rows of the input).
- the N:M matrix: ``[rows, input channels]``, groups of M running along input channels at each
  kernel position (Conv: ``[Cout * taps, Cin/g]``; Gemm/MatMul: ``[N, K]``), as sparse tensor
  cores lay out an implicit-GEMM convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from .graph import Graph
from .ops import MATRIX_OPS, attr, channel_axis, groups, node_attrs, op_info
from .numeric.conv import conv_patches, conv_patches_at, grouped_rows
from .numeric.window import conv_window


def supported(node: NodeProto) -> bool:
    return node.op_type in MATRIX_OPS


@dataclass(frozen=True)
class WeightGeometry:
    """Which weight axis holds output channels, which input channels, and the groups (Conv)."""

    op_type: str
    out_axis: int
    in_axis: int
    groups: int = 1


def geometry(node: NodeProto, ndim: int) -> WeightGeometry:
    info = op_info(node.op_type, node.domain)
    if node.op_type not in MATRIX_OPS or info is None or info.weight_in_axis is None:
        raise ValueError(f"weight rows are defined for {', '.join(MATRIX_OPS)}, not {node.op_type}")
    return WeightGeometry(node.op_type, channel_axis(node) % ndim, info.weight_in_axis(node) % ndim,
                          groups(node) if node.op_type == "Conv" else 1)


def _axes_of(shape: tuple[int, ...], op_type: str, out_channel_axis: int) -> WeightGeometry:
    """The geometry of a weight known only by its op type and output axis (Gemm/MatMul: the
    reduction axis is the other one of the last two)."""
    if op_type not in MATRIX_OPS:
        raise ValueError(f"N:M layout is defined for {', '.join(MATRIX_OPS)}, not {op_type}")
    ndim = len(shape)
    out = out_channel_axis % ndim if ndim else 0
    if op_type == "Conv":
        if ndim < 3 or out != 0:
            raise ValueError(f"a Conv weight is [Cout, Cin/g, *kernel] with channel axis 0; "
                             f"got {shape}, {out_channel_axis}")
        return WeightGeometry(op_type, 0, 1)
    if ndim < 2 or out < ndim - 2:
        raise ValueError(f"a {op_type} weight's output axis must be one of its last two; got {shape}, {out_channel_axis}")
    return WeightGeometry(op_type, out, (2 * ndim - 3) - out)


# ---- rows ------------------------------------------------------------------------------------


def to_rows(geo: WeightGeometry, w: np.ndarray) -> np.ndarray:
    """(groups, outputs per group, K)."""
    if geo.op_type == "Conv":
        return grouped_rows(w, geo.groups)
    moved = np.moveaxis(w, (geo.out_axis, geo.in_axis), (-2, -1))
    return moved.reshape(1, -1, moved.shape[-1])


def from_rows(geo: WeightGeometry, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if geo.op_type == "Conv":
        return np.asarray(rows).reshape(shape)
    rest = [s for i, s in enumerate(shape) if i not in (geo.out_axis, geo.in_axis)]
    moved = np.asarray(rows).reshape(*rest, shape[geo.out_axis], shape[geo.in_axis])
    return np.moveaxis(moved, (-2, -1), (geo.out_axis, geo.in_axis))


def weight_rows(node: NodeProto, w: np.ndarray) -> np.ndarray:
    """(groups, outputs per group, K): rows that multiply the columns of `layer_columns`."""
    return to_rows(geometry(node, w.ndim), w)


def rows_to_weight(node: NodeProto, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return from_rows(geometry(node, len(shape)), rows, shape)


def flat_rows(node: NodeProto, w: np.ndarray) -> np.ndarray:
    """[N, K]: every output channel's row, groups one after another (what the native kernels pack)."""
    rows = weight_rows(node, w)
    return rows.reshape(-1, rows.shape[-1])


def per_row(node: NodeProto, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-output-channel values (a scale along the output axis, or one for the tensor) laid out
    like the weight rows: (groups, outputs per group, 1)."""
    values = np.asarray(values)
    geo = geometry(node, len(shape))
    n = shape[geo.out_axis]
    full = np.full(n, values.ravel()[0]) if values.size == 1 else values.reshape(n)
    view = [1] * len(shape)
    view[geo.out_axis] = n
    return to_rows(geo, np.broadcast_to(full.reshape(view), shape))[:, :, :1]


# ---- the N:M matrix --------------------------------------------------------------------------


def weight_to_matrix(w: np.ndarray, op_type: str, out_channel_axis: int) -> np.ndarray:
    """The weight as a 2-D matrix whose rows are contiguous along the input channels:
    Conv ``[Cout, Cin/g, *kernel]`` -> ``[Cout * prod(kernel), Cin/g]``; Gemm/MatMul -> ``[N, K]``
    (a MatMul weight with leading batch axes gives ``[batch * N, K]``). :func:`matrix_to_weight`
    inverts it."""
    w = np.asarray(w)
    geo = _axes_of(w.shape, op_type, out_channel_axis)
    if op_type == "Conv":
        return np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
    return to_rows(geo, w)[0]


def matrix_to_weight(mat: np.ndarray, shape: tuple[int, ...], op_type: str, out_channel_axis: int) -> np.ndarray:
    """Inverse of :func:`weight_to_matrix`: the ``[rows, K]`` matrix back in the weight's ``shape``."""
    shape = tuple(int(s) for s in shape)
    geo = _axes_of(shape, op_type, out_channel_axis)
    if op_type == "Conv":
        moved = (shape[0], *shape[2:], shape[1])
        return np.moveaxis(np.asarray(mat).reshape(moved), -1, 1)
    return from_rows(geo, mat, shape)


# ---- columns ---------------------------------------------------------------------------------


def layer_columns(node: NodeProto, x: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
    """(groups, K, columns): the inputs each weight row sees, one column per output position."""
    if node.op_type == "Conv":
        return conv_patches(x, node_attrs(node), w_shape)
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        x = x.T
    return x.reshape(-1, x.shape[-1]).T[None]


def sampled_columns(node: NodeProto, x: np.ndarray, w_shape: tuple[int, ...], per_sample: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`per_sample` random columns of `layer_columns` from each sample (all of them when a sample
    has no more), sample-major: (S, G, K). Conv patches are built only at the chosen windows."""
    samples = len(x)
    if node.op_type == "Conv":
        attrs = node_attrs(node)
        win = conv_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w_shape[2:])
        block = math.prod(win.out)
    else:
        columns = np.moveaxis(layer_columns(node, x, w_shape), 2, 0)
        block = len(columns) // samples
    if block <= per_sample:
        picks = np.arange(samples * block)
    else:
        picks = np.concatenate([i * block + np.sort(rng.choice(block, per_sample, replace=False))
                                for i in range(samples)])
    if node.op_type == "Conv":
        return conv_patches_at(x, attrs, w_shape, picks // block, picks % block)
    return columns[picks]


# ---- sizes -----------------------------------------------------------------------------------


def layer_macs(g: Graph, node_name: str, weight: str, output_shape: list[int] | None) -> int | None:
    """Multiply-accumulates per sample: output elements x reduction length (weight size / channels);
    ConvTranspose counts per input element."""
    node = g.node_by_name[node_name]
    info = op_info(node.op_type, node.domain)
    w_shape = list(g.initializers[weight].dims)
    if info is None or not w_shape:
        return None
    if info.macs_per_input:
        in_shape = g.value_shapes.get(node.input[0])
        if not in_shape or not all(isinstance(d, int) for d in in_shape[1:]):
            return None
        return int(np.prod(in_shape[1:])) * int(np.prod(w_shape)) // w_shape[0]
    if output_shape is None:
        return None
    channels = w_shape[info.channel_axis(node) % len(w_shape)]
    return int(np.prod(output_shape)) * int(np.prod(w_shape)) // channels


# ---- what the native kernels take --------------------------------------------------------------


def native_unsupported(node: NodeProto, w: np.ndarray) -> str | None:
    """None when a native kernel (Int4*, Shift*, Binary*) takes this layer's geometry, else why not."""
    if node.op_type == "Conv":
        if w.ndim != 4:
            return "only 2-D convolutions have native kernels"
        if attr(node, "auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad is not supported natively"
        return None
    if node.op_type == "Gemm":
        plain = attr(node, "transA", 0) == 0 and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0
        return None if plain and w.ndim == 2 else "only Gemm with transA=0, alpha=beta=1 has a native kernel"
    if node.op_type == "MatMul":
        return None if w.ndim == 2 else "only MatMul by a 2-D weight has a native kernel"
    return f"{node.op_type} layers have no native kernel"


def kernel_attributes(node: NodeProto, w: np.ndarray) -> dict:
    """The convolution attributes a native Conv kernel reads (Gemm/MatMul take none)."""
    if node.op_type != "Conv":
        return {}
    return {
        "kernel_shape": list(w.shape[2:]),
        "strides": list(attr(node, "strides", (1, 1))),
        "pads": list(attr(node, "pads", (0, 0, 0, 0))),
        "dilations": list(attr(node, "dilations", (1, 1))),
        "group": int(attr(node, "group", 1)),
    }


def channel_shape(node: NodeProto, n: int) -> tuple[int, ...]:
    """The shape that broadcasts n per-channel values against the layer's input or output
    (NCHW for Conv, the last axis for Gemm/MatMul)."""
    return (1, n, 1, 1) if node.op_type == "Conv" else (n,)
