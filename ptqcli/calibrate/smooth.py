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
the original through one Mul by s. The smoothed
float model is checked against the original on calibration samples before anything is quantized.

Convolutions get the same treatment (the per-tensor activation problem of depthwise-separable
CNNs, whose channels' ranges differ by orders of magnitude): an activation written by a Mul by a
constant (the end of a hard-swish, x * relu6(x + 3) / 6) and read by Convs (dense or depthwise)
has that constant turned into a per-channel one, and the Convs' weights absorb s along their input
channels. A depthwise Conv's weights are scaled per output channel, which per-channel weight
scales absorb at no cost, so its grid of alphas reaches 1 (every channel's range equalized).

In weight-only plans the same search is activation-aware weight scaling (as in AWQ): X stays float,
and the factors only decide which input channels' weights get the finer grid, judged by the GEMMs'
output error with their weights on the planned (block-wise) grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from ..config import Granularity, QuantConfig
from ..errors import PtqError
from ..graph import Graph
from ..metrics import relative_error
from ..ops import normalization, op_info
from ..plan import RESTORES_SMOOTHED
from ..quant import dequantize, quantize, scale_zero_point
from .data import Batch
from .moments import ChannelMoments
from .segments import run_piecewise
from .planner import activation_spec, quantize_weight, weight_spec

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
CONV_ALPHAS = (*ALPHAS, 0.9, 1.0)
CHANNELS_LAST, CHANNELS_FIRST = -1, 1  # where a group's activation has its channels (GEMM, Conv)
LOSS_COLUMNS = 2048  # output columns per product in the loss
SAMPLED_COLUMNS = 512  # columns per weight in the weight-only loss
# The smoothed model may differ from the original by float rounding only (relative squared error).
EQUAL_WITHIN = 1e-8


@dataclass(frozen=True)
class SmoothGroup:
    tensor: str  # the activation the GEMMs read
    tail: tuple[str, ...]  # the nodes ending in `tensor` whose per-channel parameters absorb 1 / s
    params: tuple[tuple[str, int], ...]  # (node, input slot) of each per-channel scale or bias
    gemms: tuple[str, ...]  # MatMul/Gemm nodes reading `tensor` as their activation
    weights: tuple[str, ...]  # their constant weights, one each
    in_axes: tuple[int, ...]  # each weight's axis over input channels
    shared: bool  # `tensor` has readers besides the GEMMs (or is a graph output)
    channel_axis: int = CHANNELS_LAST  # of `tensor`: CHANNELS_FIRST when Convs read it
    depthwise: tuple[bool, ...] = ()  # per weight, for Convs: one input channel per output channel
    spatial_dims: int = 0  # axes after the channels (a Conv's input: 2 for NCHW)


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


def _conv_weight(g: Graph, node, tensor: str) -> tuple[str, int, bool] | None:
    """(weight, input-channel axis, depthwise) of a dense or depthwise Conv that reads `tensor` as
    its input and a constant weight nothing else reads."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.input[0] != tensor or len(node.input) < 2:
        return None
    weight = node.input[1]
    w = g.constant(weight) if weight in g.initializers else None
    if w is None or w.ndim < 3 or not g.is_float(weight) or len(g.consumers.get(weight, [])) != 1:
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group == 1:
        return weight, 1, False
    if w.shape[1] == 1 and group == w.shape[0]:
        return weight, 0, True
    return None


def _scalar_mul_tail(g: Graph, node) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]] | None:
    """A Mul by a one-element constant: per-channel factors along any axis can replace it."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    slots = [i for i, name in enumerate(node.input) if name in g.initializers and g.is_float(name)
             and g.constant(name).size == 1]
    return ((node.name,), ((node.name, slots[0]),)) if len(slots) == 1 else None


def _conv_group(g: Graph, node) -> SmoothGroup | None:
    """The Convs reading a scalar Mul's output (_scalar_mul_tail), all with the same input channels."""
    tail = _scalar_mul_tail(g, node)
    if tail is None:
        return None
    tensor = node.output[0]
    readers = g.consumers.get(tensor, [])
    found = [(r.name, *hit) for r in readers if (hit := _conv_weight(g, r, tensor)) is not None]
    channels = {g.constant(w).shape[axis] for _, w, axis, _ in found}
    if not found or len(channels) != 1:
        return None
    names, weights, axes, depthwise = zip(*found)
    return SmoothGroup(tensor, *tail, names, weights, axes, len(readers) > len(found) or tensor in g.output_names,
                       CHANNELS_FIRST, depthwise, g.constant(weights[0]).ndim - 2)


def _channel_vector(g: Graph, name: str) -> np.ndarray | None:
    v = g.constant(name) if name in g.initializers else None
    return v if v is not None and v.ndim == 1 and g.is_float(name) else None


def _normalization_tail(g: Graph, node) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...], int] | None:
    """A normalization op: its scale and bias inputs."""
    facts = normalization(node)
    if facts is None or len(node.input) <= facts.scale_input:
        return None
    scale = _channel_vector(g, node.input[facts.scale_input])
    if scale is None:
        return None
    params = [(node.name, facts.scale_input)]
    if facts.bias_input is not None and len(node.input) > facts.bias_input and node.input[facts.bias_input]:
        bias = _channel_vector(g, node.input[facts.bias_input])
        if bias is None or bias.shape != scale.shape:
            return None
        params.append((node.name, facts.bias_input))
    return (node.name,), tuple(params), scale.shape[0]


