"""Numeric quantization: scales from ranges, quantize and dequantize exactly as ONNX defines them."""

from __future__ import annotations

import numpy as np

from .formats import QuantSpec, encode

# A scale of zero would divide by zero in QuantizeLinear; an all-zero tensor gets this instead.
_MIN_SCALE = np.float32(1e-8)


def scale_zero_point(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) that map [lo, hi] onto the spec's integer grid.

    The range is widened to contain zero so that zero (padding, ReLU) is exactly representable.
    """
    qmin, qmax = spec.qmin, spec.qmax
    if spec.float_zero:  # weights only: zero need not be on the grid, the range is the block's own
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        scale = np.maximum(((hi - lo) / (qmax - qmin)).astype(np.float32), _MIN_SCALE)
        return scale, (qmin - lo / scale).astype(np.float32)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if spec.symmetric:
        bound = np.maximum(-lo, hi)
        if spec.signed:
            scale = bound / ((qmax - qmin) / 2.0)
            zero_point = np.zeros_like(scale, dtype=np.int64)
        else:
            # Unsigned symmetric means a grid starting at zero: only for non-negative tensors.
            scale = hi / (qmax - qmin)
            zero_point = np.full(scale.shape, qmin, dtype=np.int64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(qmin - lo / safe), qmin, qmax).astype(np.int64)
    scale = np.maximum(scale.astype(np.float32), _MIN_SCALE)
    return scale, zero_point


def per_value(values: np.ndarray, shape: tuple, spec: QuantSpec) -> np.ndarray:
    """Scales or zero points laid against a tensor of `shape`: per tensor, per channel along
    spec.axis, or repeated over each block of spec.block_size values along it."""
    if spec.block_size is None or values.ndim == 0:
        return _broadcast(values, len(shape), spec.axis)
    axis = spec.axis % len(shape)
    return np.repeat(values, spec.block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)


def block_ranges(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each block of `block_size` values along `axis` (the last block may be short):
    arrays shaped like w with that axis cut to the number of blocks."""
    axis = axis % w.ndim
    k = w.shape[axis]
    blocks = -(-k // block_size)
    pad = [(0, 0)] * w.ndim
    pad[axis] = (0, blocks * block_size - k)
    lo = np.pad(w, pad, mode="edge") if pad[axis][1] else w
    shaped = np.moveaxis(lo, axis, 0).reshape(blocks, block_size, *np.moveaxis(lo, axis, 0).shape[1:])
    return (np.moveaxis(shaped.min(axis=1), 0, axis), np.moveaxis(shaped.max(axis=1), 0, axis))


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), as integers (int64).

    Level-set schemes (binary, pow2, ...) snap to their nearest level's code instead."""
    if spec.scheme != "int":
        return encode(np.asarray(x, dtype=np.float32), scale, spec)
    s = per_value(np.asarray(scale, dtype=np.float32), x.shape, spec)
    if spec.float_zero:
        z = per_value(np.asarray(zero_point, dtype=np.float32), x.shape, spec)
        return np.clip(np.rint(x.astype(np.float32) / s + z).astype(np.int64), spec.qmin, spec.qmax)
    z = per_value(np.asarray(zero_point, dtype=np.int64), x.shape, spec)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, spec.qmin, spec.qmax)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale, in float32."""
    s = per_value(np.asarray(scale, dtype=np.float32), q.shape, spec)
    if spec.float_zero:
        z = per_value(np.asarray(zero_point, dtype=np.float32), q.shape, spec)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)
    z = per_value(np.asarray(zero_point, dtype=np.int64), q.shape, spec)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def channel_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of a weight per output channel (or over the whole tensor)."""
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    axis = axis % w.ndim
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1), moved.max(axis=1)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    signal = float(np.sum(np.square(reference, dtype=np.float64)))
    noise = float(np.sum(np.square(reference.astype(np.float64) - approx.astype(np.float64))))
    return _ratio_db(signal, noise)


# Whole-tensor quantization makes temporaries of about nine times a float weight (repeated
# scales, int64 codes); a language model's large weights are done in slices of this many values.
SLICE_VALUES = 1 << 22


def slices(shape: tuple, spec: QuantSpec):
    """(index into a tensor of `shape`, index into its scales and zero points) of slices of about
    SLICE_VALUES values each, cut along an axis the scales can be cut along with them."""
    total = int(np.prod(shape)) if shape else 1
    ndim = len(shape)
    if total <= SLICE_VALUES or ndim == 0 or (spec.block_size is not None and ndim < 2):
        yield (Ellipsis,), (Ellipsis,)
        return
    if spec.axis is None:
        cut, scales_cut = 0, False
    elif spec.block_size is None:
        cut, scales_cut = spec.axis % ndim, True
    else:
        cut, scales_cut = (1 if spec.axis % ndim == 0 else 0), True
    step = max(1, SLICE_VALUES // (total // shape[cut]))
    for start in range(0, shape[cut], step):
        index = [slice(None)] * ndim
        index[cut] = slice(start, start + step)
        per_channel = spec.axis is not None and spec.block_size is None
        yield tuple(index), ((index[cut],) if per_channel else tuple(index)) if scales_cut else (Ellipsis,)


def _part(values: np.ndarray, index: tuple) -> np.ndarray:
    values = np.asarray(values)
    return values if values.ndim == 0 else values[index]


def codes(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec, dtype=np.int64) -> np.ndarray:
    """quantize(), slice by slice into an array of `dtype` (narrow enough for the codes)."""
    if spec.scheme != "int":
        return quantize(x, scale, zero_point, spec).astype(dtype)
    out = np.empty(x.shape, dtype=dtype)
    for index, at in slices(x.shape, spec):
        out[index] = quantize(x[index], _part(scale, at), _part(zero_point, at), spec)
    return out


def grid_sqnr_db(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> float:
    """sqnr_db of `x` against itself quantized and dequantized, slice by slice."""
    if spec.scheme != "int":
        return sqnr_db(x, dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec))
    signal = noise = 0.0
    for index, at in slices(x.shape, spec):
        part, s, z = x[index], _part(scale, at), _part(zero_point, at)
        back = dequantize(quantize(part, s, z, spec), s, z, spec)
        signal += float(np.sum(np.square(part, dtype=np.float64)))
        noise += float(np.sum(np.square(part.astype(np.float64) - back)))
    return _ratio_db(signal, noise)


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
