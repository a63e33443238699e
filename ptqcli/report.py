"""Rich tables for what a person wants to look at: the model, the plan, the fidelity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from rich.table import Table

from .config import QuantConfig
from .export.fidelity import OUTPUT_KIND_LABELS, Fidelity, pooled_positions
from .graph import default_opset, load_model
from .ops import LAYOUT_OPS, WEIGHTED_OPS, op_info
from .plan import Plan
from .prepare import prepare
from .calibrate.select import select


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "exact"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _handling(op: str) -> str:
    if op == "BatchNormalization":
        return "folded into the preceding Conv/Gemm"
    if op in WEIGHTED_OPS:
        return "int weights + quantized activations"
    if op_info(op) is not None:
        return "quantized activations"
    if op in LAYOUT_OPS:
        return "layout: carries quantized values"
    return "float"


def inspect_tables(path: Path) -> list[Table]:
    raw = load_model(path)
    ops = Counter(n.op_type for n in raw.graph.node)
    g = prepare(raw, source=str(path))
    sel = select(g, QuantConfig())
    params = sum(int(np.prod(t.dims)) for t in g.graph.initializer)
    summary = Table(title=f"{path.name}", show_header=False)
    summary.add_row("opset", str(default_opset(raw)))
    for i in g.graph_inputs:
        summary.add_row("input", f"{i.name} {g.value_shapes.get(i.name)}")
    for o in g.graph.output:
        summary.add_row("output", f"{o.name} {g.value_shapes.get(o.name)}")
    summary.add_row("nodes", str(len(raw.graph.node)))
    summary.add_row("parameters", f"{params:,}")
    bn = ops.get("BatchNormalization", 0)
    summary.add_row("BatchNormalization", f"{bn} present (folded into Conv/Gemm for quantization)" if bn
                    else "none (folded at export, or never there)")
    summary.add_row("quantizable layers", str(len(sel.layers)))
    summary.add_row("activation tensors", str(len(sel.activations)))
    summary.add_row("stays in float", ", ".join(sorted({why.split(" ")[0] for why in sel.float_nodes.values()})) or "-")
    for note in g.notes:
        summary.add_row("note", note)
    op_table = Table(title="op types")
    for col in ("op", "count", "handling"):
        op_table.add_column(col)
    for op, count in sorted(ops.items(), key=lambda kv: -kv[1]):
        op_table.add_row(op, str(count), _handling(op))
    layer_table = Table(title="quantizable layers")
    for col in ("node", "op", "weight shape", "params"):
        layer_table.add_column(col)
    for layer in sel.layers:
        shape = list(g.initializers[layer.weight].dims)
        layer_table.add_row(layer.node, layer.op_type, str(shape), f"{int(np.prod(shape)):,}")
    return [summary, op_table, layer_table]


def weight_grids(weights: dict) -> str:
    """The plan's weight grids as they are, most common first: "int4 blocks of 128, with zero points x210"."""
    def grid(spec) -> str:
        where = f"blocks of {spec.block_size}" if spec.block_size else "per channel" if spec.axis is not None else "per tensor"
        return f"{spec.label} {where}, {'symmetric' if spec.symmetric else 'with zero points'}"

    counts = Counter(grid(t.spec) for t in weights.values())
    return "; ".join(f"{g} x{n}" for g, n in counts.most_common()) or "-"


def plan_table(plan: Plan) -> Table:
    q = plan.config.get("quant", {})
    acts, weights, biases = (plan.of_role(r) for r in ("activation", "weight", "bias"))
    reduce = any(t.spec.reduce_range for t in weights.values())
    table = Table(title="quantization plan", show_header=False)
    table.add_row("weights", weight_grids(weights) + (" (7-bit range for ORT's int8 kernels on this CPU)" if reduce else ""))
    table.add_row("activations", f"{q.get('acts')} per tensor, {'symmetric' if q.get('act_symmetric') else 'asymmetric'},"
                  f" {q.get('method')}")
    table.add_row("calibration samples", str(plan.config.get("samples_seen")))
    if q.get("rounding"):
        chosen = plan.config.get("rounding_choice", "")
        table.add_row("rounding", chosen if chosen.startswith("auto") else q["rounding"])
    table.add_row("layers / weights / biases", f"{len(plan.layers)} / {len(weights)} / {len(biases)}")
    table.add_row("activation tensors", str(len(acts)))
    worst = sorted((t.source.get("sqnr_db") or np.inf, n) for n, t in weights.items())[:3]
    table.add_row("lowest weight SQNR", ", ".join(f"{n} {s:.1f} dB" for s, n in worst) or "-")
    counts = Counter(_reason_label(v) for v in plan.float_nodes.values())
    table.add_row("float nodes", str(len(plan.float_nodes)) + (
        f" ({', '.join(f'{label} x{n}' for label, n in sorted(counts.items()))})" if counts else ""))
    return table


