"""Which observed activations stay quantized: decided from measured damage, not from op names.

An activation is worth quantizing where an integer kernel consumes it: the input of a Conv, Gemm
or MatMul (QLinearConv, QGemm, MatMulInteger and their fusions). Elsewhere (residual Adds, the
attention-mask Add, Softmax, the Mul and Sub inside a decomposed LayerNorm or GELU, Concat) ORT
can run an integer kernel too, but what it saves is small, and the damage can be large: an Add that
carries a -1e38 attention mask, or the outlier channels of a transformer's residual stream, leave
almost nothing of the real values on a per-tensor 8-bit grid.

First, an activation that no integer kernel would read or write is not quantized at all: a
QuantizeLinear/DequantizeLinear pair around a float op costs time and adds error. A tensor buys a
kernel when a Conv/Gemm/MatMul reads it (a Conv only while its output stays quantized: QLinearConv
writes integers, and a Conv whose output the damage measurement below sent back to float runs in
float whatever its input), when a layer without a float-output integer kernel (Conv)
writes it, or when it feeds an op ORT runs on integers (Add, Mul, Softmax, Concat, ...) whose other
inputs and output are quantized too; a MatMul or Gemm writes float directly (MatMulIntegerToFloat,
QGemm), so its output alone buys nothing (the bias Add of a transformer's projections).

Then every remaining candidate activation is measured alone: one probe session (calibrate/probe.py) runs the
calibration samples with only that tensor fake-quantized on the plan's own grid, and the damage is
the output error against the float model (squared error over signal power, averaged over the
float outputs). A tensor that feeds no Conv/Gemm/MatMul stays in float when its damage is above the
limit; the plan records what was measured.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ..geometry import layer_macs
from ..graph import Graph
from ..metrics import relative_error
from ..ops import activation_slots, integer_layer_op, is_fusable_activation, op_info, preserves_scale
from ..plan import Plan
from ..runtime import run_session, session, tensor_outputs
from .data import Batch, model_inputs
from .probe import gate_feeds, probe_model

def feeds_gemm(g: Graph, tensor: str, float_nodes=(), quantized: set[str] | None = None) -> bool:
    """True when a Conv, Gemm or MatMul the plan does not keep in float reads the tensor, directly
    or through ops that only move its values (Reshape, Transpose, ...), which ORT runs on the
    quantized values. With `quantized` (the tensors the plan quantizes), a reader without a
    float-output integer kernel (Conv: QLinearConv writes integers) counts only when its output is
    quantized too: otherwise ORT runs it in float, and the quantized input buys nothing."""
    seen, todo = set(), [tensor]
    while todo:
        name = todo.pop()
        for user in g.consumers.get(name, []):
            if integer_layer_op(user) and user.name not in float_nodes and (
                    quantized is None or _float_output_kernel(user) or _quantized_after_fusion(g, user.output[0], quantized)):
                return True
            if preserves_scale(user) and user.output and user.output[0] not in seen:
                seen.add(user.output[0])
                todo.append(user.output[0])
    return False


def _float_output_kernel(node) -> bool:
    info = op_info(node.op_type, node.domain)
    return info is not None and info.float_output_kernel


def _written_by_integer_layer(g: Graph, tensor: str, layer_nodes: set[str]) -> bool:
    """A quantized layer (or the Relu/Clip ORT fuses into it) whose integer kernel must write
    integers: QLinearConv has no float-output form."""
    node = g.producer.get(tensor)
    while node is not None and is_fusable_activation(node) and node.input:
        node = g.producer.get(node.input[0])
    if node is None or node.name not in layer_nodes:
        return False
    return op_info(node.op_type, node.domain) is not None and not _float_output_kernel(node)


def kernel_activations(g: Graph, plan: Plan) -> set[str]:
    """The plan's activations that some integer kernel reads or writes (see the module doc)."""
    planned = {name for name, tq in plan.tensors.items() if tq.role == "activation"}
    constants = set(plan.of_role("constant"))
    layer_nodes = {layer.node for layer in plan.layers}
    needed = {t for t in planned
              if feeds_gemm(g, t, plan.float_nodes, planned) or _written_by_integer_layer(g, t, layer_nodes)}
    changed = True
    while changed:
        changed = False
        for node in g.graph.node:
            info = op_info(node.op_type, node.domain)
            if info is None or integer_layer_op(node) or not node.output or node.output[0] not in needed:
                continue
            inputs = [node.input[i] for i in activation_slots(node, info) if node.input[i] not in constants]
            if inputs and all(t in planned for t in inputs) and not set(inputs) <= needed:
                needed.update(inputs)
                changed = True
    return needed


