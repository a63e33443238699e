"""What a quantized model costs: weight storage, bit-operations, and measured latency in ORT."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import numpy as np
from onnx import ModelProto

from ..geometry import layer_macs
from ..graph import Graph, nodes_within
from ..plan import Plan
from ..runtime import session
from .fidelity import INTEGER_KERNELS

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


# A model timed alone for less than this per turn measures its threads waking up more than its
# kernels: a 25 us CNN measured 40 us run by run against 24 us in runs back to back, the float model
# 40 against 28 (2 threads, not spinning). Fast models run several times per turn.
MIN_TURN_MS = 2.0


def latency_ms(models: dict[str, ModelProto], samples: list[dict[str, np.ndarray]], budget_s: float = 3.0,
               min_runs: int = 10, max_runs: int = 200) -> tuple[dict[str, float], int, int]:
    """Median wall time of one run of each model with default session options (what a user deploys)
    but for spinning threads (runtime.without_spinning), the turns each model took and the runs in a
    turn. The models take turns on the same samples (see take_turns), a model faster than
    MIN_TURN_MS several runs a turn."""
    runners = {name: _runner(session(model, spinning=False)) for name, model in models.items()}
    warm: list[float] = []
    for run in runners.values():  # warm-up: the first runs allocate buffers and pack weights
        for feeds in samples:
            run(feeds)
        start = time.perf_counter()
        for feeds in samples:
            run(feeds)
        warm.append((time.perf_counter() - start) * 1000 / len(samples))
    repeats = int(min(100, max(1, np.ceil(MIN_TURN_MS / max(min(warm), 1e-3)))))
    times = take_turns(runners, samples, budget_s, min_runs, max_runs, repeats)
    return {name: float(np.median(t)) for name, t in times.items()}, len(next(iter(times.values()))), repeats


def _runner(sess) -> Callable[[dict[str, np.ndarray]], object]:
    return lambda feeds: sess.run(None, feeds)


def take_turns(runners: dict[str, Callable[[dict[str, np.ndarray]], object]], samples: list[dict[str, np.ndarray]],
               budget_s: float, min_runs: int, max_runs: int, repeats: int = 1) -> dict[str, list[float]]:
    """Milliseconds per run of every turn, by runner. Each sample runs on every runner back to back
    (`repeats` times in a row per turn, timed together), the order flipping from one pair to the
    next, round after round, so that clock-speed changes, other processes and cache state fall on
    all of them alike. Rounds go on until each runner has taken `min_runs` turns and then until
    `budget_s` seconds have passed or it has taken `max_runs`."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget_s
    turn = 0
    while True:
        runs = len(times[names[0]])
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() >= deadline):
            return times
        for feeds in samples:
            for name in names if turn % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                for _ in range(repeats):
                    runners[name](feeds)
                times[name].append((time.perf_counter() - start) * 1000 / repeats)
            turn += 1


def batch_latency(float_model: ModelProto, quant_model: ModelProto, samples: list[dict[str, np.ndarray]],
                  real_samples: bool, cpu: str) -> dict:
    """The card's latency record: float and quantized medians measured together, and the speed-up."""
    ms, turns, repeats = latency_ms({"float": float_model, "quantized": quant_model}, samples)
    return {"cpu": cpu, "batch": _batch_size(samples[0]), "float_ms": ms["float"], "quantized_ms": ms["quantized"],
            "speedup": ms["float"] / ms["quantized"] if ms["quantized"] > 0 else None,
            "runs": turns, "runs_per_turn": repeats, "samples": len(samples), "real_samples": real_samples}


