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
    """Signal-to-quantization-noise ratio in dB (inf when exact). Past SLICE_VALUES values, summed
    over slices of the first axis: a language model's output projection in float64 at once would
    take hundreds of MB twice over."""
    reference, approx = np.asarray(reference), np.asarray(approx)
    if reference.size <= SLICE_VALUES or reference.ndim == 0 or approx.shape != reference.shape:
        signal = float(np.sum(np.square(reference, dtype=np.float64)))
        noise = float(np.sum(np.square(reference.astype(np.float64) - approx.astype(np.float64))))
        return _ratio_db(signal, noise)
    rows = max(1, SLICE_VALUES // (reference.size // len(reference)))
    signal = noise = 0.0
    for start in range(0, len(reference), rows):
        part = reference[start:start + rows].astype(np.float64)
        signal += float(np.sum(np.square(part)))
        noise += float(np.sum(np.square(part - approx[start:start + rows].astype(np.float64))))
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


# Rounds of refined_block_grid's least-squares refinement: the error stops falling after a few.
REFINE_ROUNDS = 8
# Its robust refinement of float zero points (half-quadratic, as HQQ, Badri & Shaji 2023): an l_p
# loss (p < 1) on the rounding error, which lets a block's few large errors stay large instead of
# pulling its zero point; the shrinkage threshold falls by GROWTH a round, for up to ROBUST_ROUNDS
# rounds while the mean absolute error falls.
ROBUST_P, ROBUST_BETA, ROBUST_GROWTH, ROBUST_ROUNDS = 0.7, 10.0, 1.01, 20


def refined_block_grid(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise scales and zero points (shaped as block_ranges gives them) refined from each
    block's range without data. Float zero points: the range's grid with its zero point rounded to
    an integer, then the zero point alone moved by the robust refinement (ROBUST_*). Integer zero
    points and symmetric grids: codes and grid refined in turn, the codes rounded on the grid, then
    the grid that maps them back to the weights best (a least-squares line per block: its slope the
    scale, its offset the zero point, rounded to an integer and the scale fitted again for it; a
    symmetric grid fits the scale alone), each block keeping the grid of least squared error it
    met. Measured on SmolLM2-135M int4 (perplexity, fp32 21.56): float zeros g32 23.04 -> 23.23,
    g128 38.00 -> 31.48 (least squares there: 22.80 and 36.18); integer zeros g32 29.85 -> 29.20,
    g128 33.60 -> 33.98. Done a slice of columns at a time (a language model's output projection
    at once would take gigabytes of temporaries)."""
    axis = spec.axis % w.ndim
    moved = np.moveaxis(w, axis, 0)
    rows = moved.reshape(moved.shape[0], -1).astype(np.float32, copy=False)
    k, bs = rows.shape[0], spec.block_size
    blocks = -(-k // bs)
    lo, hi = block_ranges(rows, 0, bs)
    scale, zero = scale_zero_point(lo, hi, spec)
    scale, zero = scale.copy(), zero.copy()
    valid = as_blocks(np.ones((k, 1), dtype=np.float32), bs)
    step = max(1, SLICE_VALUES // (blocks * bs))
    refine = _robust_zero if spec.float_zero and not spec.symmetric else _least_squares_grid
    for start in range(0, rows.shape[1], step):
        cols = slice(start, start + step)
        scale[:, cols], zero[:, cols] = refine(as_blocks(rows[:, cols], bs), valid, scale[:, cols], zero[:, cols], spec)
    shape = (blocks, *moved.shape[1:])
    return (np.moveaxis(scale.reshape(shape), 0, axis), np.moveaxis(zero.reshape(shape), 0, axis))


def as_blocks(rows: np.ndarray, block_size: int) -> np.ndarray:
    """A [K, N] weight as [blocks, block_size, N] (a short last block padded with zeros), so that
    each block's scale [blocks, N] broadcasts over its values instead of being repeated to K."""
    pad = -len(rows) % block_size
    return (np.pad(rows, ((0, pad), (0, 0))) if pad else rows).reshape(-1, block_size, rows.shape[1])


def block_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Codes of weights [blocks, block, columns] (as_blocks) on grids [blocks, columns], rounded as
    QuantizeLinear rounds them (float32)."""
    s3, z3 = scale[:, None, :], zero[:, None, :].astype(np.float32)
    q = np.rint(w / s3 + z3) if spec.float_zero else np.rint(w / s3) + z3
    return np.clip(q, spec.qmin, spec.qmax)


def _robust_zero(w: np.ndarray, valid: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Float zero points [blocks, columns] for weights [blocks, block, columns] (`valid`: 1 on real
    rows, 0 on a short last block's padding), the scales kept: see ROBUST_*."""
    count, s3 = valid.sum(axis=1), scale[:, None, :]
    z, beta, least = np.rint(zero).astype(np.float32), ROBUST_BETA, np.inf
    for _ in range(ROBUST_ROUNDS):
        q = block_codes(w, scale, z, spec)
        error = w - (q - z[:, None, :]) * s3
        magnitude = np.abs(error)
        # the l_p proximal step: each error shrunk towards zero, small ones all the way
        kept = np.sign(error) * np.maximum(magnitude - np.power(magnitude + 1e-8, ROBUST_P - 1) / beta, 0)
        z = (np.sum(valid * (q - (w - kept) / s3), axis=1) / count).astype(np.float32)
        beta *= ROBUST_GROWTH
        mean_error = float(np.sum(valid * magnitude))
        if mean_error >= least:
            break
        least = mean_error
    return scale, z


def _least_squares_grid(w: np.ndarray, valid: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Scales and integer zero points (or scales alone, symmetric) [blocks, columns] for weights
    [blocks, block, columns] (`valid` as in _robust_zero): see refined_block_grid."""
    count = valid.sum(axis=1)

    def error(s: np.ndarray, z: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.sum(valid * np.square(w - (q - z[:, None, :].astype(np.float32)) * s[:, None, :]), axis=1)

    best_s, best_z = scale, zero
    q = block_codes(w, scale, zero, spec)
    least = error(scale, zero, q)
    for _ in range(REFINE_ROUNDS):
        if spec.symmetric:
            s_new = np.sum(valid * w * q, axis=1) / np.maximum(np.sum(valid * q * q, axis=1), 1e-30)
            z_new = best_z
        else:
            q_mean, w_mean = np.sum(valid * q, axis=1) / count, np.sum(valid * w, axis=1) / count
            dq = valid * (q - q_mean[:, None, :])
            slope = np.sum(dq * w, axis=1) / np.maximum(np.sum(dq * dq, axis=1), 1e-30)
            slope = np.where(slope > 0, slope, best_s)
            z_new = np.clip(np.rint(q_mean - w_mean / slope), spec.qmin, spec.qmax)
            centred = valid * (q - z_new[:, None, :])
            s_new = np.sum(centred * w, axis=1) / np.maximum(np.sum(centred * centred, axis=1), 1e-30)
        ok = np.isfinite(s_new) & (s_new > _MIN_SCALE) & np.isfinite(z_new)
        s_new = np.where(ok, s_new, best_s).astype(np.float32)
        z_new = np.where(ok, z_new, best_z).astype(best_z.dtype)
        q = block_codes(w, s_new, z_new, spec)
        err = error(s_new, z_new, q)
        better = err < least
        best_s, best_z, least = np.where(better, s_new, best_s), np.where(better, z_new, best_z), np.minimum(err, least)
    return best_s.astype(np.float32), best_z
