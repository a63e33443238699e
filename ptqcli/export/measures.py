"""What a quantized model costs: weight storage, bit-operations, and measured latency in ORT."""

from __future__ import annotations

import time

import numpy as np
from onnx import ModelProto

from ..geometry import layer_macs
from ..graph import Graph
from ..plan import Plan
from ..runtime import session

FLOAT_BITS = 32


def weight_storage(g: Graph, plan: Plan) -> dict:
    """Bytes of parameters at their stored precision; everything not quantized counts as float32."""
    float_bytes = quant_bits = 0
    for t in g.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        float_bytes += 4 * n
        tq = plan.tensors.get(t.name)
        quant_bits += n * (tq.spec.bits if tq is not None else FLOAT_BITS)
    quant_bytes = quant_bits / 8
    return {"float_bytes": float_bytes, "quantized_bytes": int(np.ceil(quant_bytes)),
            "compression": float_bytes / quant_bytes if quant_bytes else None}


def bops(g: Graph, plan: Plan, layers: list[dict]) -> dict:
    """Bit-operations per sample of the weighted layers: MACs x weight bits x activation bits."""
    shapes = {layer["node"]: layer.get("output_shape") for layer in layers}
    float_total = quant_total = 0
    counted = 0
    for layer in plan.layers:
        macs = layer_macs(g, layer.node, layer.weight, shapes.get(layer.node))
        if macs is None:
            continue
        counted += 1
        w = plan.tensors.get(layer.weight)
        a = plan.tensors.get(layer.activation) if layer.activation else None
        float_total += macs * FLOAT_BITS * FLOAT_BITS
        quant_total += macs * (w.spec.bits if w else FLOAT_BITS) * (a.spec.bits if a else FLOAT_BITS)
    return {"float": float_total, "quantized": quant_total, "layers_counted": counted,
            "reduction": float_total / quant_total if quant_total else None}


def latency_ms(model: ModelProto, feeds: dict[str, np.ndarray], budget_s: float = 2.0, max_runs: int = 200) -> float:
    """Median wall time of one run with default session options (what a user deploys)."""
    sess = session(model)
    for _ in range(3):
        sess.run(None, feeds)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 10 or time.perf_counter() < deadline):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))
