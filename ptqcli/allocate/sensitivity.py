"""How much each layer suffers from each candidate format, measured alone, in ORT.

One probe session serves every measurement: the layers' weights become graph inputs (so a run
feeds the float weights of every layer but one, which gets its fake-quantized weights), and each
layer's input activation gets a fake-quantizer that a gate input switches on. Damage is the mean
KL divergence of the model's outputs to the float outputs (normalised squared error for outputs
that are not class scores), over the calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..calibrate.collect import Stats
from ..calibrate.data import Batch
from ..calibrate.planner import quantize_weight, weight_axis, weight_spec
from ..calibrate.probe import act_gate, gate_feeds, probe_model
from ..config import QuantConfig
from ..formats import format_block_size, parse_weight_format
from ..graph import Graph
from ..ops import op_info
from ..metrics import as_probs, kl, relative_error
from ..plan import Plan
from ..quant import dequantize, quantize



@dataclass(frozen=True)
class Candidate:
    """A weight format (int4, pow2:4, binary, ...) with an activation width."""

    weights: str
    a_bits: int = 8

    @property
    def w_bits(self) -> int:
        return parse_weight_format(self.weights)[1]

    @property
    def label(self) -> str:
        return f"{self.weights}/A{self.a_bits}"

    @staticmethod
    def parse(label: str) -> "Candidate":
        weights, _, a = label.rpartition("/A")
        return Candidate(weights, int(a))


def candidates(weight_formats: list[str], act_bits: list[int]) -> list[Candidate]:
    """Every combination, widest first."""
    every = {Candidate(w, a) for w in weight_formats for a in act_bits}
    return sorted(every, key=lambda c: (-c.w_bits, -c.a_bits, c.weights))


def fake_quant_weight(g: Graph, node_name: str, weight: str, fmt: str, cfg: QuantConfig,
                      w: np.ndarray | None = None) -> np.ndarray:
    """The weight (`w`, or the model's own) on the grid of `fmt`, as the plan would place it."""
    w = g.constant(weight) if w is None else w
    axis, block = weight_axis(g.node_by_name[node_name], w, cfg, format_block_size(fmt))
    scheme, bits = parse_weight_format(fmt)
    tq = quantize_weight(w, weight_spec(cfg, axis, bits, scheme, block), cfg.weight_method.value)
    return dequantize(quantize(w, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)


def output_damage(reference: np.ndarray, probe: np.ndarray) -> float:
    """Summed over the batch: KL for class scores, squared error over signal power otherwise."""
    if reference.ndim == 2 and reference.shape[1] > 1:
        f, q = reference.astype(np.float64), probe.astype(np.float64)
        return float(np.sum(kl(as_probs(f), as_probs(q))))
    return relative_error(reference, probe)


def measure_damage(g: Graph, plan: Plan, stats: Stats, cfg: QuantConfig, batches: list[Batch],
                   options: list[Candidate] | dict[str, list[Candidate]], advance: Callable[[int], None] = lambda n: None,
                   values: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """{layer node: {candidate label: mean damage}} for every layer of the plan (and each of the
    `options`, or of its own when they are given per layer), against the float model; `values` are
    the float weights the layers are quantized from (masked ones).

    A layer's quantization changes nothing before its input, so the probe model is walked once in
    graph order (calibrate/segments.py), cut at the layers' inputs, with every batch's tensors
    carried from piece to piece; at each cut, each layer there is measured by running only the rest
    of the model from what the walk holds. The runs cost a suffix of the network each instead of
    the whole of it."""
    from ..calibrate.segments import BatchStates, advance as walk, cut, rest, run_piecewise, segment_session

    per_layer = options if isinstance(options, dict) else {layer.node: options for layer in plan.layers}
    needs_gates = any(c.a_bits != 8 for opts in per_layer.values() for c in opts)
    gated = sorted({l.activation for l in plan.layers if l.activation}) if needs_gates else []
    probe = Graph(probe_model(g, plan, gated))
    output = g.output_names[0]
    float_weights = {l.weight: g.constant(l.weight) for l in plan.layers}
    closed = {k: v for t in gated for k, v in gate_feeds(t, False).items()}
    shared = {**float_weights, **closed}
    references = [outputs[0] for outputs in run_piecewise(probe, [b.feeds for b in batches], [output], shared=shared)]
    states = BatchStates([b.feeds for b in batches], shared)
    samples = sum(len(r) for r in references)
    measured = [layer for layer in plan.layers if layer.node in per_layer]
    # Where each layer is measured from: its input, unless that is not computed before the output is
    # (no input, a model input, a branch computed after the output): then from the start.
    made_at = {out: i for i, node in enumerate(probe.graph.node) for out in node.output if out}
    at = {layer.node: layer.activation if made_at.get(layer.activation, len(made_at)) < made_at.get(output, -1) else None
          for layer in measured}
    segments = cut(probe.graph, [*filter(None, at.values()), output])
    table: dict[str, dict[str, float]] = {}

    def measure(here: list, tail) -> None:
        sess = segment_session(probe, tail, states[0], lambda name: None)
        for layer in here:
            row = {}
            for option in per_layer[layer.node]:
                feeds = {layer.weight: fake_quant_weight(g, layer.node, layer.weight, option.weights, cfg,
                                                         (values or {}).get(layer.weight))}
                if option.a_bits != 8 and layer.activation in gated:
                    feeds.update(act_gate(layer.activation, option.a_bits, stats, cfg))
                total = sum(output_damage(ref, sess.run([output], {n: feeds.get(n, state[n]) for n in tail.reads})[0])
                            for state, ref in zip(states, references))
                row[option.label] = total / samples
                advance(1)
            table[layer.node] = row

    if any(a is None for a in at.values()):
        measure([layer for layer in measured if at[layer.node] is None], rest(segments, -1))
    for k, segment in enumerate(segments[:-1]):
        for _ in walk(probe, segment, states, lambda n: None):
            pass
        here = [layer for layer in measured if at[layer.node] == segment.target]
        if here:
            measure(here, rest(segments, k))
    return {layer.node: table[layer.node] for layer in measured}


def weight_only_damage(g: Graph, plan: Plan, stats: Stats, cfg: QuantConfig, batches: list[Batch],
                       options: list[Candidate], advance: Callable[[int], None] = lambda n: None,
                       values: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """measure_damage for weight-only plans at a fraction of its runs (a language model has hundreds
    of layers, and a whole-model run per layer and candidate would take hours). Without quantized
    activations a layer's output error for any weight error D is exact from its input's Gram matrix
    G = X^T X: tr(D^T G D). One run per layer measures what its middle candidate (the median output
    error: near the operating point, where damage grows with that error; the widest errs too little to
    measure and the narrowest is past where it grows in proportion) does to the model's output; the
    others scale by their share of that output error."""
    from ..calibrate.moments import channel_moments

    values = values or {}
    # Layers with a 2-D weight and a float input (MatMul, Gemm) go by their Gram matrix; any other
    # (a weight-only convolution) is measured for every candidate, as measure_damage does.
    gram_layers = [layer for layer in plan.layers if layer.activation and layer.op_type in ("MatMul", "Gemm")
                   and len(g.initializers[layer.weight].dims) == 2]
    moments, _ = channel_moments(g, [], batches, {layer.activation for layer in gram_layers}) if gram_layers else ({}, 0)
    errors: dict[str, dict[str, float]] = {}
    for layer in gram_layers:
        node = g.node_by_name[layer.node]
        in_axis = op_info(node.op_type).weight_in_axis(node) % 2
        w = values[layer.weight] if layer.weight in values else g.constant(layer.weight)
        gram = moments[layer.activation].gram.astype(np.float32)
        errors[layer.node] = {}
        for option in options:
            diff = np.moveaxis(w - fake_quant_weight(g, layer.node, layer.weight, option.weights, cfg, w), in_axis, 0)
            errors[layer.node][option.label] = float(np.sum(diff * (gram @ diff), dtype=np.float64))
    table = {}
    others = [layer.node for layer in plan.layers if layer.node not in errors]
    if others:
        table = measure_damage(g, plan, stats, cfg, batches, {node: options for node in others}, advance, values)
    middle = {node: [Candidate.parse(sorted(row, key=row.get)[len(row) // 2])] for node, row in errors.items()}
    measured = measure_damage(g, plan, stats, cfg, batches, middle, lambda n: advance(n * len(options)), values) \
        if middle else {}
    for node, row in errors.items():
        anchor = middle[node][0].label
        per_error = measured[node][anchor] / row[anchor] if row[anchor] > 0 else 0.0
        table[node] = {label: error * per_error for label, error in row.items()}
    return table
