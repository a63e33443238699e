"""Quantization cards: what was done to a model, the trade-offs chosen, and what was measured.

A card is JSON validated against a versioned schema shipped with the package (on write and on
read), plus a Markdown rendering and a PNG plot of bits and SQNR per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import PtqError
from ..config import read_toml
from ..files import write_atomic
from ..geometry import supported, weight_to_matrix
from ..graph import Graph, default_opset, file_sha256
from ..masks.nm import nm_pattern
from ..ops import channel_axis
from ..quant import per_value, quantize
from ..plan import Plan
from .fidelity import INTEGER_KERNELS, Fidelity

CARD_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("card.schema.json")


@dataclass(frozen=True)
class CardInputs:
    """Everything a card is made of, gathered by the export stage."""

    source_model: dict  # path, sha256 and bytes, as recorded at calibration
    output_model: Path
    graph: Graph
    plan: Plan
    fidelity: Fidelity | None
    eval_source: str | None
    size: dict
    bops: dict
    latency: dict
    kernel_ops: dict
    # Native export: {"replaced": {node: custom op}, "kept": {node: why not}}; None for QDQ.
    native: dict | None = None
    # How sub-8-bit weight codes are stored (export/container.record), the ONNX type holding each
    # layer's weight, and the operator ORT runs on it (export/measures.layer_kernels).
    container: dict | None = None
    stored: dict | None = None
    kernels: dict | None = None
    # Ops ORT runs in float between a DequantizeLinear and a QuantizeLinear (measures.float_between_qdq).
    float_between_qdq: dict | None = None


def card_paths(model_path: str | Path) -> dict[str, Path]:
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return {ext: p.with_name(f"{stem}.card.{ext}") for ext in ("json", "md", "png")}


def _file(path: Path) -> dict:
    return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _layer_rows(c: CardInputs) -> list[dict]:
    measured = {row["node"]: row for row in (c.fidelity.layers if c.fidelity else [])}
    rows = []
    for layer in c.plan.layers:
        w = c.plan.tensors.get(layer.weight)
        params = c.graph.initializers[layer.weight].dims
        rows.append({
            "node": layer.node,
            "op_type": layer.op_type,
            "params": int(_prod(params)),
            "format": w.spec.label if w else "float32",
            "bits": w.spec.bits if w else 32,
            "granularity": _granularity(w),
            "symmetric": bool(w.spec.symmetric) if w else True,
            "scheme": w.spec.scheme if w else "float",
            # a pattern known when quantizing (masks, streaming) is not measured again
            "sparsity": (w.source["sparsity"] if "sparsity" in w.source else _measured_sparsity(c, layer, w)) if w else None,
            "rounding": (c.plan.config["quant"].get("rounding", "nearest")
                         if w and w.source.get("rounding") == "learned" else "nearest"),
            "binary_input": layer.node in c.plan.binary_inputs,
            "weight_sqnr_db": (w.source.get("sqnr_db") if w else None),
            "output_sqnr_db": measured.get(layer.node, {}).get("sqnr_db"),
            **({"container": c.stored[layer.node]} if c.stored and layer.node in c.stored else {}),
            **({"kernel": c.kernels[layer.node]} if c.kernels and layer.node in c.kernels else {}),
        })
    return rows


def _measured_sparsity(c: CardInputs, layer, w) -> str | None:
    """The N:M pattern the quantized weights obey (zero codes), for weights pruned before this run."""
    node = c.graph.node_by_name[layer.node]
    if not supported(node):
        return None
    values = c.graph.constant(layer.weight) if w.value is None else np.asarray(w.value, dtype=np.float32)
    nonzero = quantize(values, w.scale, w.zero_point, w.spec) != per_value(np.asarray(w.zero_point), values.shape, w.spec)
    pattern = nm_pattern(weight_to_matrix(nonzero, node.op_type, channel_axis(node)))
    return None if pattern is None else f"{pattern[0]}:{pattern[1]}"


def _granularity(w) -> str:
    if not w or w.spec.axis is None:
        return "per-tensor"
    return f"blocks of {w.spec.block_size}" if w.spec.block_size else "per-channel"


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _tradeoffs(c: CardInputs, layers: list[dict]) -> dict:
    q = c.plan.config["quant"]
    weights = c.plan.of_role("weight")
    acts = c.plan.of_role("activation")
    some_act = next(iter(acts.values()), None)
    bn = int(c.plan.config.get("prepare", {}).get("batchnorm_folded", 0))
    reduce = any(t.spec.reduce_range for t in weights.values())
    integer = [k for k in c.kernel_ops if k in INTEGER_KERNELS]
    runtime = "ONNX Runtime CPU with the ptqcli operator library" if c.native is not None else "ONNX Runtime CPU, QDQ"
    return {
        "weight_granularity": (f"blocks of {q['block_size']}" if q.get("block_size")
                               else "per-channel" if q["granularity"] == "channel" else "per-tensor"),
        "weight_symmetric": bool(q.get("weight_symmetric", True)),
        "weight_bits": max((t.spec.bits for t in weights.values()), default=32),
        "activation_bits": some_act.spec.bits if some_act else None,
        "activation_symmetric": bool(some_act.spec.symmetric) if some_act else False,
        "activation_granularity": "per-tensor",
        "reduce_range": reduce,
        "batchnorm_folded": bn,
        "float_nodes": dict(c.plan.float_nodes),
        "first_layer": _layer_brief(layers[0]) if layers else None,
        "last_layer": _layer_brief(layers[-1]) if layers else None,
        "bias_bits": 32,
        "bias_correction": any(t.source.get("bias_correction") for t in c.plan.tensors.values()
                               if t.role in ("bias", "value")),
        "accumulator_bits": 32,
        "graph_outputs": "float32 (not quantized)",
        "target_kernels": f"{runtime}; integer kernels used: " + (", ".join(integer) or "none (emulated)"),
    }


def _layer_brief(row: dict) -> dict:
    return {"node": row["node"], "bits": row["bits"]}


def build_card(c: CardInputs) -> dict:
    layers = _layer_rows(c)
    f = c.fidelity
    data = c.plan.config.get("data", {})
    accuracy = None
    if f is not None and f.accuracy:
        accuracy = {"float": f.accuracy["float"], "quantized": f.accuracy["quantized"],
                    # rounded: 0.9175 - 0.9125 is 0.0050000000000000044 in binary floats, and a gate
                    # at 0.5 points must pass a drop of exactly 10 in 2,000 images
                    "drop_points": round(100 * (f.accuracy["float"] - f.accuracy["quantized"]), 9)}
    card = {
        "card_version": CARD_VERSION,
        "tool": {"name": "ptqcli", "version": __version__},
        "model": {"input": dict(c.source_model), "output": _file(c.output_model), "format": "qdq" if c.native is None else "native",
                  "opset": default_opset(c.graph.model), **({} if c.native is None else {"native": c.native}),
                  **({} if c.container is None else {"container": c.container})},
        "recipe": {"quant": c.plan.config["quant"], "data": data},
        "tradeoffs": _tradeoffs(c, layers),
        "layers": layers,
        "calibration": {"kind": "synthetic" if data.get("synthetic") else "real",
                        "source": f"synthetic ({data['synthetic']})" if data.get("synthetic") else data.get("path"), "samples": int(c.plan.config.get("samples_seen", 0)),
                        "method": c.plan.config["quant"]["method"]},
        "results": {
            "evaluation": None if f is None else {"source": c.eval_source, "samples": f.samples, "held_out": f.held_out},
            "accuracy": accuracy,
            "outputs": {} if f is None else f.outputs,
            "size": c.size,
            "bops": {k: c.bops[k] for k in ("float", "quantized", "reduction")},
            "latency": c.latency,
            "kernel_ops": c.kernel_ops,
            **({"float_between_qdq": c.float_between_qdq} if c.float_between_qdq is not None else {}),
        },
    }
    validate_card(card)
    return card


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def validate_card(doc: dict, where: str = "card") -> None:
    """Raise a one-line PtqError naming the first field that breaks the schema."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        field = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise PtqError(f"{where} is not a valid quantization card: at {field}: {e.message}")


def read_card(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PtqError(f"card not found: {p}")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PtqError(f"{p} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PtqError(f"{p} is not a quantization card (not a JSON object)")
    validate_card(doc, str(p))
    return doc


def write_card(card: dict, model_path: str | Path) -> dict[str, Path]:
    from .card_render import render_markdown, render_plot

    paths = card_paths(model_path)
    write_atomic(paths["json"], (json.dumps(card, indent=1) + "\n").encode())
    write_atomic(paths["png"], render_plot(card))
    write_atomic(paths["md"], render_markdown(card, paths["png"].name).encode())
    return paths


def load_recipe(path: str | None) -> dict[str, dict]:
    """A TOML recipe with [quant] and [data] tables named like the CLI options, or a quantization
    card (JSON), whose recipe replays the run that made it."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise PtqError(f"recipe file not found: {p}")
    if p.suffix.lower() == ".json":
        return {k: dict(v) for k, v in read_card(p)["recipe"].items()}
    doc = read_toml(p, "recipe")
    unknown = sorted(set(doc) - {"quant", "data"})
    if unknown:
        raise PtqError(f"recipe {p}: unknown table(s) {', '.join(unknown)} (known: quant, data)")
    return {k: dict(v) for k, v in doc.items()}