def _vector_slot(g: Graph, node) -> int | None:
    """The input slot holding a constant per-channel vector of a two-input Mul/Add, if one does."""
    slots = [i for i, name in enumerate(node.input[:2]) if _channel_vector(g, name) is not None]
    return slots[0] if len(node.input) == 2 and len(slots) == 1 else None


def _decomposed_tail(g: Graph, node) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...], int] | None:
    """The end of a decomposed normalization (older exporters): Mul by gamma, then Add of beta,
    or Mul by gamma alone (RMSNorm)."""
    if node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
        slot = _vector_slot(g, node)
        return None if slot is None else ((node.name,), ((node.name, slot),), len(g.constant(node.input[slot])))
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
        return None
    slot = _vector_slot(g, node)
    if slot is None:
        return None
    mul = g.producer.get(node.input[1 - slot])
    if mul is None or mul.op_type != "Mul" or len(g.consumers.get(mul.output[0], [])) != 1:
        return None
    gamma = _vector_slot(g, mul)
    k = len(g.constant(node.input[slot]))
    if gamma is None or len(g.constant(mul.input[gamma])) != k:
        return None
    return (mul.name, node.name), ((mul.name, gamma), (node.name, slot)), k


def smoothing_groups(g: Graph, convs: bool = False) -> list[SmoothGroup]:
    """Every per-channel affine tail (a normalization's scale and bias, fused or decomposed) whose
    output some GEMMs read directly with constant weights, and with `convs` every scalar Mul whose
    output Convs read (_conv_group)."""
    groups = []
    outputs = set(g.output_names)
    for node in g.graph.node:
        if not node.output:
            continue
        tail = _normalization_tail(g, node) or _decomposed_tail(g, node)
        if convs and (tail is None or tail[2] == 1):
            conv = _conv_group(g, node)
            if conv is not None:
                groups.append(conv)
                continue
        if tail is None:
            continue
        nodes, params, channels = tail
        tensor = node.output[0]
        readers = g.consumers.get(tensor, [])
        found = [(r.name, *hit) for r in readers if (hit := _gemm_weight(g, r, tensor)) is not None]
        found = [f for f in found if g.constant(f[1]).shape[f[2]] == channels]
        if not found:
            continue
        names, weights, axes = zip(*found)
        groups.append(SmoothGroup(tensor, nodes, params, names, weights, axes,
                                  shared=len(readers) > len(found) or tensor in outputs))
    return groups


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(x_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1.0 - alpha)
    return s.astype(np.float32)