def latency_not_measured(cpu: str) -> dict:
    return {"cpu": cpu, "batch": 1, "float_ms": None, "quantized_ms": None, "speedup": None}


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def float_between_qdq(optimized: ModelProto) -> dict[str, int]:
    """{op type: count} of the nodes ORT's optimized graph runs in float between a DequantizeLinear
    and a QuantizeLinear (on a path from one to the other; subgraphs included): each costs its own
    float pass, and the path both conversions, where the values would otherwise stay on integers.
    This is what makes a quantized model the slower."""
    every = list(nodes_within(optimized.graph))
    nodes = [n for n in every if n.op_type not in ("DequantizeLinear", "QuantizeLinear")]
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producers = {out: node for node in nodes for out in node.output}
    after_dq = _reached([n.output[0] for n in every if n.op_type == "DequantizeLinear"],
                        lambda name: readers.get(name, []), lambda node: node.output)
    before_q = _reached([n.input[0] for n in every if n.op_type == "QuantizeLinear"],
                        lambda name: [producers[name]] if name in producers else [], lambda node: node.input)
    return dict(sorted(Counter(n.op_type for n in nodes if id(n) in after_dq and id(n) in before_q).items()))


def _reached(start: list[str], step, onward) -> set[int]:
    """ids of the nodes a walk from the tensors `start` reaches, `step(tensor)` giving the next nodes
    and `onward(node)` the tensors to go on from."""
    seen: set[int] = set()
    todo = list(start)
    while todo:
        for node in step(todo.pop()):
            if id(node) not in seen:
                seen.add(id(node))
                todo.extend(name for name in onward(node) if name)
    return seen


def layer_kernels(exported: ModelProto, optimized: ModelProto, plan: Plan) -> dict[str, str]:
    """{node: the operator ORT runs on the layer's stored weight}, read from ORT's optimized graph:
    a fused integer kernel (QLinearConv, QGemm, MatMulIntegerToFloat, ...), a MatMulNBits or native
    operator, or "<op> (float)" when a DequantizeLinear still turns the codes into float weights
    on every run, or "<op> (float, folded)" when ORT folded the codes into float weights once, at
    session start (an operator of another type there, e.g. MatMulNBits, repacked them). Layers whose
    weight cannot be followed are left out."""
    producers = {out: n for n in exported.graph.node for out in n.output}
    inits = {t.name for t in exported.graph.initializer}
    by_name = {n.name: n for n in exported.graph.node}
    optimized_names = {n.name: n for n in optimized.graph.node}
    readers: dict[str, list] = {}
    for node in optimized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kernels = {}
    for layer in plan.layers:
        stored = _stored_weight(layer, by_name, producers, inits)
        found = readers.get(stored, []) if stored else []
        if not found:
            if stored and layer.node in optimized_names:  # ORT rewrote the weight: folded to float, or repacked
                op = optimized_names[layer.node].op_type
                kernels[layer.node] = f"{op} (float, folded)" if op == layer.op_type else op
            elif stored and stored not in inits:  # decoded to float at load, then laid out anew (NCHWc)
                kernels[layer.node] = f"{layer.op_type} (float, folded)"
            continue
        node = found[0]
        if node.op_type == "DequantizeLinear":
            after = readers.get(node.output[0], [])
            kernels[layer.node] = f"{after[0].op_type if after else layer.op_type} (float)"
        elif stored not in inits and node.op_type not in INTEGER_KERNELS:  # decoded to float weights at load
            kernels[layer.node] = f"{node.op_type} (float, folded)"
        else:
            kernels[layer.node] = node.op_type
    return kernels


def _stored_weight(layer, by_name, producers, inits) -> str | None:
    """The initializer that holds a layer's weight in the exported model: the layer's node (or what
    replaced it: MatMulNBits, MatMulInteger) reads it at input 1, directly or through a DequantizeLinear.
    Codes widened or decoded at load (export/container.py: a Cast, a Gather of a level table) are
    followed to that node's output: ORT folds it into an initializer of that name."""
    node = next((by_name[n] for n in (layer.node, f"{layer.node}_MatMulNBits", f"{layer.node}_MatMulInteger")
                 if n in by_name), None)
    if node is None or len(node.input) < 2:
        return None
    name = node.input[1]
    dq = producers.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":
        name = dq.input[0]
    return name if _constant_at_load(name, producers, inits) else None


def _constant_at_load(name: str, producers, inits) -> bool:
    """An initializer, or a Cast, Gather, Sub or Mul of such (folded by ORT when it loads the model)."""
    if name in inits:
        return True
    node = producers.get(name)
    return (node is not None and node.op_type in ("Cast", "Gather", "Sub", "Mul")
            and all(_constant_at_load(x, producers, inits) for x in node.input))
