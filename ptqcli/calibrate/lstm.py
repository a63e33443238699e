"""IntLSTM parameters fitted on calibration data (ptqcli/recurrent.py): for each LSTM whose weights
the plan puts on int8 grids, its inputs over the calibration batches, then the fit."""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..ops import attr
from ..plan import Plan
from ..quant import quantize
from ..recurrent import fit, tables_record, unsupported
from ..runtime import feeds_for, session
from .data import Batch

FIT_SAMPLES = 64  # calibration samples the tables are fitted on


def eligible(g: Graph, plan: Plan) -> tuple[list, dict[str, str]]:
    """The plan's LSTM layers IntLSTM can run, and why each other one cannot."""
    found, why = [], {}
    for layer in plan.layers:
        if layer.op_type != "LSTM":
            continue
        node = g.node_by_name[layer.node]
        specs = [plan.tensors[w].spec if w in plan.tensors else None for w in layer.weights]
        reason = unsupported(node)
        if reason is None and not all(s is not None and s.scheme == "int" and s.bits <= 8 and s.symmetric and s.signed
                                      and s.axis == 1 and not s.block_size for s in specs):
            reason = "its W and R are not on symmetric int8 grids with one scale per gate row"
        if reason is None:
            found.append(layer)
        else:
            why[layer.node] = reason
    return found, why


def weight_codes(g: Graph, plan: Plan, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A recurrent weight's int8 codes and its per-row scales, as the plan quantizes it."""
    tq = plan.tensors[name]
    w = g.constant(name) if tq.value is None else tq.value
    return quantize(np.asarray(w, np.float32), tq.scale, tq.zero_point, tq.spec).astype(np.int8), \
        np.asarray(tq.scale, np.float32).reshape(-1)


def _fed(node) -> tuple[str, str, str]:
    """The LSTM's input sequence, initial h and initial c ("" where not given)."""
    padded = list(node.input) + [""] * 7
    return padded[0], padded[5], padded[6]


def fit_lstms(g: Graph, plan: Plan, batches: list[Batch]) -> dict[str, dict]:
    """The fitted tables of every eligible LSTM (tables_record), by node name."""
    layers, _ = eligible(g, plan)
    if not layers:
        return {}
    inputs = {layer.node: _fed(g.node_by_name[layer.node]) for layer in layers}
    wanted = sorted({name for names in inputs.values() for name in names if name})
    sess = session(g.model, outputs=wanted, only=True)
    seen: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
    for batch in batches:
        for name, value in zip(wanted, sess.run(wanted, feeds_for(sess, batch.feeds))):
            seen[name].append(np.asarray(value, np.float32))
    records = {}
    for layer in layers:
        node = g.node_by_name[layer.node]
        (w, w_scale), (r, r_scale) = (weight_codes(g, plan, name) for name in layer.weights)
        bias = g.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        x, h0, c0 = inputs[layer.node]
        runs = len(seen[x])
        states = list(zip(seen[h0] if h0 else [None] * runs, seen[c0] if c0 else [None] * runs))
        records[layer.node] = tables_record(fit(w, w_scale, r, r_scale, bias, seen[x],
                                                attr(node, "direction", "forward"), states=states))
    return records
