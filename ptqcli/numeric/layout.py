"""Ops that move, select or pad values without arithmetic: their cotangents move them back."""

from __future__ import annotations

import math

import numpy as np

from .core import OpImpl, normalize_axis, slot, unsupported, wanted


def _to_shape_vjp(x_shape, g, wants):
    """For every op whose output is its input with another shape."""
    return (g.reshape(x_shape),)


def _reshape_forward(inputs, attrs, wants):
    x, shape = inputs[0], [int(d) for d in inputs[1]]
    if not attrs.get("allowzero", 0):
        # 0 copies the input's dimension at that position (unless allowzero says it means 0).
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return (x.reshape(shape),), x.shape


def _flatten_forward(inputs, attrs, wants):
    x = inputs[0]
    axis = normalize_axis(int(attrs.get("axis", 1)), x.ndim)
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),), x.shape


def axes_operand(inputs, attrs) -> list[int] | None:
    """Axes from input 1 (opset 13+) or the attribute (older opsets)."""
    axes = slot(inputs, 1)
    axes = axes if axes is not None else attrs.get("axes")
    return None if axes is None else [int(a) for a in np.ravel(axes)]


def _squeeze_forward(inputs, attrs, wants):
    x, axes = inputs[0], axes_operand(inputs, attrs)
    axes = None if axes is None else tuple(normalize_axis(a, x.ndim) for a in axes)
    return (np.squeeze(x, axis=axes),), x.shape


def _unsqueeze_forward(inputs, attrs, wants):
    x, axes = inputs[0], axes_operand(inputs, attrs)
    rank = x.ndim + len(axes)
    return (np.expand_dims(x, tuple(normalize_axis(a, rank) for a in axes)),), x.shape


def _identity_forward(inputs, attrs, wants):
    return (inputs[0],), inputs[0].shape


def _dropout_forward(inputs, attrs, wants):
    # Inference: every element kept. The mask is a broadcast view, free unless someone reads it.
    x, training = inputs[0], slot(inputs, 2)
    if training is not None and bool(np.ravel(training)[0]):
        raise unsupported("Dropout", "training_mode=true")
    return (x, np.broadcast_to(np.True_, x.shape)), x.shape


def _transpose_forward(inputs, attrs, wants):
    x = inputs[0]
    perm = tuple(attrs.get("perm") or range(x.ndim - 1, -1, -1))
    return (x.transpose(perm),), perm


def _transpose_vjp(perm, g, wants):
    return (g.transpose(np.argsort(perm)),)


def _concat_forward(inputs, attrs, wants):
    axis = normalize_axis(int(attrs["axis"]), inputs[0].ndim)
    return (np.concatenate(inputs, axis=axis),), (axis, [t.shape[axis] for t in inputs])


def _concat_vjp(ctx, g, wants):
    axis, sizes = ctx
    parts = np.split(g, np.cumsum(sizes)[:-1], axis=axis)
    return tuple(p if wanted(wants, i) else None for i, p in enumerate(parts))


PAD_MODES = ("constant", "reflect", "edge", "wrap")  # numpy.pad takes ONNX's names as they are


def pad_widths(inputs, attrs, ndim: int) -> tuple[list[int], list[int]]:
    """(begin, end) per axis from the pads input (opset 11+) or attribute, over ``axes`` (opset 18)."""
    pads = slot(inputs, 1)
    pads = [int(p) for p in (pads if pads is not None else attrs.get("pads", ()))]
    axes = slot(inputs, 3)
    axes = list(range(ndim)) if axes is None else [normalize_axis(int(a), ndim) for a in axes]
    begin, end = [0] * ndim, [0] * ndim
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    return begin, end


def pad_plan(inputs, attrs, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], list[tuple[int, int]], str, dict]:
    """A Pad as numpy.pad (or jax.numpy.pad) takes it: the crop its negative pads make, the widths
    of its positive ones, its mode, and the options of that mode (the constant value)."""
    mode = attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        raise unsupported("Pad", f"mode={mode}")
    begin, end = pad_widths(inputs, attrs, len(shape))
    # Negative pads crop; crop first, then pad what is positive.
    crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for b, e, n in zip(begin, end, shape))
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    value = slot(inputs, 2)
    # reshape, not indexing: under jax the value is a traced array
    value = attrs.get("value", 0.0) if value is None or np.size(value) == 0 else value.reshape(())
    return crop, widths, mode, ({"constant_values": value} if mode == "constant" else {})


