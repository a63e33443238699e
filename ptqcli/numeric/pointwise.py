"""Element-wise ops: activations, broadcasting arithmetic, Softmax and inference BatchNormalization.

Activations whose derivative is piecewise constant keep a boolean mask (one byte per element)
rather than the float input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import OpImpl, channel_view, non_channel_axes, slot, unbroadcast, unsupported, wanted


def _relu_forward(inputs, attrs, wants):
    y = np.maximum(inputs[0], 0)
    return (y,), (y > 0 if wanted(wants, 0) else None)


def _masked_vjp(mask, g, wants):
    return (np.where(mask, g, 0),)


def _leaky_relu_forward(inputs, attrs, wants):
    x, alpha = inputs[0], float(attrs.get("alpha", 0.01))
    positive = x >= 0
    y = np.where(positive, x, alpha * x)
    return (y,), ((positive, alpha) if wanted(wants, 0) else None)


def _leaky_relu_vjp(ctx, g, wants):
    positive, alpha = ctx
    return (np.where(positive, g, alpha * g),)


def clip_bounds(inputs, attrs):
    """Bounds from the min/max inputs (opset 11+), else the attributes (older opsets), else none."""
    lo, hi = slot(inputs, 1), slot(inputs, 2)
    lo = lo if lo is not None else attrs.get("min")
    hi = hi if hi is not None else attrs.get("max")
    return lo, hi


def _clip_forward(inputs, attrs, wants):
    x = inputs[0]
    lo, hi = clip_bounds(inputs, attrs)
    y = x if lo is None and hi is None else np.clip(x, lo, hi).astype(x.dtype, copy=False)
    if not wanted(wants, 0):
        return (y,), None
    inside = np.ones(x.shape, dtype=bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    return (y,), inside


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for large negative x.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _sigmoid_forward(inputs, attrs, wants):
    y = _sigmoid(inputs[0])
    return (y,), (y if wanted(wants, 0) else None)


def _sigmoid_vjp(y, g, wants):
    return (g * y * (1 - y),)


def _hard_sigmoid_forward(inputs, attrs, wants):
    x = inputs[0]
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    z = alpha * x + beta
    y = np.clip(z, 0, 1)
    return (y,), (((z > 0) & (z < 1), alpha) if wanted(wants, 0) else None)


def _hard_sigmoid_vjp(ctx, g, wants):
    linear, alpha = ctx
    return (np.where(linear, alpha * g, 0),)


def _hard_swish_forward(inputs, attrs, wants):
    x = inputs[0]
    y = x * np.clip(x / 6 + 0.5, 0, 1)
    return (y,), (x if wanted(wants, 0) else None)


def _hard_swish_vjp(x, g, wants):
    slope = np.where(x > 3, 1, np.where(x < -3, 0, x / 3 + 0.5)).astype(g.dtype, copy=False)
    return (g * slope,)


def _softmax_forward(inputs, attrs, wants):
    x, axis = inputs[0], int(attrs.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return (y,), ((y, axis) if wanted(wants, 0) else None)


def _softmax_vjp(ctx, g, wants):
    y, axis = ctx
    return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)


def _shapes_forward(fn):
    """Add and Sub: the cotangents need only the operand shapes."""
    def forward(inputs, attrs, wants):
        a, b = inputs[0], inputs[1]
        return (fn(a, b),), (a.shape, b.shape)
    return forward


def _add_vjp(shapes, g, wants):
    return (unbroadcast(g, shapes[0]) if wanted(wants, 0) else None,
            unbroadcast(g, shapes[1]) if wanted(wants, 1) else None)


def _sub_vjp(shapes, g, wants):
    return (unbroadcast(g, shapes[0]) if wanted(wants, 0) else None,
            unbroadcast(-g, shapes[1]) if wanted(wants, 1) else None)


def _mul_forward(inputs, attrs, wants):
    a, b = inputs[0], inputs[1]
    # Each operand's cotangent needs the other operand.
    return (a * b,), (a if wanted(wants, 1) else a.shape, b if wanted(wants, 0) else b.shape)


def _shape_of(kept) -> tuple[int, ...]:
    return kept if isinstance(kept, tuple) else kept.shape


def _mul_vjp(ctx, g, wants):
    a, b = ctx
    da = unbroadcast(g * b, _shape_of(a)) if wanted(wants, 0) else None
    db = unbroadcast(g * a, _shape_of(b)) if wanted(wants, 1) else None
    return da, db


def _div_forward(inputs, attrs, wants):
    a, b = inputs[0], inputs[1]
    y = a / b
    # d/da = 1/b, d/db = -a/b^2 = -y/b: b serves both, y only the second.
    keep = wanted(wants, 0) or wanted(wants, 1)
    return (y,), (a.shape, b if keep else None, y if wanted(wants, 1) else None)


def _div_vjp(ctx, g, wants):
    a_shape, b, y = ctx
    ga = g / b
    da = unbroadcast(ga, a_shape) if wanted(wants, 0) else None
    db = unbroadcast(-ga * y, b.shape) if wanted(wants, 1) else None
    return da, db


@dataclass(frozen=True)
class _BatchNormCtx:
    x: np.ndarray | None  # kept only for the scale and variance cotangents
    scale: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray


def _batch_norm_forward(inputs, attrs, wants):
    if attrs.get("training_mode", 0):
        raise unsupported("BatchNormalization", "training_mode=1")
    x, scale, bias, mean, var = inputs[:5]
    inv_std = 1 / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    gain = channel_view(scale * inv_std, x.ndim)
    y = (x - channel_view(mean, x.ndim)) * gain + channel_view(bias, x.ndim)
    keep_x = wanted(wants, 1) or wanted(wants, 4)
    return (y,), _BatchNormCtx(x if keep_x else None, scale, mean, inv_std)


def _batch_norm_vjp(ctx: _BatchNormCtx, g, wants):
    axes = non_channel_axes(g.ndim)
    gain = ctx.scale * ctx.inv_std
    g_sum = g.sum(axis=axes) if wanted(wants, 2) or wanted(wants, 3) else None
    centred_sum = None
    if wanted(wants, 1) or wanted(wants, 4):
        centred_sum = (g * (ctx.x - channel_view(ctx.mean, g.ndim))).sum(axis=axes)
    dx = g * channel_view(gain, g.ndim) if wanted(wants, 0) else None
    dscale = centred_sum * ctx.inv_std if wanted(wants, 1) else None
    dbias = g_sum if wanted(wants, 2) else None
    dmean = -g_sum * gain if wanted(wants, 3) else None
    dvar = -0.5 * centred_sum * ctx.scale * ctx.inv_std**3 if wanted(wants, 4) else None
    return dx, dscale, dbias, dmean, dvar


def batch_stats(x: np.ndarray, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of an (N, C, ...) batch, the statistics BatchNormalization
    would normalise it with: the quantities synthetic calibration data is fitted to match."""
    axes = non_channel_axes(x.ndim)
    return x.mean(axis=axes), x.var(axis=axes, ddof=1 if unbiased else 0)