def _reason_label(reason: str) -> str:
    """A float node's reason in a few words: the op type an op-level reason starts with, else the
    clause before the explanation ("a stem Conv with few input channels", "part of an erf GELU")."""
    words = reason.split(" ")
    if len(words) > 1 and words[0][:1].isupper() and words[1] in ("has", "of"):  # "Softmax has no ...", "MatMul of two ..."
        return words[0]
    return reason.split(":")[0].split(",")[0].split(" (")[0]


def outputs_table(f: Fidelity) -> Table:
    """One row per model output. Top-1 and KL columns appear only when some output holds class scores,
    pooled-cosine columns only when some [N, T, H] embedding was pooled; MSE stays in fidelity.json,
    for the table to fit a terminal."""
    where = "held-out samples" if f.held_out else "calibration samples (no held-out data)"
    table = Table(title=f"fidelity vs float: {f.samples} {where}, ORT kernel path", show_edge=False)
    rows = f.outputs.values()
    classes = any("top1_agreement" in m for m in rows)
    pooled = sorted({where for m in rows for where in m.get("pooled_over", [])})
    language = any("perplexity_float" in m for m in rows)
    columns = ["output", "kind", *(["top-1 agreement", "KL"] if classes else []), "cosine\nmean", "cosine\nmin",
               *(["pooled\ncosine\nmean", "pooled\ncosine\nmin"] if pooled else []),
               *(["perplexity\nfloat", "perplexity\nquantized", "next-token\nKL"] if language else []), "SQNR\ndB"]
    for col in columns:
        if col == "output":  # names can be long (onnx::Shape_422): fold them, keep the numbers whole
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for name, m in f.outputs.items():
        cells = [name, OUTPUT_KIND_LABELS.get(m.get("kind"), "-")]
        if classes:
            cells += [f"{100 * m['top1_agreement']:.2f}%" if "top1_agreement" in m else "-",
                      f"{m['kl']:.5f}" if "kl" in m else "-"]
        cells += [f"{m['cosine']:.5f}", _cosine(m.get("cosine_min"))]
        if pooled:
            cells += [_cosine(m.get("pooled_cosine")), _cosine(m.get("pooled_cosine_min"))]
        if language:
            cells += ["-" if m.get(k) is None else f"{m[k]:.3f}" for k in ("perplexity_float", "perplexity_quantized")]
            cells += ["-" if "next_token_kl" not in m else f"{m['next_token_kl']:.4f}"]
        table.add_row(*cells, _fmt(m["sqnr_db"]))
    notes = ["cosine per sample over all its values, mean and min over the samples"]
    broken = {name: m["non_finite"] for name, m in f.outputs.items() if m.get("non_finite")}
    if broken:
        notes.insert(0, "[red]the quantized model wrote NaN or infinite values where float's were finite: "
                     + ", ".join(f"{n:,} in {name}" for name, n in broken.items()) + " (measured as zeros)[/red]")
    if language:
        notes.append("perplexity: of each next token over the real positions of the evaluation token ids")
    if pooled:
        notes.append(f"pooled: each [N, T, H] embedding averaged over {pooled_positions(pooled)}")
    table.caption = "; ".join(notes)
    return table


def _cosine(x: float | None) -> str:
    return "-" if x is None else f"{x:.5f}"


def fidelity_tables(f: Fidelity, max_layers: int = 40) -> list[Table]:
    tables = [outputs_table(f)]
    if f.accuracy:
        acc = Table(title="accuracy on labels")
        for col in ("float top-1", "quantized top-1", "drop"):
            acc.add_column(col, justify="right")
        fl, qu = f.accuracy["float"], f.accuracy["quantized"]
        acc.add_row(f"{100 * fl:.2f}%", f"{100 * qu:.2f}%", f"{100 * (fl - qu):+.2f} pts")
        tables.append(acc)
    kernels = Table(title="kernel path (ops ORT runs after optimization)", show_header=False)
    kernels.add_row("integer kernels", ", ".join(f"{k} x{v}" for k, v in f.integer_kernels.items()) or "none (emulated)")
    float_ops = {k: v for k, v in f.kernel_ops.items() if k not in f.integer_kernels}
    kernels.add_row("other ops", ", ".join(f"{k} x{v}" for k, v in float_ops.items()))
    tables.append(kernels)
    if not f.layers:  # not observed (a model measured segment by segment from disk)
        return tables
    layers = Table(title="per-layer output SQNR (emulated path)")
    for col in ("node", "op", "SQNR dB"):
        layers.add_column(col, justify="right" if col == "SQNR dB" else "left")
    shown = sorted(f.layers, key=lambda l: (l["sqnr_db"] is None, l["sqnr_db"] or 0.0))[:max_layers]
    for layer in shown:
        layers.add_row(layer["node"], layer["op_type"], _fmt(layer["sqnr_db"], 1))
    if len(f.layers) > max_layers:
        layers.caption = f"the {max_layers} lowest of {len(f.layers)} layers; all are in fidelity.json"
    tables.append(layers)
    return tables
