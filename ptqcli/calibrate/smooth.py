"""SmoothQuant (Xiao et al. 2023): activation outliers moved into the weights of the GEMMs that read them.

A transformer's normalized activations carry a few channels far larger than the rest; on a
per-tensor 8-bit grid they leave the other channels a handful of levels. For an activation X that
GEMMs read as X @ W, X @ W = (X / s) @ (diag(s) W) for any per-channel s > 0: dividing X by s
flattens its channels, and per-output-channel weight scales absorb the rows of W multiplied by s.
With s_k = max|X_k|^alpha / max|W_k|^(1 - alpha), alpha is chosen per activation from a grid by
the calibration loss of the GEMMs it feeds (the relative output error with both sides on their
planned grids); leaving X as it is stays among the choices, so smoothing never makes that loss worse.

The division is folded into the normalization that writes X (its per-channel scale and bias), so
no node is added. Where X has other readers (the residual Add of a post-norm encoder), they keep
the original: the GEMMs read a copy of the normalization with the folded parameters. The smoothed
float model is checked against the original on calibration samples before anything is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from onnx import ModelProto, NodeProto, numpy_helper

from ..config import Granularity, QuantConfig
from ..errors import PtqError
from ..graph import Graph, clone
from ..metrics import relative_error
from ..ops import normalization, op_info
from ..quant import dequantize, quantize, scale_zero_point
from ..runtime import run_session, session, with_outputs
from .data import Batch
from .planner import activation_spec, quantize_weight, weight_spec

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# The smoothed model may differ from the original by float rounding only (relative squared error).
EQUAL_WITHIN = 1e-8


@dataclass(frozen=True)
class SmoothGroup:
    tensor: str  # the normalization's output that the GEMMs read
    norm: str  # the normalization node
    gemms: tuple[str, ...]  # MatMul/Gemm nodes reading `tensor` as their activation
    weights: tuple[str, ...]  # their constant weights, one each
    in_axes: tuple[int, ...]  # each weight's axis over input channels
    shared: bool  # `tensor` has readers besides the GEMMs (or is a graph output)


@dataclass(frozen=True)
class GroupStats:
    absmax: np.ndarray  # per channel, over all calibration samples
    lo: np.ndarray  # per-channel minimum and maximum
    hi: np.ndarray
    rows: np.ndarray  # [R, K]: activation rows of the first samples, for the loss


def _gemm_weight(g: Graph, node, tensor: str) -> tuple[str, int] | None:
    """(weight, input-channel axis) of a MatMul/Gemm that reads `tensor` as its activation and a
    constant 2-D weight nothing else reads."""
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != tensor or len(node.input) < 2:
        return None
    info = op_info(node.op_type, node.domain)
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        return None
    weight = node.input[1]
    w = g.constant(weight) if weight in g.initializers else None
    if w is None or w.ndim != 2 or not g.is_float(weight) or len(g.consumers.get(weight, [])) != 1:
        return None
    return weight, info.weight_in_axis(node) % 2


def smoothing_groups(g: Graph) -> list[SmoothGroup]:
    """Every normalization whose output some GEMMs read directly with constant weights."""
    groups = []
    outputs = set(g.output_names)
    for node in g.graph.node:
        facts = normalization(node)
        if facts is None or not node.output:
            continue
        scale = g.constant(node.input[facts.scale_input]) if len(node.input) > facts.scale_input else None
        has_bias = facts.bias_input is not None and len(node.input) > facts.bias_input and node.input[facts.bias_input]
        bias = g.constant(node.input[facts.bias_input]) if has_bias else None
        if scale is None or scale.ndim != 1 or (has_bias and (bias is None or bias.shape != scale.shape)):
            continue
        tensor = node.output[0]
        readers = g.consumers.get(tensor, [])
        found = [(r.name, *hit) for r in readers if (hit := _gemm_weight(g, r, tensor)) is not None]
        found = [f for f in found if g.constant(f[1]).shape[f[2]] == scale.shape[0]]
        if not found:
            continue
        names, weights, axes = zip(*found)
        groups.append(SmoothGroup(tensor, node.name, names, weights, axes,
                                  shared=len(readers) > len(found) or tensor in outputs))
    return groups


def observe(g: Graph, groups: list[SmoothGroup], batches: Iterable[Batch], row_samples: int,
            advance: Callable[[int], None] = lambda n: None) -> dict[str, GroupStats]:
    """Per-channel extremes of each group's activation over all batches, and the rows of the first
    `row_samples` samples."""
    tensors = [grp.tensor for grp in groups]
    sess = session(with_outputs(g.model, tensors))
    absmax, lo, hi, rows = {}, {}, {}, {t: [] for t in tensors}
    seen = 0
    for batch in batches:
        n = len(next(iter(batch.feeds.values())))
        for name, value in zip(tensors, run_session(sess, tensors, batch.feeds)):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float32)
            absmax[name] = np.maximum(absmax.get(name, 0.0), np.abs(flat).max(axis=0))
            lo[name] = np.minimum(lo.get(name, np.inf), flat.min(axis=0))
            hi[name] = np.maximum(hi.get(name, -np.inf), flat.max(axis=0))
            if seen < row_samples:
                keep = min(n, row_samples - seen)
                rows[name].append(value[:keep].reshape(-1, value.shape[-1]).astype(np.float32))
        seen += n
        advance(n)
    if seen == 0:
        raise PtqError("smoothing saw no calibration samples")
    return {t: GroupStats(absmax[t], lo[t], hi[t], np.concatenate(rows[t])) for t in tensors}


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(x_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1.0 - alpha)
    return s.astype(np.float32)


def _fake_quant_weight(w: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """[K, N] weight on the config's grid, one scale per output column (or per tensor)."""
    spec = weight_spec(cfg, 1 if cfg.granularity is Granularity.channel else None)
    tq = quantize_weight(w, spec, cfg.weight_method.value)
    return dequantize(quantize(w, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)


def group_loss(stats: GroupStats, weights: list[np.ndarray], s: np.ndarray, cfg: QuantConfig) -> float:
    """Summed relative output error of the group's GEMMs with X / s and diag(s) W quantized; the
    activation's per-tensor range is its min-max over all samples, from the per-channel extremes."""
    spec = activation_spec(cfg)
    scale, zp = scale_zero_point(np.asarray((stats.lo / s).min()), np.asarray((stats.hi / s).max()), spec)
    x = stats.rows / s
    xq = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    total = 0.0
    for w in weights:  # [K, N]
        ref = stats.rows @ w
        total += relative_error(ref, xq @ _fake_quant_weight(w * s[:, None], cfg))
    return total


def _as_rows(g: Graph, grp: SmoothGroup) -> list[np.ndarray]:
    """Each weight as [K, N], input channels first."""
    return [np.moveaxis(g.constant(w), axis, 0).astype(np.float32) for w, axis in zip(grp.weights, grp.in_axes)]


def choose(g: Graph, grp: SmoothGroup, stats: GroupStats, cfg: QuantConfig) -> tuple[float | None, dict]:
    """The alpha with the least group loss (None: leave the activation as it is), and the losses."""
    weights = _as_rows(g, grp)
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    losses = {None: group_loss(stats, weights, np.ones_like(stats.absmax), cfg)}
    for alpha in ALPHAS:
        losses[alpha] = group_loss(stats, weights, smoothing_scales(stats.absmax, w_absmax, alpha), cfg)
    best = min(losses, key=lambda a: (losses[a], -1 if a is None else a))
    report = {"alpha": best, "loss": losses[best], "loss_unsmoothed": losses[None], "gemms": list(grp.gemms)}
    return best, report


def fold(model: ModelProto, g: Graph, grp: SmoothGroup, s: np.ndarray) -> None:
    """Divide the normalization's affine parameters by s (in a copy feeding only the GEMMs when
    its output has other readers) and multiply the GEMM weights' input rows by s, in place."""
    graph = model.graph
    nodes = list(graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == grp.norm)
    norm = nodes[index]
    facts = normalization(norm)
    slots = [facts.scale_input]
    if facts.bias_input is not None and len(norm.input) > facts.bias_input and norm.input[facts.bias_input]:
        slots.append(facts.bias_input)
    target = norm
    if grp.shared:
        target = NodeProto()
        target.CopyFrom(norm)
        target.name = f"{norm.name}__smoothed"
        del target.output[:]
        target.output.append(f"{grp.tensor}__smoothed")
        for node in nodes:
            if node.name in grp.gemms:
                node.input[0] = target.output[0]
        nodes.insert(index + 1, target)
        known = next((vi for vi in list(graph.value_info) + list(graph.output) if vi.name == grp.tensor), None)
        if known is not None:  # the copy's output has the original's type and shape
            twin_info = graph.value_info.add()
            twin_info.CopyFrom(known)
            twin_info.name = target.output[0]
    for slot in slots:
        old = g.constant(norm.input[slot])
        name = f"{target.name}__{'scale' if slot == facts.scale_input else 'bias'}_smoothed"
        graph.initializer.append(numpy_helper.from_array((old / s.astype(np.float64)).astype(old.dtype), name))
        target.input[slot] = name
    if grp.shared:
        del graph.node[:]
        graph.node.extend(nodes)
    inits = {t.name: t for t in graph.initializer}
    for weight, axis in zip(grp.weights, grp.in_axes):
        w = g.constant(weight)
        shape = [1, 1]
        shape[axis] = -1
        inits[weight].CopyFrom(numpy_helper.from_array((w * s.reshape(shape).astype(np.float64)).astype(w.dtype), weight))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def smooth(g: Graph, cfg: QuantConfig, batches: list[Batch], stats_batches: Iterable[Batch],
           advance: Callable[[int], None] = lambda n: None) -> tuple[Graph, dict]:
    """The smoothed graph and, per activation, the alpha chosen and the losses it was chosen on.
    `stats_batches` stream the calibration data for the extremes; `batches` (a few) check that the
    smoothed float model equals the original."""
    groups = smoothing_groups(g)
    if not groups:
        return g, {}
    stats = observe(g, groups, stats_batches, cfg.smooth_samples, advance)
    model = clone(g.model)
    report = {}
    for grp in groups:
        alpha, report[grp.tensor] = choose(g, grp, stats[grp.tensor], cfg)
        if alpha is not None:
            w_absmax = np.max([np.abs(w).max(axis=1) for w in _as_rows(g, grp)], axis=0)
            fold(model, g, grp, smoothing_scales(stats[grp.tensor].absmax, w_absmax, alpha))
    if all(r["alpha"] is None for r in report.values()):
        return g, report
    smoothed = Graph(model, g.source, list(g.notes), dict(g.facts))
    check_equal(g, smoothed, batches)
    return smoothed, report


def check_equal(original: Graph, smoothed: Graph, batches: list[Batch]) -> None:
    outputs = [o for o in original.output_names if original.is_float(o)]
    a, b = session(original.model), session(smoothed.model)
    for batch in batches:
        for name, x, y in zip(outputs, run_session(a, outputs, batch.feeds), run_session(b, outputs, batch.feeds)):
            err = relative_error(x, y) / len(x)
            if not err <= EQUAL_WITHIN:
                raise PtqError(f"smoothing changed float output {name} (relative error {err:.2e}); "
                               "pass --no-smooth and report this model")