def _integer_readers(g: Graph, plan: Plan, constant: str) -> bool:
    """Every op reading the constant runs on integers: its other inputs and its output quantized."""
    quantized = set(plan.tensors)
    for node in g.consumers.get(constant, []):
        info = op_info(node.op_type, node.domain)
        inputs = [node.input[i] for i in activation_slots(node, info)] if info is not None else []
        if info is None or not set(inputs) <= quantized or not _quantized_after_fusion(g, node.output[0], quantized):
            return False
    return True


def _quantized_after_fusion(g: Graph, tensor: str, quantized: set[str]) -> bool:
    """The tensor is quantized, or feeds only a Relu/Clip whose output is (ORT fuses them)."""
    while tensor not in quantized:
        users = g.consumers.get(tensor, [])
        if len(users) != 1 or not is_fusable_activation(users[0]) or not users[0].output:
            return False
        tensor = users[0].output[0]
    return True


def candidates(g: Graph, plan: Plan) -> list[str]:
    """The plan's activations whose float/quantized choice is open: those no GEMM-class op reads."""
    return [name for name, tq in plan.tensors.items()
            if tq.role == "activation" and not feeds_gemm(g, name, plan.float_nodes)]


# A tensor a Conv/Gemm/MatMul reads stays quantized whatever its damage, unless quantizing it alone
# costs more than this share of the outputs' power: a log-mel front end's power spectrum, or a
# tensor whose range is a few huge values, leaves nothing of the output on an 8-bit grid. Its
# readers then compute in float on their quantized weights, and the plan records why.
GEMM_INPUT_DAMAGE_LIMIT = 0.05


def gemm_inputs(g: Graph, plan: Plan) -> list[str]:
    """The plan's activations that a Conv, Gemm or MatMul reads (the complement of candidates)."""
    return [name for name, tq in plan.tensors.items()
            if tq.role == "activation" and feeds_gemm(g, name, plan.float_nodes)]


def without_idle(g: Graph, plan: Plan) -> Plan:
    """The plan without the activations no integer kernel reads or writes (repeated until stable:
    dropping one can leave an Add or Softmax whose other tensors then buy nothing); the plan's
    config records them."""
    record = dict(plan.config.get("activation_damage", {}))
    while True:
        idle = {name for name, tq in plan.tensors.items() if tq.role == "activation"} - kernel_activations(g, plan)
        idle |= {name for name in plan.of_role("constant") if not _integer_readers(g, plan, name)}
        if not idle:
            return plan
        # In the plan's order: a set's order changes with each process's string hashing.
        record.update({name: {"quantized": False, "reason": "no integer kernel reads or writes it"}
                       for name in plan.tensors if name in idle})
        plan = replace(plan, tensors={k: v for k, v in plan.tensors.items() if k not in idle},
                       config={**plan.config, "activation_damage": record})


# Tensors measured together at first when a limit is given; a group over the limit is halved until
# the tensors that break it are measured alone.
GROUP = 16
# Samples per probe run, and how far from the limit (a factor) a measurement on the first quarter
# of the runs must be to decide without the rest.
EARLY_RUN = 4
CLEAR = 3.0
# Sample forward passes the measurement may take in all (a count, not seconds, so that the same
# inputs give the same plan): a 640x640 detector with 231 candidates would otherwise take most of
# an hour. Tensors not reached keep the kernel-aware choice (quantized) and the record says so.
# Past PROBE_MACS multiply-accumulates in all the count shrinks (a model of up to half a GMAC per
# sample, EfficientNet-Lite0's size, gets all 512 passes; a detector of several GMAC a few dozen),
# never below MIN_PROBE_SAMPLES.
PROBE_SAMPLES = 512
PROBE_MACS = 512 * 500_000_000
MIN_PROBE_SAMPLES = 48


