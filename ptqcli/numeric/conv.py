"""Conv and ConvTranspose over any number of spatial axes, as grouped matrix products.

Both ops reduce to one layout: ``patches`` of shape (groups, channels_per_group * taps,
N * windows), built by im2col and multiplied by the weight as a (groups, ...) batch of matrices,
so BLAS does the work. ConvTranspose is the adjoint of a Conv, so its forward is Conv's data cotangent and its
data cotangent is Conv's forward, both sharing :func:`_patches` and :func:`_patches_adjoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import OpImpl, channel_view, non_channel_axes, slot, unsupported, wanted
from .window import Window, conv_window, crop_spatial, im2col, pad_spatial, spatial_attrs, tap_slices


@dataclass(frozen=True)
class _ConvCtx:
    x: np.ndarray | None  # kept only when the weight cotangent is wanted
    w: np.ndarray | None  # kept only when the data cotangent is wanted
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    win: Window
    groups: int


def _grouped(t: np.ndarray, groups: int) -> np.ndarray:
    """(N, C, *spatial) -> (groups, C / groups, N * positions)."""
    n, c = t.shape[:2]
    positions = math.prod(t.shape[2:])
    return t.reshape(n, groups, c // groups, positions).transpose(1, 2, 0, 3).reshape(groups, c // groups, -1)


def _ungrouped(m: np.ndarray, n: int, spatial: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_grouped`: (groups, C / groups, N * positions) -> (N, C, *spatial)."""
    groups, per_group, _ = m.shape
    y = m.reshape(groups, per_group, n, -1).transpose(2, 0, 1, 3)
    return y.reshape((n, groups * per_group) + tuple(spatial))


