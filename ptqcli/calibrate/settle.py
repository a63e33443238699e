"""Which observed activations stay quantized: decided from measured damage, not from op names.

An activation is worth quantizing where an integer kernel consumes it: the input of a Conv, Gemm
or MatMul (QLinearConv, QGemm, MatMulInteger and their fusions). Elsewhere (residual Adds, the
attention-mask Add, Softmax, the Mul and Sub inside a decomposed LayerNorm or GELU, Concat) ORT
can run an integer kernel too, but what it saves is small, and the damage can be large: an Add that
carries a -1e38 attention mask, or the outlier channels of a transformer's residual stream, leave
almost nothing of the real values on a per-tensor 8-bit grid.

So every candidate activation is measured alone: one probe session (calibrate/probe.py) runs the
calibration samples with only that tensor fake-quantized on the plan's own grid, and the damage is
the output error against the float model (squared error over signal power, averaged over the
float outputs). A tensor that feeds no Conv/Gemm/MatMul stays in float when its damage is above the
limit; the plan records what was measured.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ..geometry import MATRIX_OPS
from ..graph import Graph
from ..metrics import relative_error
from ..ops import preserves_scale
from ..plan import Plan
from ..runtime import run_session, session
from .data import Batch
from .probe import gate_feeds, probe_model

def feeds_gemm(g: Graph, tensor: str) -> bool:
    """True when a Conv, Gemm or MatMul reads the tensor, directly or through ops that only move
    its values (Reshape, Transpose, ...), which ORT runs on the quantized values."""
    seen, todo = set(), [tensor]
    while todo:
        name = todo.pop()
        for user in g.consumers.get(name, []):
            if user.op_type in MATRIX_OPS:
                return True
            if preserves_scale(user) and user.output and user.output[0] not in seen:
                seen.add(user.output[0])
                todo.append(user.output[0])
    return False


def candidates(g: Graph, plan: Plan) -> list[str]:
    """The plan's activations whose float/quantized choice is open: those no GEMM-class op reads."""
    return [name for name, tq in plan.tensors.items() if tq.role == "activation" and not feeds_gemm(g, name)]


def activation_damage(g: Graph, plan: Plan, tensors: list[str], batches: list[Batch],
                      advance: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Per tensor, the mean output damage with only that tensor on its planned grid."""
    if not tensors:
        return {}
    sess = session(probe_model(g, plan, tensors))
    outputs = [o.name for o in sess.get_outputs()]
    float_weights = {layer.weight: g.constant(layer.weight) for layer in plan.layers}
    closed = {k: v for t in tensors for k, v in gate_feeds(t, False).items()}
    feeds = [{**b.feeds, **float_weights, **closed} for b in batches]
    references = [run_session(sess, outputs, f) for f in feeds]
    samples = sum(len(next(iter(b.feeds.values()))) for b in batches)
    damage = {}
    for tensor in tensors:
        tq = plan.tensors[tensor]
        gate = gate_feeds(tensor, True, float(np.asarray(tq.scale).ravel()[0]), float(np.asarray(tq.zero_point).ravel()[0]),
                          tq.spec.qmin, tq.spec.qmax)
        total = 0.0
        for f, ref in zip(feeds, references):
            probed = run_session(sess, outputs, {**f, **gate})
            total += np.mean([relative_error(r, p) for r, p in zip(ref, probed) if np.issubdtype(r.dtype, np.floating)])
        damage[tensor] = total / samples
        advance(1)
    return damage


def settle(plan: Plan, damage: dict[str, float], limit: float) -> Plan:
    """The plan with every measured tensor whose damage is above `limit` left in float; the
    measurements go into the plan's config (`activation_damage`) for the card and reports."""
    dropped = {name for name, d in damage.items() if d > limit}
    tensors = {k: v for k, v in plan.tensors.items() if k not in dropped}
    record = {name: {"damage": float(d), "quantized": name not in dropped} for name, d in damage.items()}
    return replace(plan, tensors=tensors, config={**plan.config, "activation_damage": record})
