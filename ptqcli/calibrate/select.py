"""Which tensors get quantized: a pure function of the graph, the op registry and the config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import QuantConfig
from ..graph import Graph, subgraphs
from ..ops import LAYOUT_OPS, MATRIX_OPS, activation_slots, attr, is_fusable_activation, op_info
from ..plan import STEM_REASON, Layer


@dataclass(frozen=True)
class Selection:
    layers: list[Layer]  # nodes with a quantized constant weight
    activations: list[str]  # float tensors to observe and quantize, in graph order
    float_nodes: dict[str, str]  # node -> why it stays in float
    # Constant operands of ops whose integer kernel takes them quantized (ops.quantize_constants).
    constants: tuple[str, ...] = ()
    # Embedding tables read only by Gathers (see embedding_tables).
    embeddings: tuple[str, ...] = ()


GELU_REASON = "part of an erf GELU, which ORT runs as one float Gelu kernel (with the bias Add before it)"


def erf_gelus(g: Graph) -> list[str]:
    """The nodes of each erf GELU, y = x * 0.5 * (1 + erf(x / sqrt(2))) (or with the 0.5 first), and
    the Add of a constant vector that writes x where only the GELU reads it: ORT fuses them into one
    Gelu (BiasGelu) kernel in float, which quantizing any of their tensors would split into slower
    integer elementwise ops."""
    found = []
    for erf in (n for n in g.graph.node if n.op_type == "Erf"):
        scale = g.producer.get(erf.input[0])
        if scale is None or scale.op_type not in ("Div", "Mul") or not any(i in g.initializers for i in scale.input):
            continue
        x = next(i for i in scale.input if i not in g.initializers)
        one = g.consumers.get(erf.output[0], [])
        if len(one) != 1 or one[0].op_type != "Add":
            continue
        chain, frontier = [scale, erf, one[0]], one[0].output[0]
        while len(after := g.consumers.get(frontier, [])) == 1 and after[0].op_type == "Mul" and len(chain) < 5:
            chain.append(after[0])
            frontier = after[0].output[0]
        if len(chain) < 4:
            continue
        product = chain[3]
        other = next((i for i in product.input if i != one[0].output[0]), None)
        halved = g.producer.get(other) if other != x else None
        if halved is not None and halved.op_type == "Mul" and x in halved.input \
                and any(i in g.initializers for i in halved.input):
            chain.append(halved)  # the 0.5 taken before the product
        elif other != x:
            continue  # not x times the erf term
        bias = g.producer.get(x)
        if (bias is not None and bias.op_type == "Add" and any(i in g.initializers for i in bias.input)
                and {r.name for r in g.consumers.get(x, [])} <= {n.name for n in chain}):
            chain.insert(0, bias)
        found += [n.name for n in chain]
    return found


# Multiply-accumulates per output value below which a stem Conv stays float. Batch 1, 2 threads,
# ORT 1.32: a 3x3 Conv on a 28x28 input ran 7 us in float against 24 us quantized with one input
# channel (9); the embedded model went from 0.83x to 1.21x fp32 with its stem in float. An RGB 3x3
# stem (27) changed EfficientNet-Lite0 within noise (1.53 against 1.48 ms): it stays quantized.
STEM_MAX_DEPTH = 27


def float_stems(g: Graph) -> list[str]:
    """The Convs that read the model's float input, through no other layer, with fewer than
    STEM_MAX_DEPTH multiply-accumulates per output value: quantizing that input costs a
    QuantizeLinear and a layout Transpose before an integer kernel too shallow to win them back."""
    found = []
    for node in g.graph.node:
        weight = g.constant(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or weight.ndim < 3 or int(np.prod(weight.shape[1:])) >= STEM_MAX_DEPTH:
            continue
        if attr(node, "group", 1) == 1 and g.is_float(node.input[0]) and _reads_model_input(g, node.input[0]):
            found.append(node.name)
    return found


def _reads_model_input(g: Graph, tensor: str) -> bool:
    """True when `tensor` is computed from the graph inputs and constants without a Conv, Gemm or
    MatMul on the way (a normalisation or a layout change may come first)."""
    inputs = {i.name for i in g.graph_inputs}
    todo, seen, reached = [tensor], set(), False
    while todo:
        name = todo.pop()
        if name in seen or name in g.initializers:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            reached |= name in inputs
            continue
        if node.op_type in MATRIX_OPS or subgraphs(node):
            return False
        todo.extend(i for i in node.input if i)
    return reached


def select(g: Graph, cfg: QuantConfig, keep_float: dict[str, str] | None = None) -> Selection:
    """`keep_float`: {node: why} of nodes an earlier step needs in float (smooth.float_tails)."""
    layers: list[Layer] = []
    acts: dict[str, None] = {}  # an ordered set
    float_nodes: dict[str, str] = dict.fromkeys(erf_gelus(g), GELU_REASON) if cfg.static_acts else {}
    if cfg.static_acts:
        float_nodes.update(keep_float or {})
    if cfg.static_acts and cfg.act_bits == 8 and cfg.float_stem:
        float_nodes.update(dict.fromkeys((n for n in float_stems(g) if n not in float_nodes), STEM_REASON))
    constants: dict[str, None] = {}  # an ordered set
    excluded_nodes, excluded_ops = set(cfg.exclude_nodes), set(cfg.exclude_ops)
    outputs = set(g.output_names)
    for node in g.graph.node:
        info = op_info(node.op_type, node.domain)
        if node.name in float_nodes:
            continue
        if node.name in excluded_nodes or node.op_type in excluded_ops:
            float_nodes[node.name] = "excluded by the recipe"
            continue
        if info is None:
            if node.op_type not in LAYOUT_OPS:
                float_nodes[node.name] = f"{node.op_type} has no quantized form here"
            float_nodes.update(subgraph_layers(node, set(g.initializers)))
            continue
        weight = _constant_weight(g, node, info)
        if weight is None and info.float_without_weight and cfg.act_bits == 8:
            float_nodes[node.name] = f"{node.op_type} of two activations: no faster on 8-bit integers"
            continue
        bias = _constant_bias(g, node, info) if weight else None
        params = {weight, bias}
        act_inputs = [node.input[i] for i in activation_slots(node, info) if node.input[i] not in params]
        quantized_inputs = [n for n in act_inputs if g.is_float(n) and n not in g.initializers]
        for name in quantized_inputs:
            acts[name] = None
        # Only where ORT has 8-bit integer kernels for the op: on 16-bit targets a quantized constant
        # buys nothing on CPU and costs precision.
        if info.quantize_constants and cfg.static_acts and cfg.act_bits == 8 and quantized_inputs:
            constants.update(dict.fromkeys(n for n in act_inputs if n in g.initializers and g.is_float(n)))
        if weight:
            first_act = quantized_inputs[0] if quantized_inputs else None
            extra = tuple(node.input[slot] for slot in info.extra_weight_inputs
                          if slot < len(node.input) and _is_constant_weight(g, node.input[slot]))
            layers.append(Layer(node.name, node.op_type, first_act, weight, bias, node.output[0], extra))
        if not cfg.static_acts:
            continue
        out = node.output[0]
        # Graph outputs stay float: users get the most exact value the last op can give.
        if out in outputs:
            continue
        if info.quantize_output and g.is_float(out) and not _feeds_only_fusable(g, out, outputs):
            acts[out] = None
    if not cfg.static_acts:
        acts.clear()
    weights = {w for layer in layers for w in layer.weights}
    tables = embedding_tables(g, cfg)
    return Selection(layers, list(acts), float_nodes, tuple(c for c in constants if c not in weights | set(tables)),
                     tables)


# Smaller tables are not worth a Cast and a Mul per lookup.
MIN_EMBEDDING_VALUES = 4096


def embedding_tables(g: Graph, cfg: QuantConfig) -> tuple[str, ...]:
    """Float 2-D initializers that only Gathers read, by integer ids along rows (token and position
    embeddings): stored as int8 they take a quarter of the space, and a lookup dequantizes only the
    rows it reads."""
    if cfg.embeddings == "float" or "Gather" in cfg.exclude_ops:
        return ()
    found = []
    for name, t in g.initializers.items():
        readers = g.consumers.get(name, [])
        if (len(t.dims) != 2 or not g.is_float(name) or t.dims[0] * t.dims[1] < MIN_EMBEDDING_VALUES or not readers
                or name in g.output_names):
            continue
        if all(r.op_type == "Gather" and r.domain in ("", "ai.onnx") and r.input[0] == name and r.input[1] != name
               and int(attr(r, "axis", 0)) == 0 and not g.is_float(r.input[1]) and r.name not in cfg.exclude_nodes
               for r in readers):
            found.append(name)
    return tuple(found)


def twin_factors(weight: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """Per-row factors s with weight == s[:, None] * table.T (each to within float32 rounding of the
    product), or None: a weight [K, N] that holds an embedding table's transpose, possibly with a
    normalization's per-channel scale folded into its rows (smoothing does that)."""
    if weight.shape != table.shape[::-1]:
        return None
    rows = table.T
    peak = np.argmax(np.abs(rows), axis=1)
    pivot = rows[np.arange(len(rows)), peak]
    if not np.all(pivot):
        return None
    factors = (weight[np.arange(len(rows)), peak] / pivot).astype(np.float32)
    scaled = factors[:, None] * rows
    return factors if np.allclose(weight, scaled, rtol=1e-6, atol=0) else None


