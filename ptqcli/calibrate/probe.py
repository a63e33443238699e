"""The probe model: one ORT session that measures any layer under any quantization.

The plan's layer weights become graph inputs (a run feeds float weights for some layers and
fake-quantized ones for others), and each gated activation gets a fake-quantizer that a gate input
switches on. Sensitivity measurement and layer-wise rounding both run on it.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..config import QuantConfig
from ..graph import Graph, clone, keep_only
from ..plan import Plan
from ..quant import scale_zero_point
from .collect import Stats
from .observers import choose_range
from .planner import activation_spec

FAKE_QUANT_INPUTS = ("scale", "zero", "qmin", "qmax", "gate")


def _fq_name(tensor: str, part: str) -> str:
    return f"{tensor}__fq_{part}"


def probe_model(g: Graph, plan: Plan, gated: list[str], weights_as_inputs: bool = True):
    """Weights of the plan's layers as inputs (unless `weights_as_inputs` is off: then ORT packs
    them once, as in deployment); a gated fake-quantizer on each `gated` tensor:
    y = x + gate * (dequant(clip(round(x / s) + z, qmin, qmax)) - x)."""
    model = clone(g.model)
    weights = {layer.weight for layer in plan.layers} if weights_as_inputs else set()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer if t.name in weights)
    keep_only(model.graph.initializer, lambda t: t.name not in weights)
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


def gate_feeds(tensor: str, on: bool, scale=1.0, zero=0.0, qmin=0.0, qmax=255.0) -> dict[str, np.ndarray]:
    values = (scale, zero, qmin, qmax, 1.0 if on else 0.0)
    return {_fq_name(tensor, p): np.asarray(v, dtype=np.float32) for p, v in zip(FAKE_QUANT_INPUTS, values)}


def act_gate(tensor: str, bits: int, stats: Stats, cfg: QuantConfig) -> dict[str, np.ndarray]:
    spec = activation_spec(cfg, bits)
    lo, hi = choose_range(stats[tensor], cfg.method.value, spec.qmax - spec.qmin + 1, spec.symmetric, cfg.percentile)
    scale, zp = scale_zero_point(np.asarray(lo), np.asarray(hi), spec)
    return gate_feeds(tensor, True, float(scale), float(zp), spec.qmin, spec.qmax)


def quantized_prefix(g: Graph, plan: Plan, stats: Stats, cfg: QuantConfig) -> tuple[Graph, dict[str, np.ndarray], list[str]]:
    """The graph a walk over the already-quantized model runs (calibrate/segments.py): the plan's
    activation quantizers as gated fake-quantizers (weights stay initializers, given by the walk's
    caller as each segment is built), the feeds that open those gates, and the gated tensors, each
    read as `<tensor>__fq` after its quantizer. Without quantized activations: `g` itself."""
    gated = sorted({l.activation for l in plan.layers if l.activation in plan.tensors})
    if not gated:
        return g, {}, []
    gates: dict[str, np.ndarray] = {}
    for tensor in gated:
        gates.update(act_gate(tensor, plan.tensors[tensor].spec.bits, stats, cfg))
    return Graph(probe_model(g, plan, gated, weights_as_inputs=False), weights_dir=g.weights_dir), gates, gated
