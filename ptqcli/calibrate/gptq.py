"""GPTQ (Frantar et al. 2022): weight rounding that compensates each rounding error on the inputs
not yet rounded, weighted by the layer's input second moments.

For a layer y = x W (W [K, N]) the loss ||x W - x Q||^2 over the calibration inputs is a quadratic
form in H = X^T X (K x K). Input channels are rounded one at a time; the error of channel k,
divided by the k-th diagonal of the upper Cholesky factor U of H^-1, is spread over the channels
after it through U's k-th row. Updates are applied lazily in blocks of columns (the same result,
fewer passes over W). H is dampened by a fraction of its mean diagonal so that it inverts; dead
inputs (zero diagonal) get weights of zero. With `act_order` the channels go in order of
decreasing H diagonal, and block-wise scales are then fitted before rounding (static groups).
Otherwise each block's scale is fitted when the pass reaches it, on the weights as updated so far.

Everything is numpy (H factored in float64, weights updated in float32); memory is the layer's
weight and H.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..formats import QuantSpec
from ..plan import TensorQuant
from ..quant import as_blocks, block_codes, block_ranges, channel_ranges, dequantize, quantize, scale_zero_point, sqnr_db


@dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01  # fraction of the mean diagonal of H added to it
    columns: int = 128  # lazy-update width (rounded up to a multiple of the block size)
    act_order: bool = True
    # Each scale group's range shrunk where that lowers its H-weighted rounding error (_scales).
    clip_search: bool = True


# Fractions of each scale group's range tried for its grid, the whole range first: clipping a
# block's few largest weights can lower the error of all the others.
CLIP_SHRINKS = np.linspace(1.0, 0.75, 11)
SEARCH_VALUES = 1 << 21  # weights searched at once (an output projection's [576, 49152] is 14 such runs)


def _scales(w_kn: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of a [K, N] weight (or a slice of it) on the spec's grid: each group's
    whole range, or with `importance` [K] (H's diagonal: how much an error on each input costs) the
    shrink of it (CLIP_SHRINKS) with the least importance-weighted squared rounding error."""
    columns = max(1, SEARCH_VALUES // len(w_kn))
    if importance is not None and w_kn.shape[1] > columns:  # output columns apart: bounded temporaries
        parts = [_scales(w_kn[:, c:c + columns], spec, importance) for c in range(0, w_kn.shape[1], columns)]
        return tuple(np.concatenate([part[i] for part in parts], axis=-1) for i in range(2))
    lo, hi = block_ranges(w_kn, 0, spec.block_size) if spec.block_size else channel_ranges(w_kn, spec.axis)
    best = scale_zero_point(lo, hi, spec)
    if importance is None:
        return best
    importance = importance.astype(np.float32)
    least = _group_errors(w_kn, *best, spec, importance)
    for shrink in CLIP_SHRINKS[1:]:
        scale, zero = scale_zero_point(lo * shrink, hi * shrink, spec)
        errors = _group_errors(w_kn, scale, zero, spec, importance)
        better = errors < least
        best = (np.where(better, scale, best[0]), np.where(better, zero, best[1]))
        least = np.where(better, errors, least)
    return best


def _group_errors(w_kn: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec,
                  importance: np.ndarray) -> np.ndarray:
    """Per scale group (shaped like `scale`), the importance-weighted squared rounding error."""
    if not spec.block_size:
        weighted = importance[:, None] * np.square(w_kn - dequantize(quantize(w_kn, scale, zero, spec), scale, zero, spec))
        return weighted.sum(axis=0).reshape(np.shape(scale))
    # In float32, the values QuantizeLinear and DequantizeLinear give.
    blocks = as_blocks(w_kn, spec.block_size)
    s, z = np.asarray(scale, dtype=np.float32), np.asarray(zero, dtype=np.float32)
    error = blocks - (block_codes(blocks, s, z, spec) - z[:, None, :]) * s[:, None, :]
    weights = as_blocks(importance[:, None], spec.block_size)
    return (weights * np.square(error, out=error)).sum(axis=1)


def _round_row(row: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """One input channel (all N outputs) quantized and dequantized with per-output scales, as
    QuantizeLinear and DequantizeLinear compute it (float32 division, round half to even); inlined
    because it runs once per input channel."""
    q = np.clip(np.rint(row / scale + zero) if spec.float_zero else np.rint(row / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).astype(np.float32, copy=False)


def upper_factor_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U, without forming H^-1: with J the order reversal and
    J H J = L L^T, U = J L^-1 J. One Cholesky factorization and one triangular inverse cost a third
    of an explicit inverse followed by a Cholesky factorization of it (0.1 s against 0.3 s at K=1536)."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix, by halves: [[A, 0], [B, C]]^-1 is
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], so all but the smallest blocks' work is matrix products."""
    n = lower.shape[0]
    if n <= 128:
        return np.linalg.inv(lower)
    half = n // 2
    top, bottom = _lower_inverse(lower[:half, :half]), _lower_inverse(lower[half:, half:])
    out = np.zeros_like(lower)
    out[:half, :half], out[half:, half:] = top, bottom
    out[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return out


def gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec, cfg: GptqConfig = GptqConfig()) -> TensorQuant:
    """W [K, N] rounded onto `spec` (block-wise along K, spec.axis == 0, or per output channel,
    spec.axis == 1) against H [K, K]; the result carries the rounded weights as its value.

    The weights are updated in float32, one contiguous row of N per input channel (the update
    streams through memory)."""
    k, n = w.shape
    bs = spec.block_size
    if bs is None and spec.axis != 1:
        raise ValueError("GPTQ rounds [K, N] weights with block-wise (axis 0) or per-output-channel (axis 1) scales")
    work = np.array(w, dtype=np.float32, copy=True)
    hess = np.array(h, dtype=np.float64, copy=True)
    dead = np.diag(hess) == 0
    hess[dead, dead] = 1.0
    work[dead] = 0.0
    order = np.argsort(-np.diag(hess), kind="stable") if cfg.act_order else np.arange(k)
    weights = np.diag(h).astype(np.float64) * ~dead if cfg.clip_search else None
    static = _scales(work, spec, weights) if (cfg.act_order or bs is None) else None
    importance = None if weights is None else weights[order]
    work, hess = work[order], hess[np.ix_(order, order)]
    hess[np.diag_indices(k)] += cfg.damp * np.mean(np.diag(hess))
    # Factored in float64, applied in float32 as the weights are (mixed products would run in float64).
    factor = upper_factor_of_inverse(hess).astype(np.float32)
    width = cfg.columns if bs is None else -(-cfg.columns // bs) * bs
    rounded = np.zeros_like(work)
    scale = np.zeros((-(-k // bs), n) if bs else (n,), dtype=np.float32) if static is None else static[0]
    zero = np.zeros(scale.shape, dtype=np.float32 if spec.float_zero else np.int64) if static is None else static[1]
    zero_f = zero.astype(np.float32)
    for start in range(0, k, width):
        stop = min(start + width, k)
        block = work[start:stop]  # a view: rows past the current one are updated in place
        errors = np.zeros_like(block)
        for i in range(stop - start):
            row = start + i
            original = order[row]
            if static is None and row % bs == 0:  # a new group: fit its scale on the updated weights
                s, z = _scales(block[i:i + bs], spec, None if importance is None else importance[row:row + bs])
                scale[row // bs], zero[row // bs], zero_f[row // bs] = s[0], z[0], z[0]
            s_row = scale if bs is None else scale[original // bs]
            z_row = zero_f if bs is None else zero_f[original // bs]
            q = _round_row(block[i], s_row, z_row, spec)
            rounded[row] = q
            err = (block[i] - q) / factor[row, row]
            block[i + 1:] -= np.outer(factor[row, row + 1:stop], err)
            errors[i] = err
        work[stop:] -= factor[start:stop, stop:].T @ errors
    value = np.empty_like(rounded)
    value[order] = rounded  # [K, N], on the grid
    return TensorQuant("weight", spec, scale.astype(np.float32), zero, {"method": "gptq", "damp": cfg.damp,
                                                                       "act_order": cfg.act_order}, value=value)


def layer_error(x: np.ndarray, w: np.ndarray, w_rounded: np.ndarray) -> float:
    """Relative output error ||x W - x Q||^2 / ||x W||^2 on inputs x [R, K]."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    return float(np.sum((ref - x.astype(np.float64) @ w_rounded.astype(np.float64)) ** 2) / max(np.sum(ref**2), 1e-30))


# ---- over a model's layers --------------------------------------------------------------------

def eligible(g, plan) -> list:
    """The plan's 2-D MatMul/Gemm layers on uniform integer grids (the ones GPTQ rounds)."""
    from ..ops import op_info

    found = []
    for layer in plan.layers:
        tq, w = plan.tensors.get(layer.weight), g.constant(layer.weight)
        node = g.node_by_name[layer.node]
        if (tq is None or w is None or w.ndim != 2 or tq.spec.scheme != "int" or layer.op_type not in ("MatMul", "Gemm")
                or not layer.activation or tq.spec.axis is None):
            continue
        if layer.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        found.append((layer, op_info(layer.op_type).weight_in_axis(node) % 2))
    return found


def round_layers(weights: list[np.ndarray], in_axes: list[int], tqs: list[TensorQuant], h: np.ndarray,
                 cfg: GptqConfig) -> list[TensorQuant]:
    """Layers that read the same input (a transformer's q/k/v, gate/up) rounded by GPTQ with the plan's
    grids against their shared H. Layers on the same grid go through one pass side by side, their
    output columns concatenated: a column's rounding reads only H and its own values, so each gets
    what it would alone, for one factorization of H and one walk over K instead of one per layer."""
    out: list[TensorQuant | None] = [None] * len(weights)
    by_spec: dict = {}
    for i, tq in enumerate(tqs):
        by_spec.setdefault(tq.spec, []).append(i)
    for spec, members in by_spec.items():
        kn = [weights[i] if in_axes[i] == 0 else weights[i].T for i in members]
        # In [K, N] layout blocks run along axis 0 and output channels along axis 1.
        rounded = gptq(np.concatenate(kn, axis=1), h, replace(spec, axis=0 if spec.block_size else 1), cfg)
        edges = np.cumsum([0] + [w.shape[1] for w in kn])
        for i, lo, hi, w in zip(members, edges[:-1], edges[1:], kn):
            part = replace(rounded, scale=rounded.scale[..., lo:hi], zero_point=rounded.zero_point[..., lo:hi],
                           value=rounded.value[:, lo:hi],
                           source={**rounded.source, "sqnr_db": _finite(sqnr_db(w, rounded.value[:, lo:hi]))})
            out[i] = _in_layout(part, in_axes[i], tqs[i])
    return out


def _finite(db: float) -> float | None:
    return float(db) if np.isfinite(db) else None


def round_layer(w: np.ndarray, in_axis: int, tq: TensorQuant, h: np.ndarray, cfg: GptqConfig) -> TensorQuant:
    """One layer's weight (in its own layout) rounded by GPTQ with the plan's grid."""
    return round_layers([w], [in_axis], [tq], h, cfg)[0]


def _in_layout(out: TensorQuant, in_axis: int, tq: TensorQuant) -> TensorQuant:
    """A [K, N] GPTQ result in the layer's own weight layout and spec."""
    spec = tq.spec
    # "learned": what later stages keep (allocation, masks) and the card calls this layer's rounding
    source = {**tq.source, **out.source, "rounding": "learned"}
    if in_axis == 0:
        return TensorQuant("weight", spec, np.ascontiguousarray(out.scale), np.ascontiguousarray(out.zero_point),
                           source, value=np.ascontiguousarray(out.value))
    scale = out.scale.T if spec.block_size else out.scale
    zero = out.zero_point.T if spec.block_size else out.zero_point
    return TensorQuant("weight", spec, np.ascontiguousarray(scale), np.ascontiguousarray(zero), source,
                       value=np.ascontiguousarray(out.value.T))


@dataclass(frozen=True)
class Rounded:
    """One step of `walk`: the layers reading `tensor`, rounded, and the smoothing factors their
    weights were multiplied by before rounding (None: not smoothed)."""

    tensor: str
    layers: list  # (layer, in_axis) pairs
    tqs: list[TensorQuant]
    factors: np.ndarray | None
    smoothing: dict | None  # the smoothing choice's report, for groups that were offered one

    def shaped_factors(self) -> list[np.ndarray] | None:
        """The smoothing factors shaped to multiply each layer's weight along its input channels."""
        return None if self.factors is None else _shaped(self.factors, self.layers)

    def computed(self) -> list[np.ndarray]:
        """Each layer's rounded weight as the model before smoothing computes with it: Q, or for
        a smoothed layer diag(s)^-1 Q (the walk runs the graph as it was)."""
        shaped = self.shaped_factors()
        return [tq.value if shaped is None else tq.value / shaped[i] for i, tq in enumerate(self.tqs)]


def _shaped(s: np.ndarray, layers: list) -> list[np.ndarray]:
    return [s.reshape((-1, 1) if axis == 0 else (1, -1)) for _, axis in layers]


def walk(g, prefix, readers: dict[str, list], states, grids, current, groups: dict, quant, cfg: GptqConfig,
         advance=lambda n: None):
    """GPTQ over `readers` (tensor -> the (layer, in_axis) pairs reading it) in graph order, each group's
    Hessian taken from what the prefix graph computes for its tensor over the batch `states` (see
    segments.moments_in_order; `current(weight)` gives the values each later segment is built with,
    so the caller decides what the quantized prefix holds). `grids(layers)` gives each layer's
    TensorQuant whose spec GPTQ rounds onto. A tensor in `groups` (tensor -> smooth.SmoothGroup) has
    its smoothing factors chosen on those same moments first; its weights are then rounded as
    diag(s) W against H / (s s^T). Yields a `Rounded` per tensor, before the walk goes on."""
    from .segments import moments_in_order
    from .smooth import factors

    for tensor, moments in moments_in_order(prefix, readers, states, current, advance):
        layers = readers[tensor]
        weights, hessian = [g.constant(layer.weight) for layer, _ in layers], moments.gram
        s = report = None
        if tensor in groups:
            s, report = factors(g, groups[tensor], moments, quant)
            if s is not None:
                hessian = hessian / np.outer(s, s)
                weights = [w * f for w, f in zip(weights, _shaped(s, layers))]
        rounded = round_layers(weights, [axis for _, axis in layers], grids(layers), hessian, cfg)
        yield Rounded(tensor, layers, rounded, s, report)


def smoothing_groups_rounded(groups: list, readers: dict[str, list]) -> dict:
    """{tensor: group} of the smoothing groups whose every GEMM the walk rounds (`readers`: tensor ->
    its (layer, in_axis) pairs): another's weight would be scaled under a grid fitted before."""
    return {grp.tensor: grp for grp in groups
            if set(grp.weights) <= {layer.weight for layer, _ in readers.get(grp.tensor, [])}}