def probe_budget(g: Graph, plan: Plan, batch: Batch) -> int:
    """How many sample passes activation_damage may take on this model (see PROBE_MACS): the
    multiply-accumulates of one sample through the plan's layers, from one run that reads their
    output shapes."""
    names = [layer.output for layer in plan.layers]
    one = batch if any(spec.fixed_batch for spec in model_inputs(g)) else batch.rows(0, 1)
    values = run_session(session(g.model, outputs=names), names, one.feeds)
    macs = sum(layer_macs(g, layer.node, layer.weight, list(v.shape[1:])) or 0 for layer, v in zip(plan.layers, values))
    if macs <= 0:
        return PROBE_SAMPLES
    return int(min(PROBE_SAMPLES, max(MIN_PROBE_SAMPLES, PROBE_MACS // macs)))


def activation_damage(g: Graph, plan: Plan, tensors: list[str], batches: list[Batch],
                      advance: Callable[[int], None] = lambda n: None,
                      limit: float | None = None, budget: int = PROBE_SAMPLES) -> dict[str, float]:
    """Per tensor, the mean output damage with that tensor on its planned grid.

    Without a limit every tensor is measured alone. With one, tensors are measured in groups with
    every member on its grid at once: quantization errors of different tensors add (their noise is
    independent), so a group within the limit bounds each member's own damage, recorded as the
    group's; only a group over the limit is split. On a CNN most groups pass whole, which takes
    the runs from one per tensor to a few per group. With a limit, measuring stops once `budget`
    sample passes are spent: the tensors not reached are missing from the result."""
    if not tensors:
        return {}
    sess = session(probe_model(g, plan, tensors, weights_as_inputs=False))
    outputs = tensor_outputs(sess)
    closed = {k: v for t in tensors for k, v in gate_feeds(t, False).items()}
    # Runs of a few samples each, so that a clear case is decided on the first quarter of them.
    fixed = any(spec.fixed_batch for spec in model_inputs(g))  # a fixed batch is fed whole
    runs = batches if fixed else [b.rows(i, i + EARLY_RUN) for b in batches for i in range(0, b.size, EARLY_RUN)]
    feeds = [{**r.feeds, **closed} for r in runs]
    sizes = [r.size for r in runs]
    references = [run_session(sess, outputs, f) for f in feeds]
    first = max(1, len(runs) // 4)

    def measured(group: list[str]) -> float:
        gates = {}
        for tensor in group:
            tq = plan.tensors[tensor]
            gates.update(gate_feeds(tensor, True, float(np.asarray(tq.scale).ravel()[0]),
                                    float(np.asarray(tq.zero_point).ravel()[0]), tq.spec.qmin, tq.spec.qmax))
        total, seen = 0.0, 0
        for i, (f, ref, n) in enumerate(zip(feeds, references, sizes)):
            spent[0] += n
            probed = run_session(sess, outputs, {**f, **gates})
            total += n * np.mean([relative_error(r, p) for r, p in zip(ref, probed) if np.issubdtype(r.dtype, np.floating)])
            seen += n
            if i + 1 == first and limit is not None and not limit / CLEAR <= total / seen <= limit * CLEAR:
                break  # far from the limit on a quarter of the samples: the rest would not change the call
        return total / seen

    damage = {}
    spent = [sum(sizes)]  # the reference runs
    size = 1 if limit is None else GROUP
    pending = [tensors[i:i + size] for i in range(0, len(tensors), size)][::-1]
    while pending:
        if limit is not None and spent[0] >= budget:
            break
        group = pending.pop()
        d = measured(group)
        if len(group) == 1 or d <= limit:
            damage.update(dict.fromkeys(group, d))
            advance(len(group))
        else:
            half = len(group) // 2
            pending += [group[half:], group[:half]]
    return damage


def settle(plan: Plan, damage: dict[str, float], limit: float, unmeasured: tuple[str, ...] = ()) -> Plan:
    """The plan with every measured tensor whose damage is above `limit` left in float (and the
    int32 biases of the layers reading it, whose grid was the input's); the measurements go into
    the plan's config (`activation_damage`) for the card and reports."""
    dropped = {name for name, d in damage.items() if d > limit}
    dropped |= {layer.bias for layer in plan.layers if layer.activation in dropped and layer.bias}
    tensors = {k: v for k, v in plan.tensors.items() if k not in dropped}
    record = {**plan.config.get("activation_damage", {}),
              **{name: {"damage": float(d), "quantized": name not in dropped,
                        **({"reason": f"alone it costs more than {limit:g} of the outputs' power"}
                           if name in dropped else {})} for name, d in damage.items()},
              **{name: {"quantized": True, "reason": "not measured: the probe budget was spent"}
                 for name in unmeasured}}
    return replace(plan, tensors=tensors, config={**plan.config, "activation_damage": record})
