"""Weight-only quantization of a model whose weights are never all in memory at once.

The graph is read without its weight data. Each MatMul weight is read from disk, quantized into
blocks, packed as MatMulNBits and appended to the output's data file before the next one is read;
token embedding tables become int8 rows the same way, and every other tensor is copied through.
Peak memory is one weight and its codes whatever the model's size, so a model over protobuf's
2 GB, or larger than the machine's memory, quantizes.

With calibration data the weights are rounded by GPTQ (calibrate/gptq.walk) on the way: the
calibration batches run through the model segment by segment, each segment built from the weights
on disk (and the rounded ones of the layers before it) when the walk reaches it, and each group of
layers is packed and written as soon as it is rounded. Memory is then one segment's weights, one
group's Hessian and weights, and the batches' activations (past a budget, in scratch files).
Smoothing factors chosen on the walk are folded into the normalizations' parameters, which stay
in memory until the end (they are vectors). Static activations hold the model in memory and are
not done here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto

from ..calibrate.planner import configured_formats, fitted_weight, quantize_embedding
from ..calibrate.select import select
from ..config import DataConfig, QuantConfig, Rounding, to_jsonable
from ..errors import PtqError
from ..formats import NBITS_WIDTHS, parse_weight_format
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
    if data.synthetic is not None:
        return "--synthetic data (it is made from BatchNorm statistics of a model held in memory)"
    if data.feedback:
        return "--feedback (each step runs the float model whole)"
    if quant.acts.value != "none":
        return f"--acts {quant.acts.value} (streaming is weight-only: --acts none)"
    if data.path is None and quant.rounding.value not in ("nearest", "auto"):  # auto without data is nearest
        return f"--rounding {quant.rounding.value} without calibration data (streaming rounds to nearest, or by GPTQ with --data)"
    if data.path is not None and quant.rounding.value not in ("gptq", "auto"):
        return f"--rounding {quant.rounding.value} with calibration data (streaming rounds by GPTQ: --rounding gptq)"
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
    fidelity: object = None  # what the caller's `measure` gave (stages: a Fidelity on --eval-data)
    optimized: ModelProto | None = None  # the graph ORT runs, without weights


def stream_quantize(model_path: str | Path, out_path: str | Path, quant: QuantConfig, data: DataConfig,
                    progress: Progress = silent, measure: Callable | None = None) -> Streamed:
    """Quantize the MatMul weights of `model_path` into MatMulNBits blocks, reading and writing one
    tensor at a time (rounded by GPTQ when `data` has a path). Before the model replaces `out_path`
    (with its `.data` file beside it) it is checked by onnx.checker, loaded by ORT, and given to
    `measure(graph, path, plan, cuts, kernel_ops)` when that is given (the source graph without
    weights, the written file, the plan, the tensors to cut a float run at, the op types ORT runs),
    whose result is the Streamed's fidelity."""
    problem = streaming_problem(quant, data, "qdq")
    if problem is not None:
        raise PtqError(f"cannot stream this quantization: {problem}")
    by_gptq = data.path is not None
    quant = replace(quant, rounding=Rounding.gptq if by_gptq else Rounding.nearest)  # what auto resolves to
    target = Path(out_path)
    check_writable(target)
    source = load_model(model_path, weights=False)
    check_model(Path(model_path), Path(model_path).name)  # else a broken input reads as a broken output
    g = Graph(source, source=str(model_path), weights_dir=str(Path(model_path).parent))
    sel = select(g, quant)
    layers, float_nodes = _packable(g, sel.layers)
    if by_gptq and not layers:
        raise PtqError("--rounding gptq found no MatMul layer with a [K, N] weight to round")
    formats = configured_formats(g, sel, quant)
    tables = set(sel.embeddings) - {layer.weight for layer in layers.values()}
    if not layers and not tables:
        why = "; ".join(sorted(set(float_nodes.values()))) or "the model has no MatMul or Gemm with a constant weight"
        raise PtqError(f"nothing to stream: {why} (--no-stream quantizes other layers)")
    by_weight = {layer.weight: layer for layer in layers.values()}
    replaced: dict[str, list[NodeProto]] = {}
    tensors: dict[str, TensorQuant] = {}
    walk = _gptq_walk(g, list(layers.values()), formats, quant, data, progress) if by_gptq else None
    out = walk.out if walk else shell(g.model)

    def initializers():
        if walk is not None:
            for layer, tq in walk.rounded():
                inits, node = nbits.matmul_nbits(g.node_by_name[layer.node], layer, tq, tq.value, quant.accuracy_level)
                tensors[layer.weight], replaced[layer.node] = _summary(tq), [node]
                yield from inits
        kept = {t.name for t in out.graph.initializer}  # written from the output model below (smoothed)
        with progress("writing weights" if walk else "quantizing weight by weight", len(g.graph.initializer)) as advance:
            for t in g.graph.initializer:
                if t.name in tensors or t.name in kept:
                    pass
                elif t.name in by_weight:
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
        yield from out.graph.initializer

    with staged(target) as path:
        stubs = write_tensors(initializers(), path.parent / (target.name + ".data"))
        nodes = [new for node in out.graph.node for new in _replacing(node, replaced.get(node.name))]
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        del out.graph.initializer[:]
        out.graph.initializer.extend(stubs)
        import_domain(out, "com.microsoft")
        path.write_bytes(out.SerializeToString(deterministic=True))
        check_model(path, "the quantized model")
        optimized = optimized_graph(str(path), session_options(out), "the quantized model")
        config = {"quant": to_jsonable(quant), "data": to_jsonable(data), "prepare": {}, "streamed": True,
                  "samples_seen": walk.samples if walk else 0,
                  "rounding_choice": "calibration data: gptq" if walk else "no calibration data: nearest"}
        plan_layers = sel.layers
        if walk is not None and walk.smoothing:
            config["smoothing"] = walk.smoothing
            plan_layers = [replace(layer, activation=walk.reads.get(layer.node, layer.activation)) for layer in plan_layers]
        plan = Plan(tensors, plan_layers, {**sel.float_nodes, **float_nodes}, config)
        kernel_ops = optimized_op_counts(optimized=optimized)
        cuts = [layer.activation for layer in layers.values()]
        fidelity = None if measure is None else measure(g, path, plan, cuts, kernel_ops)
    return Streamed(plan, g, kernel_ops, fidelity, optimized)