def _patches(xp: np.ndarray, win: Window, groups: int) -> np.ndarray:
    """im2col of the padded input as (groups, C / groups * taps, N * windows), one copy.

    Windows run along the last axis so the copy reads the input's rows contiguously.
    """
    nd = len(win.kernel)
    n, c = xp.shape[:2]
    cols = im2col(xp, win)  # (N, C, *out, *kernel), a view
    cols = cols.reshape((n, groups, c // groups) + cols.shape[2:])
    order = (1, 2, *range(3 + nd, 3 + 2 * nd), 0, *range(3, 3 + nd))
    return cols.transpose(order).reshape(groups, -1, n * math.prod(win.out))


def _patches_adjoint(patches: np.ndarray, shape: tuple[int, ...], win: Window, groups: int) -> np.ndarray:
    """Adjoint of :func:`_patches` followed by padding: scatter-add patches into an unpadded
    tensor of ``shape`` (N, C, *spatial)."""
    nd = len(win.kernel)
    n, c = shape[:2]
    cols = patches.reshape((groups, c // groups) + win.kernel + (n,) + win.out)
    # Summed in the patches' own (G, C/G, N, *spatial) order, where every tap's slice is contiguous,
    # then turned to (N, C, *spatial) once: col2im over a transposed view gathers at a stride.
    full = np.zeros((groups, c // groups, n) + tuple(win.padded(shape[2:])), dtype=patches.dtype)
    for offsets, index in tap_slices(win):
        full[index] += cols[(slice(None), slice(None)) + offsets]
    full = full.transpose((2, 0, 1, *range(3, 3 + nd))).reshape((n, c) + full.shape[3:])
    return crop_spatial(full, win.begin, win.end)


def grouped_rows(w: np.ndarray, groups: int) -> np.ndarray:
    """(M, C/G, *kernel) -> (G, M/G, C/G * taps). ConvTranspose's (C, M/G, *kernel) weight gives
    (G, C/G, M/G * taps) the same way."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _bias_cotangent(g: np.ndarray) -> np.ndarray:
    return g.sum(axis=non_channel_axes(g.ndim))


def _conv_forward(inputs, attrs, wants):
    x, w, b = inputs[0], inputs[1], slot(inputs, 2)
    groups = int(attrs.get("group", 1))
    win = conv_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w.shape[2:])
    patches = _patches(pad_spatial(x, win.begin, win.end), win, groups)
    y = _ungrouped(grouped_rows(w, groups) @ patches, x.shape[0], win.out)
    if b is not None:
        y += channel_view(b, y.ndim)
    ctx = _ConvCtx(x if wanted(wants, 1) else None, w if wanted(wants, 0) else None,
                   x.shape, w.shape, win, groups)
    return (y,), ctx


def _conv_vjp(ctx: _ConvCtx, g, wants):
    gm = _grouped(g, ctx.groups)  # (G, M / G, N * windows)
    dx = dw = db = None
    if wanted(wants, 0):
        rows = grouped_rows(ctx.w, ctx.groups)
        dx = _patches_adjoint(rows.transpose(0, 2, 1) @ gm, ctx.x_shape, ctx.win, ctx.groups)
    if wanted(wants, 1):
        patches = _patches(pad_spatial(ctx.x, ctx.win.begin, ctx.win.end), ctx.win, ctx.groups)
        dw = (gm @ patches.transpose(0, 2, 1)).reshape(ctx.w_shape)
    if wanted(wants, 2):
        db = _bias_cotangent(g)
    return dx, dw, db


def _transpose_pads(attrs, full: list[int], sizes, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How much of the full (uncropped) ConvTranspose result is cut at each end.

    With ``output_shape`` or SAME auto-padding the cut is derived from the requested size; the
    odd unit goes to the end for SAME_UPPER (as ONNX Runtime does) and to the start otherwise.
    """
    nd = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    target = attrs.get("output_shape")
    if target:
        target = tuple(target)[-nd:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = tuple(n * s for n, s in zip(sizes, strides))
    if not target:
        if auto_pad == "VALID":
            return (0,) * nd, (0,) * nd
        pads = tuple(attrs.get("pads") or (0,) * (2 * nd))
        return pads[:nd], pads[nd:]
    total = [f - t for f, t in zip(full, target)]
    if min(total) < 0:
        raise unsupported("ConvTranspose", f"output_shape {list(target)} larger than the full result {full}")
    if auto_pad == "SAME_UPPER":
        begin = [t // 2 for t in total]
    else:
        begin = [t - t // 2 for t in total]
    return tuple(begin), tuple(t - b for t, b in zip(total, begin))


def transpose_window(attrs, sizes, kernel) -> tuple[Window, tuple[int, ...]]:
    """ConvTranspose as the adjoint of a Conv whose windows are the input positions; and the
    output's spatial sizes (the full result, extended by output_padding, minus the cut pads)."""
    nd = len(sizes)
    kernel = tuple(kernel)
    strides, dilations = spatial_attrs(attrs, nd)
    extra = tuple(attrs.get("output_padding") or (0,) * nd)
    full = [s * (n - 1) + e + (k - 1) * d + 1 for n, s, e, k, d in zip(sizes, strides, extra, kernel, dilations)]
    begin, end = _transpose_pads(attrs, full, sizes, strides)
    out = tuple(f - b - e for f, b, e in zip(full, begin, end))
    return Window(kernel, strides, dilations, begin, end, tuple(sizes)), out


def _conv_transpose_forward(inputs, attrs, wants):
    x, w, b = inputs[0], inputs[1], slot(inputs, 2)
    groups = int(attrs.get("group", 1))
    win, out = transpose_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w.shape[2:])
    cols = grouped_rows(w, groups).transpose(0, 2, 1) @ _grouped(x, groups)  # (G, M / G * taps, N * positions)
    y = np.ascontiguousarray(_patches_adjoint(cols, (x.shape[0], w.shape[1] * groups) + out, win, groups))
    if b is not None:
        y += channel_view(b, y.ndim)
    ctx = _ConvCtx(x if wanted(wants, 1) else None, w if wanted(wants, 0) else None,
                   x.shape, w.shape, win, groups)
    return (y,), ctx


def _conv_transpose_vjp(ctx: _ConvCtx, g, wants):
    patches = _patches(pad_spatial(g, ctx.win.begin, ctx.win.end), ctx.win, ctx.groups)
    dx = dw = db = None
    if wanted(wants, 0):
        dx = _ungrouped(grouped_rows(ctx.w, ctx.groups) @ patches, ctx.x_shape[0], ctx.x_shape[2:])
    if wanted(wants, 1):
        dw = (_grouped(ctx.x, ctx.groups) @ patches.transpose(0, 2, 1)).reshape(ctx.w_shape)
    if wanted(wants, 2):
        db = _bias_cotangent(g)
    return dx, dw, db


OPS = {
    "Conv": OpImpl(_conv_forward, _conv_vjp, grad_inputs=(0, 1, 2)),
    "ConvTranspose": OpImpl(_conv_transpose_forward, _conv_transpose_vjp, grad_inputs=(0, 1, 2)),
}


def conv_patches(x: np.ndarray, attrs: dict, w_shape: tuple[int, ...]) -> np.ndarray:
    """The columns a Conv multiplies its weight rows with: (groups, C / groups * taps, N * windows).

    Layer-wise optimisation solves for the weight rows against these directly."""
    groups = int(attrs.get("group", 1))
    win = conv_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w_shape[2:])
    return _patches(pad_spatial(x, win.begin, win.end), win, groups)


def conv_patches_at(x: np.ndarray, attrs: dict, w_shape: tuple[int, ...], samples: np.ndarray,
                    windows: np.ndarray) -> np.ndarray:
    """The columns of :func:`conv_patches` at chosen (sample, flat window index) pairs only,
    sample-major: (len(samples), groups, C / groups * taps). Nothing but those windows is copied."""
    groups = int(attrs.get("group", 1))
    win = conv_window(attrs, x.shape[2:], attrs.get("kernel_shape") or w_shape[2:])
    cols = im2col(pad_spatial(x, win.begin, win.end), win)  # (N, C, *out, *kernel), a view
    picked = cols[(samples, slice(None)) + np.unravel_index(windows, win.out)]  # (S, C, *kernel)
    return picked.reshape(len(samples), groups, -1)

