"""Weight-only quantization of a model whose weights are never all in memory at once.

The graph is read without its weight data. Each MatMul weight is read from disk, quantized into
blocks, packed as MatMulNBits and appended to the output's data file before the next one is read;
token embedding tables become int8 rows the same way, and every other tensor is copied through.
Peak memory is one weight and its codes whatever the model's size, so a model over protobuf's
2 GB, or larger than the machine's memory, quantizes. What needs activations (calibration data,
GPTQ, smoothing, static activations) holds the model in memory and is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from onnx import NodeProto, TensorProto

from ..calibrate.planner import configured_formats, quantize_embedding, quantize_weight, weight_axis, weight_spec
from ..calibrate.select import select
from ..config import DataConfig, QuantConfig, Rounding, to_jsonable
from ..errors import PtqError
from ..formats import NBITS_WIDTHS, format_block_size, parse_weight_format
from ..files import check_writable
from ..graph import Graph, check_model, import_domain, load_model, shell, staged, with_data, write_tensors
from ..plan import Layer, Plan, TensorQuant
from ..progress import Progress, silent
from ..runtime import optimized_graph, optimized_op_counts, session_options
from . import nbits
from .qdq import embedding_lookup, embedding_table

# Past this a model is streamed by default: protobuf cannot hold it as one message, and the
# in-memory pipeline would need several copies of it.
STREAM_BYTES = 2 * 2**30


def stored_bytes(path: str | Path) -> int:
    """The model file's size plus the external data files its tensors refer to."""
    p = Path(path)
    model = load_model(p, weights=False)
    files = {entry.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return p.stat().st_size + sum((p.parent / f).stat().st_size for f in files if (p.parent / f).is_file())


def streaming_problem(quant: QuantConfig, data: DataConfig, fmt: str) -> str | None:
    """Why this configuration cannot be streamed weight by weight (None: it can)."""
    scheme, bits = parse_weight_format(quant.weights)
    if data.path is not None or data.synthetic is not None:
        return "calibration data (streaming quantizes weights alone, without data)"
    if quant.acts.value != "none":
        return f"--acts {quant.acts.value} (streaming is weight-only: --acts none)"
    if quant.rounding.value not in ("nearest", "auto"):  # auto without data is nearest
        return f"--rounding {quant.rounding.value} (it needs calibration data; streaming rounds to nearest)"
    if quant.block_size is None:
        return "per-channel weights (streaming writes MatMulNBits: give --block-size)"
    if scheme != "int" or bits not in NBITS_WIDTHS:
        return f"--weights {quant.weights} (MatMulNBits stores 2, 4 or 8-bit integers)"
    if fmt != "qdq":
        return f"--format {fmt} (streaming writes MatMulNBits, --format qdq)"
    return None


@dataclass(frozen=True)
class Streamed:
    plan: Plan                 # what was done, for the card (no run directory is written)
    graph: Graph               # the source graph, without its weight data
    kernel_ops: dict[str, int]  # op types of the graph ORT runs, from loading the written model


def stream_quantize(model_path: str | Path, out_path: str | Path, quant: QuantConfig, data: DataConfig,
                    progress: Progress = silent) -> Streamed:
    """Quantize the MatMul weights of `model_path` into MatMulNBits blocks, reading and writing one
    tensor at a time; the model is checked by onnx.checker and loaded by ORT before it replaces
    `out_path` (with its `.data` file beside it)."""
    problem = streaming_problem(quant, data, "qdq")
    if problem is not None:
        raise PtqError(f"cannot stream this quantization: {problem}")
    quant = replace(quant, rounding=Rounding.nearest)  # what auto is without data
    target = Path(out_path)
    check_writable(target)
    g = Graph(load_model(model_path, weights=False), source=str(model_path), weights_dir=str(Path(model_path).parent))
    sel = select(g, quant)
    layers, float_nodes = _packable(g, sel.layers)
    formats = configured_formats(g, sel, quant)
    tables = set(sel.embeddings) - {layer.weight for layer in layers.values()}
    by_weight = {layer.weight: layer for layer in layers.values()}
    replaced: dict[str, list[NodeProto]] = {}
    tensors: dict[str, TensorQuant] = {}

    def initializers():
        with progress("quantizing weight by weight", len(g.graph.initializer)) as advance:
            for t in g.graph.initializer:
                if t.name in by_weight:
                    layer = by_weight[t.name]
                    inits, tensors[t.name], node = _packed(g, layer, formats.get(t.name), quant)
                    replaced[layer.node] = [node]
                    yield from inits
                elif t.name in tables:
                    table = g.constant(t.name)
                    tq = quantize_embedding(table, quant)
                    inits, names = embedding_table(t.name, tq, table)
                    del table
                    tensors[t.name] = _summary(tq)
                    for reader in g.consumers[t.name]:
                        replaced[reader.name] = embedding_lookup(reader, names)
                    yield from inits
                else:
                    yield with_data(t, g.weights_dir)
                advance(1)

    out = shell(g.model)
    with staged(target) as path:
        stubs = write_tensors(initializers(), path.parent / (target.name + ".data"))
        nodes = [new for node in out.graph.node for new in replaced.get(node.name, [node])]
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(stubs)
        import_domain(out, "com.microsoft")
        path.write_bytes(out.SerializeToString(deterministic=True))
        check_model(path, "the quantized model")
        optimized = optimized_graph(str(path), session_options(out), "the quantized model")
    config = {"quant": to_jsonable(quant), "data": to_jsonable(data), "prepare": {}, "samples_seen": 0,
              "streamed": True}
    plan = Plan(tensors, sel.layers, {**sel.float_nodes, **float_nodes}, config)
    return Streamed(plan, g, optimized_op_counts(optimized=optimized))


def _packable(g: Graph, layers: list[Layer]) -> tuple[dict[str, Layer], dict[str, str]]:
    """{node: layer} of the MatMuls whose [K, N] weight only they read (with A as their first
    input, the layout MatMulNBits takes), and why each other layer stays float."""
    found, stays = {}, {}
    for layer in layers:
        node = g.node_by_name[layer.node]
        if layer.op_type != "MatMul" or len(g.initializers[layer.weight].dims) != 2 or node.input[1] != layer.weight:
            stays[layer.node] = f"{layer.op_type}: streaming writes MatMulNBits for MatMul weights [K, N] only"
        elif len(g.consumers[layer.weight]) > 1:
            stays[layer.node] = "its weight is read by other nodes too (streaming keeps the float copy)"
        else:
            found[layer.node] = replace(layer, activation=node.input[0])
    return found, stays


def _packed(g: Graph, layer: Layer, fmt: str | None, quant: QuantConfig
            ) -> tuple[list[TensorProto], TensorQuant, NodeProto]:
    """The layer's weight read from disk and quantized as the in-memory plan would (same spec,
    same fit), packed for MatMulNBits."""
    node = g.node_by_name[layer.node]
    w = g.constant(layer.weight)
    axis, block = weight_axis(node, w, quant, format_block_size(fmt) if fmt else None)
    scheme, bits = parse_weight_format(fmt) if fmt else (None, None)
    tq = quantize_weight(w, weight_spec(quant, axis, bits, scheme, block), quant.weight_method.value)
    if not nbits.takes(layer, tq, w):
        raise PtqError(f"layer {layer.node}: {tq.spec.label} weights have no MatMulNBits form")
    inits, packed = nbits.matmul_nbits(node, layer, tq, w, quant.accuracy_level)
    return inits, _summary(tq), packed


def _summary(tq: TensorQuant) -> TensorQuant:
    """What the card reads of a quantized tensor (format, fit): its scales and zero points are in
    the written model, and a language model's would take hundreds of MB to keep."""
    none = np.zeros((0,), dtype=np.float32)
    return replace(tq, scale=none, zero_point=none.astype(np.int64), source={**tq.source, "sparsity": None})