def _replacing(node: NodeProto, replacement: list[NodeProto] | None) -> list[NodeProto]:
    """What the output model runs for `node`: itself, or its replacement; a MatMulNBits reads what
    the node reads now (smoothing may have renamed its input)."""
    if replacement is None:
        return [node]
    if len(replacement) == 1 and replacement[0].op_type == "MatMulNBits":
        replacement[0].input[0] = node.input[0]
    return replacement


@dataclass
class _GptqWalk:
    """GPTQ over a model read from disk (see the module's docstring). `out` is the output model
    without weights but for the smoothing groups' parameters, which the walk divides by its
    factors; `rounded()` runs the walk, yielding each layer as soon as it is rounded."""

    g: Graph
    readers: dict[str, list]
    formats: dict[str, str]  # weight -> its format, where the config sets one apart
    groups: dict
    quant: QuantConfig
    data: DataConfig
    samples: int
    out: ModelProto
    progress: Progress
    smoothing: dict = field(default_factory=dict)  # tensor -> the smoothing choice's report
    reads: dict = field(default_factory=dict)      # node -> the tensor it reads once smoothed

    def _grids(self, layers: list) -> list[TensorQuant]:
        """The grids the layers are rounded onto: their formats' (GPTQ fits the scales again)."""
        return [_summary(_fitted(self.g, layer, self.formats.get(layer.weight), self.quant)[0]) for layer, _ in layers]

    def rounded(self):
        from ..calibrate.data import iter_batches, model_inputs
        from ..calibrate.gptq import GptqConfig, walk
        from ..calibrate.segments import BatchStates
        from ..calibrate.smooth import fold_tail

        g, pending, chosen = self.g, {}, {}

        def current(name: str) -> np.ndarray | None:
            # Each rounded weight is read by the one segment after its layer, built once: dropped then.
            return pending.pop(name, None)

        batches = list(iter_batches(self.data.path, model_inputs(g), self.data, limit=self.samples, model=g.model))
        self.samples = sum(b.size for b in batches)  # what was read: the data may hold fewer
        states = BatchStates([b.feeds for b in batches])
        del batches
        cfg = GptqConfig(act_order=self.quant.act_order)
        with self.progress("gptq: layers", len(self.readers)) as advance:
            for step in walk(g, g, self.readers, states, self._grids,
                             current, self.groups, self.quant, cfg, advance):
                if step.smoothing is not None:
                    self.smoothing[step.tensor] = step.smoothing
                if step.factors is not None:
                    chosen[step.tensor] = step.factors
                for (layer, _), tq, value in zip(step.layers, step.tqs, step.computed()):
                    pending[layer.weight] = value
                    yield layer, tq
        for tensor, s in chosen.items():
            fold_tail(self.out, g, self.groups[tensor], s)
        gemms = {layer.node for group in self.readers.values() for layer, _ in group if layer.activation in chosen}
        self.reads = {node.name: node.input[0] for node in self.out.graph.node if node.name in gemms}


