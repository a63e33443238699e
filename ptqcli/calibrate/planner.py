"""From graph + statistics + config to a Plan: scales and zero points for every quantized tensor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import formats
from ..config import QuantConfig, to_jsonable
from ..formats import QuantSpec, format_block_size, parse_weight_format
from ..errors import PtqError
from ..geometry import native_unsupported
from ..graph import Graph
from ..ops import channel_axis, op_info, preserves_scale
from ..plan import Layer, Plan, TensorQuant
from ..quant import (block_ranges, channel_ranges, dequantize, grid_sqnr_db, quantize, refined_block_grid,
                     scale_zero_point, sqnr_db)
from .bias_correction import output_shift, prefix_shift
from .collect import Stats
from .observers import choose_range
from .select import Selection, transposed_twin


def weight_spec(cfg: QuantConfig, axis: int | None, bits: int | None = None, scheme: str | None = None,
                block_size: int | None = None) -> QuantSpec:
    """The config's weight format, or the given one; `bits` alone means uniform integers. With
    `block_size`, `axis` is the axis the blocks run along (the input channels)."""
    if bits is None and scheme is None:
        scheme, bits = cfg.weight_scheme, cfg.weight_bits
    scheme = scheme or "int"
    # Only 8-bit integer weights meet ORT's u8s8 kernels; narrower ones run through DequantizeLinear.
    reduce = cfg.resolved_reduce_range() and bits == 8 and scheme == "int" and block_size is None
    symmetric = cfg.weight_symmetric or scheme != "int"
    return QuantSpec(bits=bits, signed=True, symmetric=symmetric, axis=axis, reduce_range=reduce, scheme=scheme,
                     block_size=block_size,
                     # ORT's CPU MatMulNBits takes float zero points below 8 bits only
                     float_zero=cfg.float_zero_points and not symmetric and block_size is not None and bits < 8)


def weight_axis(node, w: np.ndarray, cfg: QuantConfig, block_size: int | None = None) -> tuple[int | None, int | None]:
    """(axis, block size) of a layer's weight scales: blocks along the input channels of a 2-D
    MatMul/Gemm weight when the format (`block_size`) or else the config asks for them, else per
    output channel (or per tensor)."""
    block_size = block_size or cfg.block_size
    if block_size is not None and node.op_type in ("MatMul", "Gemm") and w.ndim == 2:
        k_axis = op_info(node.op_type).weight_in_axis(node) % 2
        if w.shape[k_axis] < block_size:
            raise PtqError(f"block size {block_size} is larger than K={w.shape[k_axis]} of layer {node.name}")
        return k_axis, block_size
    return (channel_axis(node) % w.ndim if cfg.granularity.value == "channel" else None), None


def activation_spec(cfg: QuantConfig, bits: int | None = None) -> QuantSpec:
    """The config's static activation grid (`bits` overrides its width: mixed plans); dynamic
    activations are quantized by DynamicQuantizeLinear onto the same uint8 grid at run time."""
    signed = cfg.acts.value in ("int8", "int16")
    return QuantSpec(bits=bits or cfg.act_bits, signed=signed, symmetric=cfg.act_symmetric and signed)


CLIP_RATIOS = np.linspace(0.2, 1.0, 81)


def quantize_weight(w: np.ndarray, spec: QuantSpec, method: str = "minmax") -> TensorQuant:
    """`mse` clips each channel's grid to the least squared weight error. It lowers weight error
    at 4 bits and below, but the clipping shrinks outputs, which can cost top-1 without bias
    correction, so minmax stays the default. Level-set schemes always fit their scales (and
    exp its base) to the least squared error."""
    if spec.scheme != "int":
        fitted, scale = formats.fit(w, spec)
        zp = np.zeros(np.shape(scale), dtype=np.int64)
        damage = sqnr_db(w, dequantize(quantize(w, scale, zp, fitted), scale, zp, fitted))
        return TensorQuant("weight", fitted, scale, zp, {"method": "mse-fit", "sqnr_db": _finite(damage)})
    if method == "mse" and spec.block_size:
        scale, zp = refined_block_grid(w, spec)
    else:
        lo, hi = block_ranges(w, spec.axis, spec.block_size) if spec.block_size else channel_ranges(w, spec.axis)
        if method == "mse":
            ratio = clip_ratio(w, spec)
            lo, hi = lo * ratio, hi * ratio
        scale, zp = scale_zero_point(lo, hi, spec)
    damage = grid_sqnr_db(w, scale, zp, spec)
    return TensorQuant("weight", spec, scale, zp, {"method": method, "sqnr_db": _finite(damage)})


def fitted_weight(node, w: np.ndarray, cfg: QuantConfig, fmt: str | None = None) -> TensorQuant:
    """A layer's weight on its format's grid (`fmt`, else the config's): the axis and blocks its
    node takes, fitted by the config's weight method."""
    axis, block = weight_axis(node, w, cfg, format_block_size(fmt) if fmt else None)
    scheme, bits = parse_weight_format(fmt) if fmt else (None, None)
    spec = weight_spec(cfg, axis, bits, scheme, block)
    if spec.float_zero and node.op_type != "MatMul":  # only MatMulNBits takes float zero points
        spec = replace(spec, float_zero=False)
    return quantize_weight(w, spec, cfg.weight_method.value)


def clip_ratio(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Per channel (or per tensor), the fraction of max|w| whose grid gives the least squared error."""
    axis = 0 if spec.axis is None else spec.axis % w.ndim
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if spec.axis is not None else w.reshape(1, -1)
    rows = rows.astype(np.float32)
    peak = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12)
    errors = np.empty((len(CLIP_RATIOS), rows.shape[0]))
    for i, ratio in enumerate(CLIP_RATIOS):
        step = peak * ratio / spec.qmax
        q = np.clip(np.rint(rows / step), spec.qmin, spec.qmax) * step
        errors[i] = np.square(rows - q).sum(axis=1)
    best = CLIP_RATIOS[np.argmin(errors, axis=0)]
    return best if spec.axis is not None else best.reshape(())


# A constant operand goes on a grid only if the grid holds it this well: a scalar lands on a level
# exactly, a per-channel vector of similar values nearly; a table of spread values would lose more
# than the integer op saves.
CONSTANT_SQNR_DB = 40.0


# Blocks of int4 embedding rows when the config has no --block-size.
EMBEDDING_BLOCK = 32


def tied_grid(weight: TensorQuant) -> QuantSpec | None:
    """The grid of a table tied to `weight` ([K, N], blocks along K): the same blocks along each of
    its rows, where ORT's GatherBlockQuantized can read MatMulNBits' codes of them (4 or 8 bits,
    integer zero points); else None."""
    spec = weight.spec
    if spec.scheme != "int" or not spec.block_size or spec.bits not in (4, 8) or spec.float_zero:
        return None
    return replace(spec, axis=1)


def quantize_embedding(table: np.ndarray, cfg: QuantConfig, twin: tuple[str, TensorQuant] | None = None) -> TensorQuant:
    """An embedding table on a symmetric int8 grid with one scale per row (per token), or with
    --embeddings int4 on 4-bit blocks along each row (zero points as the weights have them), the
    layout ORT's GatherBlockQuantized reads; a row of odd width, which it cannot pack, stays int8.
    With --embeddings tied and `twin` (the name and grid of the MatMul weight holding the table's
    transpose), the twin's grid along rows, marked `tied_to` it for export."""
    grid = tied_grid(twin[1]) if cfg.embeddings == "tied" and twin is not None else None
    if grid is not None:
        tq = quantize_weight(table, grid, cfg.weight_method.value)
        return replace(tq, role="embedding", source={**tq.source, "tied_to": twin[0]})
    if cfg.embeddings == "int4" and table.shape[1] % 2 == 0:
        block = min(cfg.block_size or EMBEDDING_BLOCK, 1 << (int(table.shape[1]).bit_length() - 1))
        spec = QuantSpec(bits=4, signed=True, symmetric=cfg.weight_symmetric, axis=1, block_size=max(block, 16))
    else:
        spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
    return replace(quantize_weight(table, spec), role="embedding")


def quantize_constant(value: np.ndarray, cfg: QuantConfig) -> TensorQuant | None:
    """A constant operand on the activations' grid (QLinearAdd and QLinearMul take both inputs in one
    type), over its own range; None when the grid would not hold it (see CONSTANT_SQNR_DB), or
    when it is so large that its dequantized value would overflow (an attention mask's -3.4e38)."""
    spec = activation_spec(cfg)
    scale, zp = scale_zero_point(np.asarray(np.min(value)), np.asarray(np.max(value)), spec)
    with np.errstate(over="ignore", invalid="ignore"):
        on_grid = dequantize(quantize(value, scale, zp, spec), scale, zp, spec)
        if not np.all(np.isfinite(on_grid)) or sqnr_db(value, on_grid) < CONSTANT_SQNR_DB:
            return None
    return TensorQuant("constant", spec, scale, zp, {"method": "constant operand"})


def quantize_activation(name: str, stats: Stats, cfg: QuantConfig, bits: int | None = None) -> TensorQuant:
    spec = activation_spec(cfg, bits)
    h = stats[name]
    levels = spec.qmax - spec.qmin + 1
    lo, hi = choose_range(h, cfg.method.value, levels, spec.symmetric, cfg.percentile)
    scale, zp = scale_zero_point(np.asarray(lo), np.asarray(hi), spec)
    source = {"method": cfg.method.value, "range": [float(lo), float(hi)], "observed": [_finite(h.lo), _finite(h.hi)]}
    return TensorQuant("activation", spec, scale, zp, source)


def scale_source(g: Graph, name: str, acts: dict[str, TensorQuant]) -> str | None:
    """The already-quantized tensor whose scale `name` must reuse, through reshapes and max-pools."""
    node = g.producer.get(name)
    while node is not None and preserves_scale(node) and node.input:
        upstream = node.input[0]
        if upstream in acts:
            return upstream
        node = g.producer.get(upstream)
    return None


def shared(tq: TensorQuant, source: str) -> TensorQuant:
    return TensorQuant("activation", tq.spec, tq.scale, tq.zero_point, {"method": "shared", "from": source})


def bias_quant(layer: Layer, acts: dict[str, TensorQuant], weights: dict[str, TensorQuant]) -> TensorQuant | None:
    """int32 bias with scale = activation scale x weight scale, so integer kernels can add it directly."""
    if layer.bias is None or layer.activation not in acts or layer.weight not in weights:
        return None
    a, w = acts[layer.activation], weights[layer.weight]
    if a.spec.axis is not None or np.size(a.scale) != 1 or w.spec.block_size is not None:
        return None  # block-wise weights have no single scale per output channel for an int32 bias
    scale = (np.float32(a.scale) * w.scale).astype(np.float32)
    spec = QuantSpec(bits=32, signed=True, symmetric=True, axis=0 if scale.ndim else None)
    return TensorQuant("bias", spec, scale, np.zeros(scale.shape, dtype=np.int64), {"method": "derived"})


def widen_for_bias(wq: TensorQuant, w: np.ndarray, b: np.ndarray, act: TensorQuant) -> TensorQuant:
    """Raise weight scales where the int32 bias would overflow.

    That happens on near-dead channels (weights ~0 after BN folding, bias large): a coarser grid
    costs those weights nothing, while a bias left in float breaks ORT's integer kernels.
    """
    if wq.spec.scheme != "int" or np.size(act.scale) != 1 or b.shape != np.shape(wq.scale) and np.size(wq.scale) != 1:
        return wq  # a level-set grid moves with its scale: never widen it for the bias's sake
    limit = float(2**31 - 1) / 2  # headroom for the accumulator
    needed = (np.abs(b.astype(np.float64)) / (float(act.scale) * limit)).astype(np.float32)
    if np.size(wq.scale) == 1:
        needed = np.asarray(needed.max(), dtype=np.float32)
    if np.all(needed <= wq.scale):
        return wq
    scale = np.maximum(wq.scale, needed).astype(np.float32)
    damage = sqnr_db(w, dequantize(quantize(w, scale, wq.zero_point, wq.spec), scale, wq.zero_point, wq.spec))
    return replace(wq, scale=scale, source={**wq.source, "sqnr_db": _finite(damage), "widened_for_bias": True})


def build_plan(g: Graph, sel: Selection, stats: Stats, cfg: QuantConfig, extra_config: dict | None = None,
               weight_formats: dict[str, str] | None = None, act_bits: dict[str, int] | None = None,
               weight_values: dict[str, np.ndarray] | None = None) -> Plan:
    """`weight_formats` ({weight: 'int4' | 'pow2:4' ...}) and `act_bits` override the config per
    tensor (mixed precision); `weight_values` are float weights to quantize instead of the model's
    own (masked or re-fitted ones)."""
    weight_values = weight_values or {}
    weight_formats = {**configured_formats(g, sel, cfg), **(weight_formats or {})}
    act_bits = act_bits or {}
    acts: dict[str, TensorQuant] = {}
    for name in sel.activations:
        source = scale_source(g, name, acts)
        acts[name] = (shared(acts[source], source) if source
                      else quantize_activation(name, stats, cfg, act_bits.get(name)))
    weights: dict[str, TensorQuant] = {}
    for layer in sel.layers:
        node = g.node_by_name[layer.node]
        for name in layer.weights:
            if name in weights:
                continue  # a weight shared by several nodes is quantized once
            w = weight_values.get(name, g.constant(name))
            tq = fitted_weight(node, w, cfg, weight_formats.get(name))
            weights[name] = replace(tq, value=w) if name in weight_values else tq
    constants = {name: tq for name in sel.constants if (tq := quantize_constant(g.constant(name), cfg)) is not None}
    for name in sel.embeddings:
        twin = transposed_twin(g, name, sel.layers) if cfg.embeddings == "tied" else None
        constants[name] = quantize_embedding(g.constant(name), cfg, (twin, weights[twin]) if twin in weights else None)
    binarized = binary_inputs(g, sel, weights, stats, cfg)
    biases = {}
    for layer in sel.layers:
        if layer.bias is None or layer.activation not in acts or layer.weight not in weights:
            continue
        if layer.node in binarized:
            continue  # its bias absorbs the input mean at export, in float
        b = g.constant(layer.bias)
        w = weight_values.get(layer.weight, g.constant(layer.weight))
        weights[layer.weight] = widen_for_bias(weights[layer.weight], w, b, acts[layer.activation])
        bq = quantize_bias(g, layer, acts, weights, stats, cfg)
        if bq is not None:
            biases[layer.bias] = bq
    config = {"quant": to_jsonable(cfg), "prepare": dict(g.facts), **(extra_config or {})}
    return Plan({**acts, **weights, **constants, **biases}, sel.layers, sel.float_nodes, config, list(g.notes),
                binary_inputs=binarized)


def binary_inputs(g: Graph, sel: Selection, weights: dict[str, TensorQuant], stats: Stats,
                  cfg: QuantConfig) -> dict[str, np.ndarray]:
    """{node: its input's per-channel mean} for the layers whose inputs are binarized: with "all",
    every binary-weight layer but the first and last that can take them; named layers must."""
    if not cfg.binary_acts:
        return {}
    by_node = {layer.node: layer for layer in sel.layers}

    def why_not(layer) -> str | None:
        spec = weights[layer.weight].spec
        if spec.scheme != "binary":
            return f"layer {layer.node} has {spec.label} weights; binary inputs need binary weights"
        why = native_unsupported(g.node_by_name[layer.node], g.constant(layer.weight))
        return f"layer {layer.node}: {why}" if why else None

    if cfg.binary_acts == ("all",):
        ends = {sel.layers[0].node, sel.layers[-1].node}
        names = [l.node for l in sel.layers if l.node not in ends and why_not(l) is None]
    else:
        names = list(cfg.binary_acts)
        unknown = [n for n in names if n not in by_node]
        if unknown:
            raise PtqError(f"--binary-acts names {', '.join(unknown)}, which are not quantized layers")
        for n in names:
            why = why_not(by_node[n])
            if why:
                raise PtqError(f"--binary-acts: {why}")
    means = {}
    for n in names:
        h = stats.get(by_node[n].activation) if by_node[n].activation else None
        if h is None or h.channel_mean is None:
            raise PtqError(f"--binary-acts: no per-channel statistics were observed for the input of {n}")
        means[n] = np.asarray(h.channel_mean, dtype=np.float32)
    return means


def configured_formats(g: Graph, sel: Selection, cfg: QuantConfig) -> dict[str, str]:
    """{weight: format} where the config sets a layer apart from --weights: binary nets' first and
    last layers, a recipe's per-layer formats, --keep."""
    return {**_first_last_formats(sel, cfg), **_recipe_formats(sel, cfg), **_kept_formats(g, sel, cfg)}


def _recipe_formats(sel: Selection, cfg: QuantConfig) -> dict[str, str]:
    """The recipe's per-layer weight formats, keyed by weight tensor."""
    by_node = {layer.node: layer for layer in sel.layers}
    unknown = sorted(set(cfg.layer_weights) - set(by_node))
    if unknown:
        raise PtqError(f"layer_weights names {', '.join(unknown)}, which are not quantized layers")
    return {by_node[node].weight: fmt for node, fmt in cfg.layer_weights.items()}


def quantize_bias(g: Graph, layer: Layer, acts: dict[str, TensorQuant], weights: dict[str, TensorQuant],
                  stats: Stats, cfg: QuantConfig, prefix_mean: np.ndarray | None = None) -> TensorQuant | None:
    """The layer's int32 bias quantizer (bias-corrected when configured: against the quantized
    prefix's input mean when it is given), or None if it must stay float."""
    bq = bias_quant(layer, acts, weights)
    if bq is None:
        return None
    b = g.constant(layer.bias)
    if cfg.corrects_bias:
        bq = corrected_bias(g, layer, weights[layer.weight], stats, bq, b, prefix_mean)
    if _bias_fits(b if bq.value is None else bq.value, bq):
        return bq
    # Too large for int32 at this scale: the bias stays float, corrected if it was.
    return None if bq.value is None else replace(bq, role="value")


def requantize_biases(g: Graph, plan: Plan, stats: Stats, cfg: QuantConfig,
                      prefix_means: dict[str, np.ndarray] | None = None) -> Plan:
    """Biases re-derived after weights changed (learned rounding, moved scales), corrected against
    the quantized prefix's input means where `prefix_means` has them (by activation)."""
    acts, weights = plan.of_role("activation"), plan.of_role("weight")
    tensors = {k: v for k, v in plan.tensors.items() if v.role not in ("bias", "value")}
    for layer in plan.layers:
        if layer.node in plan.binary_inputs:
            continue
        if layer.bias is not None and layer.activation in acts and layer.weight in weights:
            bq = quantize_bias(g, layer, acts, weights, stats, cfg, (prefix_means or {}).get(layer.activation))
            if bq is not None:
                tensors[layer.bias] = bq
    return replace(plan, tensors=tensors)


def corrected_bias(g: Graph, layer: Layer, wq: TensorQuant, stats: Stats, bq: TensorQuant,
                   b: np.ndarray, prefix_mean: np.ndarray | None = None) -> TensorQuant:
    """The bias quantizer, carrying b + (W - Q(W)) E[x] when the input's channel means are known, or
    b + W E[x] - Q(W) E[x_q] when the quantized prefix's input mean E[x_q] is given."""
    h = stats.get(layer.activation) if layer.activation else None
    mean = h.channel_mean if h is not None else None
    if mean is None:
        return bq
    w = g.constant(layer.weight)
    source = w if wq.value is None else wq.value
    on_grid = dequantize(quantize(source, wq.scale, wq.zero_point, wq.spec), wq.scale, wq.zero_point, wq.spec)
    node = g.node_by_name[layer.node]
    shift = output_shift(node, w, on_grid, mean) if prefix_mean is None else prefix_shift(node, w, on_grid, mean, prefix_mean)
    if shift is None or shift.shape != b.shape:
        return bq
    return replace(bq, value=(b.astype(np.float64) + shift).astype(np.float32),
                   source={**bq.source, "bias_correction": True if prefix_mean is None else "quantized prefix"})


def kept_layers(entries: tuple[str, ...], layers: list[Layer], outputs: set[str]) -> dict[str, int]:
    """`first`, `last`, `lm_head` (the last layer that writes a model output: a language model's
    output projection) or node names, each optionally `=BITS` (default 8): {node: bits}."""
    nodes = [layer.node for layer in layers]
    heads = [layer.node for layer in layers if layer.output in outputs]
    aliases = {"first": nodes[0] if nodes else None, "last": nodes[-1] if nodes else None,
               "lm_head": heads[-1] if heads else None}
    pins: dict[str, int] = {}
    for entry in entries:
        name, _, bits = entry.partition("=")
        node = aliases.get(name, name)
        if node is None and name == "lm_head":
            raise PtqError("--keep lm_head: no quantized layer writes a model output directly (name the layer instead)")
        if node not in nodes:
            raise PtqError(f"--keep names '{name}', which is not a quantized layer (layers: {', '.join(nodes[:6])}...)")
        try:
            pins[node] = int(bits) if bits else 8
        except ValueError:
            raise PtqError(f"--keep {entry}: bits must be a whole number") from None
    return pins


def _kept_formats(g: Graph, sel: Selection, cfg: QuantConfig) -> dict[str, str]:
    by_node = {layer.node: layer for layer in sel.layers}
    pins = kept_layers(cfg.keep, sel.layers, set(g.output_names))
    return {by_node[node].weight: f"int{bits}" for node, bits in pins.items()}


def _first_last_formats(sel: Selection, cfg: QuantConfig) -> dict[str, str]:
    if not cfg.keeps_first_last_int8 or not sel.layers:
        return {}
    return {sel.layers[0].weight: "int8", sel.layers[-1].weight: "int8"}


def _bias_fits(b: np.ndarray, bq: TensorQuant) -> bool:
    """A bias whose int32 image would overflow (tiny scales) stays in float."""
    if b.shape != np.shape(bq.scale) and np.size(bq.scale) != 1:
        return False
    return bool(np.all(np.abs(b / bq.scale) < 2**31 - 1))


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
