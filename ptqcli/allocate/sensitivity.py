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
from onnx import TensorProto, helper

from ..calibrate.collect import Stats
from ..calibrate.data import Batch
from ..calibrate.observers import choose_range
from ..calibrate.planner import activation_spec, quantize_weight, weight_spec
from ..config import QuantConfig
from ..formats import parse_weight_format
from ..graph import Graph, clone
from ..ops import channel_axis
from ..metrics import as_probs, kl
from ..plan import Plan
from ..quant import dequantize, quantize, scale_zero_point
from ..runtime import session

FAKE_QUANT_INPUTS = ("scale", "zero", "qmin", "qmax", "gate")


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


def _fq_name(tensor: str, part: str) -> str:
    return f"{tensor}__fq_{part}"


def probe_model(g: Graph, plan: Plan, gated: list[str]):
    """Weights of the plan's layers as inputs; a gated fake-quantizer on each `gated` tensor:
    y = x + gate * (dequant(clip(round(x / s) + z, qmin, qmax)) - x)."""
    model = clone(g.model)
    weights = {layer.weight for layer in plan.layers}
    kept = [t for t in model.graph.initializer if t.name not in weights]
    moved = [t for t in model.graph.initializer if t.name in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    for tensor in gated:
        out = f"{tensor}__fq"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = out
        s, z, lo, hi, gate = (_fq_name(tensor, p) for p in FAKE_QUANT_INPUTS)
        model.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in (s, z, lo, hi, gate))
        n = lambda op, ins, outs: helper.make_node(op, ins, outs, name=f"{outs[0]}_node")  # noqa: E731
        model.graph.node.extend([
            n("Div", [tensor, s], [f"{out}_d"]), n("Round", [f"{out}_d"], [f"{out}_r"]),
            n("Add", [f"{out}_r", z], [f"{out}_z"]), n("Max", [f"{out}_z", lo], [f"{out}_lo"]),
            n("Min", [f"{out}_lo", hi], [f"{out}_c"]), n("Sub", [f"{out}_c", z], [f"{out}_u"]),
            n("Mul", [f"{out}_u", s], [f"{out}_q"]), n("Sub", [f"{out}_q", tensor], [f"{out}_e"]),
            n("Mul", [f"{out}_e", gate], [f"{out}_ge"]), n("Add", [tensor, f"{out}_ge"], [out]),
        ])
    _topological_sort(model.graph)
    return model


def _topological_sort(graph) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(not i or i in available for i in n.input)]
        if not ready:
            raise RuntimeError("graph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def _gate_feeds(tensor: str, on: bool, scale=1.0, zero=0.0, qmin=0.0, qmax=255.0) -> dict[str, np.ndarray]:
    values = (scale, zero, qmin, qmax, 1.0 if on else 0.0)
    return {_fq_name(tensor, p): np.asarray(v, dtype=np.float32) for p, v in zip(FAKE_QUANT_INPUTS, values)}


def fake_quant_weight(g: Graph, node_name: str, weight: str, fmt: str, cfg: QuantConfig) -> np.ndarray:
    w = g.constant(weight)
    axis = channel_axis(g.node_by_name[node_name]) % w.ndim if cfg.granularity.value == "channel" else None
    scheme, bits = parse_weight_format(fmt)
    tq = quantize_weight(w, weight_spec(cfg, axis, bits, scheme), cfg.weight_method.value)
    return dequantize(quantize(w, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)


def _act_gate(tensor: str, bits: int, stats: Stats, cfg: QuantConfig) -> dict[str, np.ndarray]:
    spec = activation_spec(cfg, bits)
    lo, hi = choose_range(stats[tensor], cfg.method.value, spec.qmax - spec.qmin + 1, spec.symmetric, cfg.percentile)
    scale, zp = scale_zero_point(np.asarray(lo), np.asarray(hi), spec)
    return _gate_feeds(tensor, True, float(scale), float(zp), spec.qmin, spec.qmax)


def output_damage(reference: np.ndarray, probe: np.ndarray) -> float:
    """Summed over the batch: KL for class scores, squared error over signal power otherwise."""
    f, q = reference.reshape(len(reference), -1).astype(np.float64), probe.reshape(len(probe), -1).astype(np.float64)
    if reference.ndim == 2 and f.shape[1] > 1:
        return float(np.sum(kl(as_probs(f), as_probs(q))))
    power = np.maximum(np.sum(f**2, axis=1), 1e-30)
    return float(np.sum(np.sum((f - q) ** 2, axis=1) / power))


def measure_damage(g: Graph, plan: Plan, stats: Stats, cfg: QuantConfig, batches: list[Batch],
                   options: list[Candidate], advance: Callable[[int], None] = lambda n: None) -> dict[str, dict[str, float]]:
    """{layer node: {candidate label: mean damage}} for every layer of the plan."""
    needs_gates = any(c.a_bits != 8 for c in options)
    gated = sorted({l.activation for l in plan.layers if l.activation}) if needs_gates else []
    sess = session(probe_model(g, plan, gated))
    output = g.output_names[0]
    float_weights = {l.weight: g.constant(l.weight) for l in plan.layers}
    closed = {k: v for t in gated for k, v in _gate_feeds(t, False).items()}
    references = [sess.run([output], {**b.feeds, **float_weights, **closed})[0] for b in batches]
    samples = sum(len(r) for r in references)
    table: dict[str, dict[str, float]] = {}
    for layer in plan.layers:
        row = {}
        for option in options:
            feeds = {**float_weights, **closed,
                     layer.weight: fake_quant_weight(g, layer.node, layer.weight, option.weights, cfg)}
            if option.a_bits != 8 and layer.activation in gated:
                feeds.update(_act_gate(layer.activation, option.a_bits, stats, cfg))
            total = sum(output_damage(ref, sess.run([output], {**b.feeds, **feeds})[0])
                        for b, ref in zip(batches, references))
            row[option.label] = total / samples
            advance(1)
        table[layer.node] = row
    return table

