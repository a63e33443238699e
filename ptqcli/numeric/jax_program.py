"""An ONNX graph as a pure jax function, so XLA compiles its forward pass and jax derives the reverse.

The numpy operators (``REGISTRY``) remain the reference: this table mirrors the ones the
convolutional networks use, one small function per op, and reads attributes, windows and padding
through the same helpers, so the two agree on ONNX semantics by construction. Gradients come from
``jax.grad``; the depthwise convolution alone states its reverse, for speed (``_depthwise_backward``).

Only modules that ask for the jax backend import this one: jax is an optional dependency
(``pip install ptqcli[jax]``).

Integer and boolean constants (shapes, pads, axes) stay numpy arrays, so every shape is known when
the function is traced; a node whose inputs are all such constants runs on the numpy operators
then. Float initializers are arguments (``JaxGraph.params``), not constants baked into the
compiled program, which keeps compilation fast for models with many weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from onnx import ModelProto, numpy_helper

from ..errors import PtqError
from ..graph import MIN_OPSET, clone, default_opset, set_opset
from .core import channel_view, normalize_axis, slot, unsupported
from .conv import transpose_window
from .layout import axes_operand, pad_plan, slice_index
from .pointwise import clip_bounds
from .pool import pool_divisor, pool_window
from .registry import forward, node_attrs
from .window import conv_window, tap_slices

# One op: (inputs in the node's slots, None for omitted ones; attributes) -> outputs.
JaxOp = Callable[[list, Mapping[str, Any]], tuple]


def _one(fn) -> JaxOp:
    """An op of one input and one output, without attributes."""
    return lambda inputs, attrs: (fn(inputs[0]),)


# --------------------------------------------------------------------------- #
# Convolutions and matrix products
# --------------------------------------------------------------------------- #


def _pad_spatial(x, win, value: float):
    """window.pad_spatial for jax arrays: the trailing spatial axes padded as the window says."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - len(win.begin)) + list(zip(win.begin, win.end)), constant_values=value)


def _add_bias(y, b):
    return y if b is None else y + channel_view(b, y.ndim)


def _depthwise_taps(xp, w, win):
    """Sum over kernel taps of a strided slice of the padded input times a per-channel weight."""
    y = None
    for offsets, index in tap_slices(win):
        term = xp[index] * channel_view(w[(slice(None), 0) + offsets], xp.ndim)
        y = term if y is None else y + term
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_conv(x, w, win):
    return _depthwise_taps(_pad_spatial(x, win, 0.0), w, win)


def _depthwise_forward(x, w, win):
    return _depthwise_conv(x, w, win), (x, w)


def _depthwise_backward(win, saved, g):
    """The data cotangent is itself a depthwise convolution: of the cotangent spread out by the
    strides, with the kernel flipped. Written so, each output element reads the cotangent once
    per tap; the reverse of the strided slices would instead make XLA recompute the whole
    elementwise chain that produced the cotangent once per tap (several times slower)."""
    x, w = saved
    g = lax.optimization_barrier(g)
    sizes = x.shape[2:]
    reach = [(k - 1) * d for k, d in zip(win.kernel, win.dilations)]
    spread = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0)] * 2 + [
        (r, b + n + e - (o - 1) * s - 1, s - 1)
        for r, b, n, e, o, s in zip(reach, win.begin, sizes, win.end, win.out, win.strides)])
    dx = None
    for offsets in np.ndindex(*win.kernel):
        tap = spread[(Ellipsis,) + tuple(slice(b + o * d, b + o * d + n)
                                         for b, o, d, n in zip(win.begin, offsets, win.dilations, sizes))]
        mirrored = tuple(k - 1 - o for k, o in zip(win.kernel, offsets))
        term = tap * channel_view(w[(slice(None), 0) + mirrored], x.ndim)
        dx = term if dx is None else dx + term
    xp = _pad_spatial(x, win, 0.0)
    axes = (0,) + tuple(range(2, x.ndim))
    dw = jnp.stack([jnp.sum(g * xp[index], axis=axes) for _, index in tap_slices(win)], axis=-1)
    return dx, dw.reshape(w.shape)


_depthwise_conv.defvjp(_depthwise_forward, _depthwise_backward)