def _gptq_walk(g: Graph, layers: list[Layer], formats: dict[str, str], quant: QuantConfig, data: DataConfig,
               progress: Progress) -> _GptqWalk:
    """The walk over the packable `layers`, grouped by the tensor they read; the output model holds
    the parameters of the smoothing groups it may fold factors into."""
    from ..calibrate.smooth import smoothing_groups
    from ..calibrate.gptq import smoothing_groups_rounded

    readers: dict[str, list] = {}
    for layer in layers:
        readers.setdefault(layer.activation, []).append((layer, 0))  # MatMul weights [K, N]
    groups = smoothing_groups_rounded(smoothing_groups(g) if quant.smooth else [], readers)
    params = sorted({g.node_by_name[node].input[slot] for grp in groups.values() for node, slot in grp.params})
    out = shell(g.model, [with_data(g.initializers[name], g.weights_dir) for name in params])
    return _GptqWalk(g, readers, formats, groups, quant, data, min(data.num_samples, quant.rounding_samples), out,
                     progress)


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


def _fitted(g: Graph, layer: Layer, fmt: str | None, quant: QuantConfig) -> tuple[TensorQuant, np.ndarray]:
    """The layer's weight read from disk and fitted to nearest on its format's grid, as the
    in-memory plan fits it, and the weight."""
    w = g.constant(layer.weight)
    tq = fitted_weight(g.node_by_name[layer.node], w, quant, fmt)
    if not nbits.takes(layer, tq, w):
        raise PtqError(f"layer {layer.node}: {tq.spec.label} weights have no MatMulNBits form")
    return tq, w


def _packed(g: Graph, layer: Layer, fmt: str | None, quant: QuantConfig
            ) -> tuple[list[TensorProto], TensorQuant, NodeProto]:
    """The layer's weight fitted to nearest (`_fitted`), packed for MatMulNBits."""
    tq, w = _fitted(g, layer, fmt, quant)
    inits, packed = nbits.matmul_nbits(g.node_by_name[layer.node], layer, tq, w, quant.accuracy_level)
    return inits, _summary(tq), packed


def _summary(tq: TensorQuant) -> TensorQuant:
    """What the card reads of a quantized tensor (format, fit): its scales, zero points and rounded
    values are in the written model, and a language model's would take hundreds of MB to keep."""
    none = np.zeros((0,), dtype=np.float32)
    return replace(tq, scale=none, zero_point=none.astype(np.int64), value=None, source={**tq.source, "sparsity": None})