def _pad_forward(inputs, attrs, wants):
    x = inputs[0]
    crop, widths, mode, options = pad_plan(inputs, attrs, x.shape)
    y = np.pad(x[crop], widths, mode=mode, **options)
    return (y,), (x.shape, crop, widths, mode)


def _unpad_axis(g: np.ndarray, axis: int, size: int, width: tuple[int, int], mode: str) -> np.ndarray:
    """Adjoint of padding one axis in a reflect/edge/wrap mode: each padded position is a copy of
    one source position, so sum back through a (padded, size) 0/1 matrix."""
    source = np.pad(np.arange(size), width, mode=mode)
    pick = np.zeros((source.size, size), dtype=g.dtype)
    pick[np.arange(source.size), source] = 1
    return np.moveaxis(np.tensordot(g, pick, axes=([axis], [0])), -1, axis)


def _pad_vjp(ctx, g, wants):
    x_shape, crop, widths, mode = ctx
    cropped = tuple(s.stop - s.start for s in crop)
    if mode == "constant":
        g = g[tuple(slice(b, b + n) for (b, _), n in zip(widths, cropped))]
    else:
        for axis, (width, n) in enumerate(zip(widths, cropped)):
            if any(width):
                g = _unpad_axis(g, axis, n, width, mode)
    if cropped == tuple(x_shape):
        return (g,)
    dx = np.zeros(x_shape, dtype=g.dtype)
    dx[crop] = g
    return (dx,)


def slice_bounds(n: int, start: int, end: int, step: int) -> slice:
    """One axis of ONNX Slice as a Python slice: negative indices count from the end, then clamp
    (to [0, n] going forward, to [0, n-1] and [-1, n-1] going backward)."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), n), min(max(end, 0), n), step)
    start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return slice(start, None if end < 0 else end, step)


def slice_index(inputs, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A Slice's starts, ends, axes and steps as one index into an array of `shape`."""
    starts, ends = [int(v) for v in inputs[1]], [int(v) for v in inputs[2]]
    axes, steps = slot(inputs, 3), slot(inputs, 4)
    axes = range(len(starts)) if axes is None else [normalize_axis(int(a), len(shape)) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * len(shape)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[axis] = slice_bounds(shape[axis], start, end, step)
    return tuple(index)


def _slice_forward(inputs, attrs, wants):
    x = inputs[0]
    index = slice_index(inputs, x.shape)
    return (x[index],), (x.shape, index)


def _slice_vjp(ctx, g, wants):
    x_shape, index = ctx
    dx = np.zeros(x_shape, dtype=g.dtype)
    dx[index] = g
    return (dx,)


_CONSTANT_KINDS = {
    "value": None,
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _constant_forward(inputs, attrs, wants):
    for key, dtype in _CONSTANT_KINDS.items():
        if key in attrs:
            return (np.asarray(attrs[key], dtype=dtype),), None
    raise unsupported("Constant", f"a value given as {', '.join(attrs) or 'nothing'}")


OPS = {
    "Reshape": OpImpl(_reshape_forward, _to_shape_vjp),
    "Flatten": OpImpl(_flatten_forward, _to_shape_vjp),
    "Squeeze": OpImpl(_squeeze_forward, _to_shape_vjp),
    "Unsqueeze": OpImpl(_unsqueeze_forward, _to_shape_vjp),
    "Identity": OpImpl(_identity_forward, _to_shape_vjp),
    "Dropout": OpImpl(_dropout_forward, _to_shape_vjp, n_outputs=2),
    "Transpose": OpImpl(_transpose_forward, _transpose_vjp),
    "Concat": OpImpl(_concat_forward, _concat_vjp, grad_inputs=None),
    "Pad": OpImpl(_pad_forward, _pad_vjp),
    "Slice": OpImpl(_slice_forward, _slice_vjp),
    "Constant": OpImpl(_constant_forward, None, grad_inputs=()),
}