def _depthwise(x, w, win, multiplier: int):
    """A convolution whose groups each read one input channel, as a sum over taps of strided
    slices times per-channel weights: XLA's CPU convolution multiplies a dense, mostly zero
    kernel instead (four times slower on EfficientNet-Lite0)."""
    if multiplier > 1:
        x = jnp.repeat(x, multiplier, axis=1)
    return _depthwise_conv(x, w, win)


def _pointwise(x, w, win):
    """A 1x1 convolution as a matrix product per sample, (M, C) @ (C, positions): two to three
    times faster than XLA's CPU convolution of the same shape, forward and reverse. The weight is
    broadcast over the batch so the product lands in (N, M, positions) order with no transpose."""
    x = x[(Ellipsis,) + tuple(slice(None, None, s) for s in win.strides)]
    n, c = x.shape[:2]
    rows = jnp.broadcast_to(w.reshape(w.shape[:2]), (n,) + w.shape[:2])
    y = lax.dot_general(rows, x.reshape(n, c, -1), (((2,), (1,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)
    return y.reshape((n, w.shape[0]) + x.shape[2:])


def _conv(inputs, attrs):
    x, w, b = inputs[0], inputs[1], slot(inputs, 2)
    groups = int(attrs.get("group", 1))
    win = conv_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w.shape[2:])
    if groups > 1 and groups == x.shape[1] and w.shape[1] == 1:
        return (_add_bias(_depthwise(x, w, win, w.shape[0] // groups), b),)
    if groups == 1 and all(k == 1 for k in win.kernel) and not any(win.begin + win.end):
        return (_add_bias(_pointwise(x, w, win), b),)
    y = lax.conv_general_dilated(x, w, win.strides, list(zip(win.begin, win.end)), rhs_dilation=win.dilations,
                                 feature_group_count=groups, precision=lax.Precision.HIGHEST)
    return (_add_bias(y, b),)


def _conv_transpose(inputs, attrs):
    """The Conv of the stride-dilated input with the flipped kernel, cropped as ONNX says."""
    x, w, b = inputs[0], inputs[1], slot(inputs, 2)
    groups, nd = int(attrs.get("group", 1)), x.ndim - 2
    kernel = tuple(attrs.get("kernel_shape") or w.shape[2:])
    win, out = transpose_window(attrs, x.shape[2:], kernel)
    extra = tuple(attrs.get("output_padding") or (0,) * nd)
    # (C, M/G, *k) -> (M, C/G, *k): each group's input and output channels swap roles.
    c, per_group_out = w.shape[:2]
    w = w.reshape((groups, c // groups, per_group_out) + kernel).swapaxes(1, 2)
    w = jnp.flip(w.reshape((groups * per_group_out, c // groups) + kernel), axis=tuple(range(2, 2 + nd)))
    spans = [(k - 1) * d for k, d in zip(kernel, win.dilations)]
    full = lax.conv_general_dilated(x, w, (1,) * nd, [(s, s + e) for s, e in zip(spans, extra)],
                                    lhs_dilation=win.strides, rhs_dilation=win.dilations,
                                    feature_group_count=groups, precision=lax.Precision.HIGHEST)
    crop = tuple(slice(bg, bg + n) for bg, n in zip(win.begin, out))
    return (_add_bias(full[(slice(None), slice(None)) + crop], b),)


def _gemm(inputs, attrs):
    a, b, c = inputs[0], inputs[1], slot(inputs, 2)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = float(attrs.get("alpha", 1.0)) * jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    return (y if c is None else y + float(attrs.get("beta", 1.0)) * c,)


def _matmul(inputs, attrs):
    return (jnp.matmul(inputs[0], inputs[1], precision=lax.Precision.HIGHEST),)


# --------------------------------------------------------------------------- #
# Element-wise
# --------------------------------------------------------------------------- #


def _pass_inside(x, inside, clipped):
    """``clipped``, with the derivative 1 where ``inside`` holds and 0 elsewhere: the numpy
    operators' convention, where jnp.clip would give 1/2 on a bound."""
    return jnp.where(inside, x, clipped)


def _clip(inputs, attrs):
    x = inputs[0]
    lo, hi = clip_bounds(inputs, attrs)
    if lo is None and hi is None:
        return (x,)
    inside = jnp.ones(x.shape, bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return (_pass_inside(x, inside, jnp.clip(x, lo, hi)),)


def _hard_sigmoid_of(x, alpha: float, beta: float):
    z = alpha * x + beta
    return _pass_inside(z, (z > 0) & (z < 1), jnp.clip(z, 0, 1))


def _hard_sigmoid(inputs, attrs):
    return (_hard_sigmoid_of(inputs[0], float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))),)


def _leaky_relu(inputs, attrs):
    x, alpha = inputs[0], float(attrs.get("alpha", 0.01))
    return (jnp.where(x >= 0, x, alpha * x),)


def _sigmoid(x):
    return 0.5 * (1.0 + jnp.tanh(0.5 * x))  # the numpy operator's form


def _softmax(inputs, attrs):
    return (jax.nn.softmax(inputs[0], axis=int(attrs.get("axis", -1))),)


def _binary(fn) -> JaxOp:
    return lambda inputs, attrs: (fn(inputs[0], inputs[1]),)


def _batch_norm(inputs, attrs):
    if attrs.get("training_mode", 0):
        raise unsupported("BatchNormalization", "training_mode=1")
    x, scale, bias, mean, var = inputs[:5]
    gain = channel_view(scale / jnp.sqrt(var + float(attrs.get("epsilon", 1e-5))), x.ndim)
    return ((x - channel_view(mean, x.ndim)) * gain + channel_view(bias, x.ndim),)


# --------------------------------------------------------------------------- #
# Pooling
# --------------------------------------------------------------------------- #


def _max_pool(inputs, attrs):
    """The maximum over taps, taken so that the first tap holding it wins the cotangent, as in the
    numpy operator (jnp.maximum would split it between ties). Also several times faster on CPU
    than the reverse pass of lax.reduce_window."""
    x = inputs[0]
    win, _ = pool_window("MaxPool", attrs, x.shape[2:])
    xp = _pad_spatial(x, win, -jnp.inf)
    best = None
    for _, index in tap_slices(win):
        tap = xp[index]
        best = tap if best is None else jnp.where(tap > best, tap, best)
    return (best,)


def _average_pool(inputs, attrs):
    x = inputs[0]
    win, explicit_end = pool_window("AveragePool", attrs, x.shape[2:])
    xp = _pad_spatial(x, win, 0.0)
    total = sum(xp[index] for _, index in tap_slices(win))
    return (total / pool_divisor(x.shape[2:], win, explicit_end, bool(attrs.get("count_include_pad", 0)), np.float32),)


def _global_average_pool(inputs, attrs):
    x = inputs[0]
    return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True),)


# --------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------- #


def _reshape(inputs, attrs):
    x, shape = inputs[0], [int(d) for d in inputs[1]]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return (x.reshape(shape),)


def _flatten(inputs, attrs):
    x = inputs[0]
    axis = normalize_axis(int(attrs.get("axis", 1)), x.ndim)
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


def _squeeze(inputs, attrs):
    x, axes = inputs[0], axes_operand(inputs, attrs)
    axes = tuple(i for i, n in enumerate(x.shape) if n == 1) if axes is None else axes
    return (jnp.squeeze(x, tuple(normalize_axis(a, x.ndim) for a in axes)),)


def _unsqueeze(inputs, attrs):
    x, axes = inputs[0], axes_operand(inputs, attrs)
    rank = x.ndim + len(axes)
    return (jnp.expand_dims(x, tuple(normalize_axis(a, rank) for a in axes)),)


def _dropout(inputs, attrs):
    x, training = inputs[0], slot(inputs, 2)
    if training is not None and bool(np.ravel(training)[0]):
        raise unsupported("Dropout", "training_mode=true")
    return x, jnp.ones(x.shape, bool)


def _transpose(inputs, attrs):
    x = inputs[0]
    return (x.transpose(tuple(attrs.get("perm") or range(x.ndim - 1, -1, -1))),)


def _concat(inputs, attrs):
    return (jnp.concatenate(inputs, axis=normalize_axis(int(attrs["axis"]), inputs[0].ndim)),)


def _pad(inputs, attrs):
    x = inputs[0]
    crop, widths, mode, options = pad_plan(inputs, attrs, x.shape)
    return (jnp.pad(x[crop], widths, mode=mode, **options),)


def _slice(inputs, attrs):
    return (inputs[0][slice_index(inputs, inputs[0].shape)],)


OPS: dict[str, JaxOp] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Relu": _one(jax.nn.relu),  # its derivative at 0 is 0, as the numpy operator's; jnp.maximum's is 1/2
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Sigmoid": _one(_sigmoid),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _one(lambda x: x * _hard_sigmoid_of(x, 1 / 6, 0.5)),
    "Softmax": _softmax,
    "Add": _binary(jnp.add),
    "Sub": _binary(jnp.subtract),
    "Mul": _binary(jnp.multiply),
    "Div": _binary(jnp.divide),
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": lambda inputs, attrs: (inputs[0],),
    "Dropout": _dropout,
    "Transpose": _transpose,
    "Concat": _concat,
    "Pad": _pad,
    "Slice": _slice,
}


# --------------------------------------------------------------------------- #
# The graph
# --------------------------------------------------------------------------- #


def _op_name(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def uncovered_ops(model: ModelProto) -> list[str]:
    """Op types of the model without a jax implementation, in graph order (Constant nodes are
    evaluated once, on the numpy operators)."""
    names = (_op_name(n) for n in model.graph.node if n.op_type != "Constant" or n.domain not in ("", "ai.onnx"))
    return list(dict.fromkeys(n for n in names if n not in OPS))


def _is_static(value) -> bool:
    return value is None or isinstance(value, np.ndarray)


class JaxGraph:
    """A model as a pure function ``graph(params, feeds) -> {output: array}`` to trace under jax.jit.

    Raises a one-line PtqError naming the first op without a jax implementation.
    """

    def __init__(self, model: ModelProto):
        if default_opset(model) < MIN_OPSET:
            # The ops implement opset-13 semantics, as the numpy operators do.
            model = set_opset(clone(model), MIN_OPSET)
        for node in model.graph.node:
            if _op_name(node) not in OPS and _op_name(node) != "Constant":
                where = f" (node '{node.name}')" if node.name else ""
                raise PtqError(f"no jax implementation of {_op_name(node)}{where}")
        constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = []
        for node in model.graph.node:
            if node.op_type == "Constant":
                constants[node.output[0]] = forward("Constant", [], node_attrs(node))[0]
            else:
                self.nodes.append((node.op_type, tuple(node.input), tuple(node.output), node_attrs(node), node.name))
        self.params = {n: v.astype(np.float32) for n, v in constants.items() if v.dtype.kind == "f"}
        self.static = {n: v for n, v in constants.items() if v.dtype.kind != "f"}
        self.inputs = [i.name for i in model.graph.input if i.name not in constants]
        self.outputs = [o.name for o in model.graph.output]

    def __call__(self, params: Mapping[str, Any], feeds: Mapping[str, Any]) -> dict[str, Any]:
        env: dict[str, Any] = {**self.static, **params, **feeds}
        for op_type, inputs, outputs, attrs, name in self.nodes:
            args = [env[n] if n else None for n in inputs]
            if all(_is_static(a) for a in args):
                values = forward(op_type, args, attrs)  # shape arithmetic: stays numpy, so shapes stay known
            else:
                values = OPS[op_type](args, attrs)
            if len([o for o in outputs if o]) > len(values):
                where = f" '{name}'" if name else ""
                raise PtqError(f"jax {op_type} node{where}: only its first {len(values)} output(s) are supported")
            env.update((n, v) for n, v in zip(outputs, values) if n)
        return {n: env[n] for n in self.outputs}


def input_gradient(graph: JaxGraph, input_name: str, part_losses: Callable[..., list]
                   ) -> Callable[[np.ndarray, int], tuple[list[float], np.ndarray]]:
    """A compiled ``(x, size) -> (losses, gradient)`` for a loss made of parts.

    ``part_losses(outputs, size=size, count=len(x))`` maps the graph outputs to a list of scalar
    losses; the gradient is that of their sum with respect to the graph input ``input_name``, as a
    float32 numpy array. One compilation per (x shape, size).
    """
    params = jax.device_put(graph.params)

    def total(params, x, size):
        parts = jnp.stack(part_losses(graph(params, {input_name: x}), size=size, count=len(x)))
        return parts.sum(), parts

    step = jax.jit(jax.value_and_grad(total, argnums=1, has_aux=True), static_argnums=2)

    def losses_and_grad(x: np.ndarray, size: int) -> tuple[list[float], np.ndarray]:
        (_, parts), grad = step(params, np.asarray(x, dtype=np.float32), size)
        return np.asarray(parts).tolist(), np.array(grad)  # a writable copy: callers add priors in place

    return losses_and_grad