def transposed_twin(g: Graph, table: str, layers: list[Layer]) -> str | None:
    """The weight of a MatMul layer that holds the transpose of embedding `table` (an output
    projection tied to the token embeddings, exported as its own copy), up to per-row factors
    (twin_factors), or None."""
    dims = tuple(g.initializers[table].dims)
    candidates = [layer.weight for layer in layers if layer.op_type == "MatMul" and layer.weight in g.initializers
                  and tuple(g.initializers[layer.weight].dims) == dims[::-1]]
    if not candidates:
        return None
    values = g.constant(table)
    return next((w for w in candidates if twin_factors(g.constant(w), values) is not None), None)


def subgraph_layers(node, constants: set[str], path: str = "") -> dict[str, str]:
    """Ops with a constant weight inside a control-flow node's subgraphs (If branches, Loop and
    Scan bodies), by path, with why they stay float: their activations cannot be observed from
    outside, and a weight-only grid there would only add a dequantization to every run."""
    found = {}
    where = f"{path}{node.name}"
    for sub in subgraphs(node):
        inner_constants = constants | {t.name for t in sub.initializer}
        for inner in sub.node:
            info = op_info(inner.op_type, inner.domain)
            slot = info.weight_input if info is not None else None
            if slot is not None and slot < len(inner.input) and inner.input[slot] in inner_constants:
                found[f"{where}/{sub.name}/{inner.name or inner.op_type}"] = (
                    f"{inner.op_type} inside {node.op_type} '{node.name}': subgraphs stay in float")
            found.update(subgraph_layers(inner, inner_constants, f"{where}/{sub.name}/"))
    return found


def _constant_weight(g: Graph, node, info) -> str | None:
    slot = info.weight_input
    if slot is None or slot >= len(node.input):
        return None
    name = node.input[slot]
    return name if _is_constant_weight(g, name) else None


def _is_constant_weight(g: Graph, name: str) -> bool:
    return name in g.initializers and g.is_float(name) and len(g.initializers[name].dims) >= 2


def _constant_bias(g: Graph, node, info) -> str | None:
    slot = info.bias_input
    if slot is None or slot >= len(node.input) or not node.input[slot]:
        return None
    name = node.input[slot]
    b = g.constant(name)
    return name if b is not None and b.ndim == 1 and g.is_float(name) else None


def _feeds_only_fusable(g: Graph, tensor: str, graph_outputs: set[str]) -> bool:
    """A Conv output read only by Relu/Clip: ORT fuses the activation, so quantize after it."""
    if tensor in graph_outputs:
        return False
    users = g.consumers.get(tensor, [])
    return bool(users) and all(is_fusable_activation(u) for u in users)

