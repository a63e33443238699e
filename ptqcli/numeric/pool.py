"""MaxPool, AveragePool and GlobalAveragePool over any number of spatial axes.

Pools loop over kernel taps (a handful) with whole-tensor slices, never over output positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import OpImpl, unsupported, wanted
from .window import Window, col2im, count_windows, crop_spatial, explicit_pads, pad_spatial, spatial_attrs, tap_slices


@dataclass(frozen=True)
class _PoolCtx:
    x_shape: tuple[int, ...]
    win: Window
    weights: np.ndarray  # MaxPool: the winning tap per output; AveragePool: the divisor per window


def pool_window(op_type: str, attrs, sizes) -> tuple[Window, tuple[int, ...]]:
    """The pool's windows and its explicit end padding.

    ``ceil_mode`` adds a last partial window when it starts inside the input or its leading
    padding; the part of it past the explicit padding becomes extra end padding in the returned
    window, which pools ignore (-inf for max, excluded from the average's divisor).
    """
    if "kernel_shape" not in attrs:
        raise unsupported(op_type, "a node without kernel_shape")
    nd = len(sizes)
    kernel = tuple(attrs["kernel_shape"])
    strides, dilations = spatial_attrs(attrs, nd)
    begin, end = explicit_pads(attrs, sizes, kernel, strides, dilations)
    ceil_mode = bool(attrs.get("ceil_mode", 0)) and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    out, overhang = [], []
    for n, b, e, k, s, d in zip(sizes, begin, end, kernel, strides, dilations):
        span = (k - 1) * d + 1
        count = count_windows(n + b + e, span, s, ceil_mode)
        if ceil_mode and (count - 1) * s >= n + b:
            count -= 1
        out.append(count)
        overhang.append(max(0, (count - 1) * s + span - (n + b + e)))
    total_end = tuple(e + o for e, o in zip(end, overhang))
    return Window(kernel, strides, dilations, begin, total_end, tuple(out)), end


def _max_pool_forward(inputs, attrs, wants):
    x = inputs[0]
    win, _ = pool_window("MaxPool", attrs, x.shape[2:])
    xp = pad_spatial(x, win.begin, win.end, -np.inf)
    taps = [xp[index] for _, index in tap_slices(win)]
    best = taps[0].copy()
    for tap in taps[1:]:
        np.maximum(best, tap, out=best)
    if not wanted(wants, 0):
        return (best,), None
    # The winning tap is all the cotangent needs (one byte per output for small kernels): the first
    # tap equal to the maximum, as an argmax would pick, found from the last tap down.
    arg = np.full(best.shape, len(taps) - 1, dtype=np.min_scalar_type(len(taps) - 1))
    for k in range(len(taps) - 2, -1, -1):
        np.copyto(arg, k, where=taps[k] == best)
    return (best,), _PoolCtx(x.shape, win, arg)


def _max_pool_vjp(ctx: _PoolCtx, g, wants):
    lead = ctx.x_shape[:2]
    dxp = np.zeros(lead + ctx.win.padded(ctx.x_shape[2:]), dtype=g.dtype)
    for k, (_, index) in enumerate(tap_slices(ctx.win)):
        dxp[index] += g * (ctx.weights == k)  # a product by the mask beats where= on strided views
    return (crop_spatial(dxp, ctx.win.begin, ctx.win.end),)


def pool_divisor(sizes, win: Window, explicit_end, include_pad: bool, dtype) -> np.ndarray:
    """How many values each window averages: the window clipped to the input, or to the input plus
    its explicit padding when ``count_include_pad``; never the ceil-mode overhang."""
    mask = pad_spatial(np.ones(sizes, dtype=dtype), win.begin, explicit_end, 1.0 if include_pad else 0.0)
    overhang = tuple(e - x for e, x in zip(win.end, explicit_end))
    mask = pad_spatial(mask, (0,) * len(sizes), overhang, 0.0)
    count = np.zeros(win.out, dtype=dtype)
    for _, index in tap_slices(win):
        count += mask[index]
    return count


def _average_pool_forward(inputs, attrs, wants):
    x = inputs[0]
    win, explicit_end = pool_window("AveragePool", attrs, x.shape[2:])
    xp = pad_spatial(x, win.begin, win.end, 0.0)
    total = None
    for _, index in tap_slices(win):
        total = xp[index].copy() if total is None else np.add(total, xp[index], out=total)
    divisor = pool_divisor(x.shape[2:], win, explicit_end, bool(attrs.get("count_include_pad", 0)), x.dtype)
    y = total / divisor
    return (y,), (_PoolCtx(x.shape, win, divisor) if wanted(wants, 0) else None)


def _average_pool_vjp(ctx: _PoolCtx, g, wants):
    nd = len(ctx.win.kernel)
    share = g / ctx.weights
    # Every tap of a window gets the same share: a broadcast view, scattered without copying it.
    cols = np.broadcast_to(share.reshape(share.shape + (1,) * nd), share.shape + ctx.win.kernel)
    dxp = col2im(cols, ctx.win.padded(ctx.x_shape[2:]), ctx.win)
    return (crop_spatial(dxp, ctx.win.begin, ctx.win.end),)


def _global_average_pool_forward(inputs, attrs, wants):
    x = inputs[0]
    y = x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    return (y,), (x.shape if wanted(wants, 0) else None)


def _global_average_pool_vjp(x_shape, g, wants):
    positions = math.prod(x_shape[2:])
    return (np.broadcast_to(g / positions, x_shape).copy(),)


OPS = {
    "MaxPool": OpImpl(_max_pool_forward, _max_pool_vjp),
    "AveragePool": OpImpl(_average_pool_forward, _average_pool_vjp),
    "GlobalAveragePool": OpImpl(_global_average_pool_forward, _global_average_pool_vjp),
}