def _fake_quant_weight(w: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """[K, N] weight on the config's grid: one scale per output column, per tensor, or per block of
    input channels."""
    if cfg.block_size is not None and w.shape[0] >= cfg.block_size:
        spec = weight_spec(cfg, 0, block_size=cfg.block_size)
    else:
        spec = weight_spec(cfg, 1 if cfg.granularity is Granularity.channel else None)
    tq = quantize_weight(w, spec, cfg.weight_method.value)
    return dequantize(quantize(w, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)


def group_loss(stats: ChannelMoments, weights: list[np.ndarray], s: np.ndarray, cfg: QuantConfig,
               per_row: bool = True, depthwise: tuple[bool, ...] = ()) -> float:
    """Summed relative output error of the group's GEMMs with X / s and diag(s) W quantized; the
    activation's per-tensor range is its min-max over all samples, from the per-channel extremes.
    Weight-only plans (`acts none`) leave X in float: the factors then only decide which input
    channels' weights get the finer grid, as activation-aware weight quantization (AWQ) does; with
    X's Gram matrix at hand `choose` measures that error as a quadratic form instead (`_gram_loss`:
    over every sample, and cheaper than the products when there are more rows than channels).
    `per_row` off: one relative error over all rows (a CNN's pixels, many of them near zero,
    whose relative errors would swamp the rest). A `depthwise` weight [C, taps] multiplies each
    channel by its own taps (its grid one scale per channel)."""
    x = stats.rows / s
    xq = x
    if cfg.acts.value != "none":
        spec = activation_spec(cfg)
        scale, zp = scale_zero_point(np.asarray((stats.lo / s).min()), np.asarray((stats.hi / s).max()), spec)
        xq = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    total = 0.0
    for w, alone in zip(weights, depthwise or (False,) * len(weights)):  # [K, N]
        if alone:
            wq = _fake_quant_weight((w * s[:, None]).T, cfg).T
            ref = stats.rows[:, :, None] * w[None]
            err = np.sum(np.square(ref - xq[:, :, None] * wq[None], dtype=np.float64), axis=(1, 2))
            power = np.sum(np.square(ref, dtype=np.float64), axis=(1, 2))
            total += _relative(err, power, per_row)
            continue
        # Per row, squared error over signal power, summed over column chunks: a language model's
        # head ([K, 49152]) would otherwise need gigabytes for one product.
        err = np.zeros(len(x))
        power = np.zeros(len(x))
        for lo in range(0, w.shape[1], LOSS_COLUMNS):
            part = w[:, lo:lo + LOSS_COLUMNS]
            ref = stats.rows @ part
            err += np.sum(np.square(ref - xq @ _fake_quant_weight(part * s[:, None], cfg), dtype=np.float64), axis=1)
            power += np.sum(np.square(ref, dtype=np.float64), axis=1)
        total += _relative(err, power, per_row)
    return total


def _relative(err: np.ndarray, power: np.ndarray, per_row: bool) -> float:
    """Squared error over signal power: summed row by row, or over all rows at once."""
    return float(np.sum(err / np.maximum(power, 1e-30)) if per_row else err.sum() / max(power.sum(), 1e-30))


def _gram_loss(gram: np.ndarray, w: np.ndarray, s: np.ndarray, cfg: QuantConfig, power: float) -> float:
    """||X W - (X / s) Q(diag(s) W)||^2 / ||X W||^2 as tr(D^T G D) / power, D the weight error seen
    from X, over column chunks of W."""
    err = 0.0
    for lo in range(0, w.shape[1], LOSS_COLUMNS):
        part = w[:, lo:lo + LOSS_COLUMNS]
        diff = part - _fake_quant_weight(part * s[:, None], cfg) / s[:, None]
        err += float(np.sum(diff * (gram @ diff), dtype=np.float64))
    return err / max(power, 1e-30)


def signal_powers(stats: ChannelMoments, weights: list[np.ndarray]) -> list[float]:
    """||X W||^2 = tr(W^T G W) of each weight."""
    return [float(np.sum(w * (stats.gram @ w), dtype=np.float64)) for w in weights]


def loss_columns(w: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """The columns of a [K, N] weight the weight-only loss is measured on: an evenly strided
    SAMPLED_COLUMNS of them when every column has its own grid (per-channel or block-wise scales),
    so that the sample estimates the loss without bias; all of them for one scale per tensor."""
    own_grid = cfg.block_size is not None or cfg.granularity is Granularity.channel
    step = -(-w.shape[1] // SAMPLED_COLUMNS) if own_grid else 1
    return w[:, ::step]


def _as_rows(g: Graph, grp: SmoothGroup) -> list[np.ndarray]:
    """Each weight as [K, N], input channels first. A Conv's taps count as columns (the loss then
    treats each tap's product on its own); a depthwise Conv's are [C, taps], each input channel
    reaching only its own output channel (group_loss knows them by grp.depthwise)."""
    return [np.moveaxis(k, axis, 0).reshape(k.shape[axis], -1).astype(np.float32)
            for k, axis in ((g.constant(w), axis) for w, axis in zip(grp.weights, grp.in_axes))]


def _weight_absmax(weights: list[np.ndarray]) -> np.ndarray:
    """Per input channel, the largest magnitude over the group's [K, N] weights."""
    return np.max([np.abs(w).max(axis=1) for w in weights], axis=0)


def factors(g: Graph, grp: SmoothGroup, stats: ChannelMoments, cfg: QuantConfig) -> tuple[np.ndarray | None, dict]:
    """The group's smoothing factors s (None: leave it as it is) at the alpha `choose` picks, and its report."""
    alpha, report = choose(g, grp, stats, cfg)
    if alpha is None:
        return None, report
    return smoothing_scales(stats.absmax, _weight_absmax(_as_rows(g, grp)), alpha), report


def choose(g: Graph, grp: SmoothGroup, stats: ChannelMoments, cfg: QuantConfig) -> tuple[float | None, dict]:
    """The alpha with the least group loss (None: leave the activation as it is), and the losses."""
    weights = _as_rows(g, grp)
    w_absmax = _weight_absmax(weights)
    if cfg.acts.value == "none" and stats.gram is not None:
        # Weight-only: the loss is a quadratic form per column, measured on a sample of columns
        # (a language model's head has 49,152) with each weight's signal power computed once.
        sampled = [loss_columns(w, cfg) for w in weights]
        powers = signal_powers(stats, sampled)

        def loss(s: np.ndarray) -> float:
            return sum(_gram_loss(stats.gram, w, s, cfg, p) for w, p in zip(sampled, powers))
    else:
        def loss(s: np.ndarray) -> float:
            return group_loss(stats, weights, s, cfg, grp.channel_axis == CHANNELS_LAST, grp.depthwise)
    losses = {None: loss(np.ones_like(stats.absmax))}
    for alpha in CONV_ALPHAS if grp.channel_axis == CHANNELS_FIRST else ALPHAS:
        losses[alpha] = loss(smoothing_scales(stats.absmax, w_absmax, alpha))
    best = min(losses, key=lambda a: (losses[a], -1 if a is None else a))
    report = {"alpha": best, "loss": losses[best], "loss_unsmoothed": losses[None], "gemms": list(grp.gemms)}
    if grp.channel_axis == CHANNELS_FIRST:
        report["tail"] = list(grp.tail)
    if grp.shared:
        report["restore"] = restore_node(grp.tensor)
    return best, report


TAIL_REASON = "applies the smoothing factors of the Conv input it writes: in float, so that no grid sees its channels before"


def float_tails(report: dict) -> dict[str, str]:
    """{node: why} of the nodes that must run in float: a Conv group's scalar Mul turned per-channel
    (its input has the uneven channels the factors even out, and an integer Mul would quantize it),
    and the Muls that give a smoothed activation's other readers the original back, from its float value."""
    smoothed = [entry for entry in report.values() if entry["alpha"] is not None]
    return {**{node: TAIL_REASON for entry in smoothed for node in entry.get("tail", ())},
            **{entry["restore"]: RESTORES_SMOOTHED for entry in smoothed if "restore" in entry}}


def restore_node(tensor: str) -> str:
    """The name of the Mul that writes `tensor` again from its smoothed version."""
    return f"{tensor}__unsmoothed"


def fold(model: ModelProto, g: Graph, grp: SmoothGroup, s: np.ndarray) -> None:
    """Divide the tail's per-channel parameters by s and multiply the GEMM weights' input rows by s,
    in place (see fold_tail)."""
    fold_tail(model, g, grp, s)
    inits = {t.name: t for t in model.graph.initializer}
    for weight, axis in zip(grp.weights, grp.in_axes):
        w = g.constant(weight)
        shape = [1] * w.ndim
        shape[axis] = -1
        inits[weight].CopyFrom(numpy_helper.from_array((w * s.reshape(shape).astype(np.float64)).astype(w.dtype), weight))


def fold_tail(model: ModelProto, g: Graph, grp: SmoothGroup, s: np.ndarray) -> None:
    """Divide the tail's per-channel parameters by s, in place (`model` holds them as initializers;
    `g` is the graph before smoothing). When the tail's output has other readers, the GEMMs read the
    smoothed tensor under a new name and one Mul by s gives the others the original back: cheaper
    than a second copy of the normalization, and the residual Add it feeds still fuses with the
    next one."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    if grp.shared:
        smoothed = f"{grp.tensor}__smoothed"
        nodes = list(graph.node)
        last = max(i for i, n in enumerate(nodes) if n.name in grp.tail)
        for node in nodes:
            if node.name in grp.gemms:
                node.input[0] = smoothed
            if node.name == grp.tail[-1]:
                node.output[0] = smoothed
        factor = f"{grp.tensor}__smoothing_factor"
        graph.initializer.append(numpy_helper.from_array(_along_channels(s, grp).astype(np.float32), factor))
        restore = helper.make_node("Mul", [smoothed, factor], [grp.tensor], name=restore_node(grp.tensor))
        nodes.insert(last + 1, restore)
        _copy_value_info(graph, grp.tensor, smoothed)
        del graph.node[:]
        graph.node.extend(nodes)
    for name, slot in grp.params:
        source = g.node_by_name[name].input[slot]
        old = g.constant(source)
        scaled = (old / _along_channels(s.astype(np.float64), grp)).astype(old.dtype)
        if len(g.consumers.get(source, [])) == 1:
            # Rewritten in place: rebuilding the initializer list would copy every weight of the model.
            inits[source].CopyFrom(numpy_helper.from_array(scaled, source))
            continue
        new_name = f"{name}__{slot}_smoothed"
        graph.initializer.append(numpy_helper.from_array(scaled, new_name))
        next(n for n in graph.node if n.name == name).input[slot] = new_name


def _along_channels(s: np.ndarray, grp: SmoothGroup) -> np.ndarray:
    """Factors shaped to broadcast along the group tensor's channel axis: [C] for channels last,
    [C, 1, ..., 1] for a Conv's input (the tensor's rank from its weights)."""
    if grp.channel_axis == CHANNELS_LAST:
        return s
    return s.reshape(-1, *([1] * grp.spatial_dims))


def _copy_value_info(graph, tensor: str, copy: str) -> None:
    """The copy's output has the original's type and shape."""
    known = next((vi for vi in list(graph.value_info) + list(graph.output) if vi.name == tensor), None)
    if known is not None:
        info = graph.value_info.add()
        info.CopyFrom(known)
        info.name = copy


def smooth(g: Graph, cfg: QuantConfig, batches: list[Batch], moments: dict[str, ChannelMoments]
           ) -> tuple[Graph, dict]:
    """The smoothed graph (`g`'s model, changed in place: do not use `g` afterwards), and per
    activation the alpha chosen and the losses it was chosen on (Conv groups with cfg.smooth_convs). `moments` are each group tensor's (see `moments_wanted`); `batches` (a few) check
    that the smoothed float model equals the original."""
    groups = smoothing_groups(g, cfg.smooth_convs)
    if not groups:
        return g, {}
    groups = [grp for grp in groups if grp.tensor in moments]
    if not groups:
        return g, {}
    report, chosen = {}, {}
    for grp in groups:
        s, report[grp.tensor] = factors(g, grp, moments[grp.tensor], cfg)
        if s is not None:
            chosen[grp.tensor] = s
    return (folded(g, groups, chosen, batches) if chosen else g), report


def folded(g: Graph, groups: list[SmoothGroup], chosen: dict[str, np.ndarray], batches: list[Batch]) -> Graph:
    """The graph with each group's factors (by tensor) folded in, checked against the original on a
    few samples of `batches`. The original's outputs are taken first; then the factors are folded
    into `g`'s model itself (no copy: a language model's weights twice over would be the run's peak
    memory), so `g` is spent: its caches describe the model before smoothing."""
    cuts = [grp.tensor for grp in groups]  # both graphs compute them
    feeds, references = reference_outputs(g, batches, cuts)
    model = g.model
    for grp in groups:
        if grp.tensor in chosen:
            fold(model, g, grp, chosen[grp.tensor])
    smoothed = Graph(model, g.source, list(g.notes), dict(g.facts))
    check_equal(smoothed, feeds, references, cuts)
    return smoothed


def moments_wanted(g: Graph, cfg: QuantConfig) -> tuple[list[str], set[str], set[str], dict[str, int]]:
    """The group tensors smoothing reads moments of, those it needs Gram matrices of (weight-only
    plans), those it needs sample rows of (plans that quantize activations), and the channel axis
    of those whose channels are not last. Weight-only plans leave Conv inputs alone: only a
    quantized activation gains from flatter channels."""
    weight_only = cfg.acts.value == "none"
    groups = smoothing_groups(g, cfg.smooth_convs and not weight_only)
    tensors = [grp.tensor for grp in groups]
    axes = {grp.tensor: grp.channel_axis for grp in groups if grp.channel_axis != CHANNELS_LAST}
    return tensors, set(tensors) if weight_only else set(), set() if weight_only else set(tensors), axes


def reference_outputs(original: Graph, batches: list[Batch], cuts: list[str], samples: int = 4
                      ) -> tuple[list[dict], list[list]]:
    """The feeds of a few samples, one at a time, and the original model's float outputs on them,
    computed piece by piece (cut at `cuts`, see segments.run_piecewise)."""
    outputs = [o for o in original.output_names if original.is_float(o)]
    feeds = [b.rows(i, i + 1).feeds for b in batches for i in range(b.size)][:samples]
    return feeds, run_piecewise(original, feeds, outputs, cuts)


def check_equal(smoothed: Graph, feeds: list[dict], references: list[list], cuts: list[str]) -> None:
    """The smoothed model's float outputs against the original's (`reference_outputs`), one sample
    at a time (a language model's logits for a batch would cost gigabytes), piece by piece."""
    outputs = [o for o in smoothed.output_names if smoothed.is_float(o)]
    for reference, got in zip(references, run_piecewise(smoothed, feeds, outputs, cuts)):
        for name, x, y in zip(outputs, reference, got):
            err = relative_error(x, y) / len(x)
            if not err <= EQUAL_WITHIN:
                raise PtqError(f"smoothing changed float output {name} (relative error {err:.2e}); "
                               "pass --no-smooth and report this model")