def batch_stats_vjp(x: np.ndarray, g_mean: np.ndarray | None = None, g_var: np.ndarray | None = None,
                    unbiased: bool = False) -> np.ndarray:
    """Cotangent of ``x`` given cotangents of :func:`batch_stats`'s mean and variance (either may
    be None)."""
    axes = non_channel_axes(x.ndim)
    count = math.prod(x.shape[a] for a in axes)
    dx = np.zeros_like(x)
    if g_mean is not None:
        dx += channel_view(np.asarray(g_mean, dtype=x.dtype) / count, x.ndim)
    if g_var is not None:
        centred = x - x.mean(axis=axes, keepdims=True)
        dx += centred * channel_view(np.asarray(g_var, dtype=x.dtype) * (2.0 / (count - unbiased)), x.ndim)
    return dx


OPS = {
    "Relu": OpImpl(_relu_forward, _masked_vjp),
    "LeakyRelu": OpImpl(_leaky_relu_forward, _leaky_relu_vjp),
    "Clip": OpImpl(_clip_forward, _masked_vjp),
    "Sigmoid": OpImpl(_sigmoid_forward, _sigmoid_vjp),
    "HardSigmoid": OpImpl(_hard_sigmoid_forward, _hard_sigmoid_vjp),
    "HardSwish": OpImpl(_hard_swish_forward, _hard_swish_vjp),
    "Softmax": OpImpl(_softmax_forward, _softmax_vjp),
    "Add": OpImpl(_shapes_forward(np.add), _add_vjp, grad_inputs=(0, 1)),
    "Sub": OpImpl(_shapes_forward(np.subtract), _sub_vjp, grad_inputs=(0, 1)),
    "Mul": OpImpl(_mul_forward, _mul_vjp, grad_inputs=(0, 1)),
    "Div": OpImpl(_div_forward, _div_vjp, grad_inputs=(0, 1)),
    "BatchNormalization": OpImpl(_batch_norm_forward, _batch_norm_vjp, grad_inputs=(0, 1, 2, 3, 4)),
}
