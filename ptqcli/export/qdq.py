"""Plan -> QDQ model: QuantizeLinear/DequantizeLinear pairs that stock ONNX Runtime runs.

Weights and biases become integer initializers behind a DequantizeLinear; activations get a
QuantizeLinear -> DequantizeLinear pair right after their producer, and their readers read the
dequantized value. ORT's graph optimizer then fuses DQ -> Conv -> Q into its integer kernels.
Graph outputs keep their names and stay in float.

With dynamic activations (`--acts dynamic`) a MatMul layer with 8-bit weights becomes
DynamicQuantizeLinear (once per input tensor) -> MatMulInteger -> Cast -> Mul by the product of the
two scales: the pattern ORT fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat. Other layers
keep their weights behind a DequantizeLinear (weight-only).

Block-wise weights of weight-only MatMuls become MatMulNBits (export/nbits.py) unless the export
must use standard ops only (`contrib_ops=False`): then opset-21 block-wise DequantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from ..errors import PtqError
from ..graph import (Graph, check_output, default_opset, import_domain, make_initializer, set_opset, shell, outer_reads, subgraph_reads, subgraphs,
                     without_weight_data)
from ..calibrate.select import twin_factors
from ..ops import attr
from ..plan import Layer, Plan, TensorQuant
from ..quant import codes, quantize
from . import binarize, nbits
from ..formats import QuantSpec, indexable

# DequantizeLinear of int4/uint4 needs opset 21.
INT4_OPSET = 21


class QdqNames(NamedTuple):
    """What the QDQ export names around a quantized tensor: the native export finds them here."""

    quantized: str
    scale: str
    zero_point: str
    dequantized: str


def qdq_names(tensor: str) -> QdqNames:
    return QdqNames(*(f"{tensor}_{part}" for part in QdqNames._fields))


def onnx_int_type(spec: QuantSpec) -> int:
    table = {
        (4, True): TensorProto.INT4,
        (4, False): TensorProto.UINT4,
        (8, True): TensorProto.INT8,
        (8, False): TensorProto.UINT8,
        (16, True): TensorProto.INT16,
        (32, True): TensorProto.INT32,
    }
    return table[(spec.storage_bits, spec.signed)]


def _numpy_int_type(spec: QuantSpec):
    return {4: np.int8, 8: np.int8, 16: np.int16, 32: np.int32}[spec.storage_bits] if spec.signed else np.uint8


def _int_tensor(name: str, values: np.ndarray, spec: QuantSpec) -> TensorProto:
    return make_initializer(name, values.astype(_numpy_int_type(spec)), onnx_int_type(spec))


def _scale_zp(prefix: str, tq: TensorQuant) -> list[TensorProto]:
    names = qdq_names(prefix)
    return [
        numpy_helper.from_array(np.asarray(tq.scale, dtype=np.float32), names.scale),
        _int_tensor(names.zero_point, np.asarray(tq.zero_point), tq.spec),
    ]


def _axis_attrs(tq: TensorQuant) -> dict:
    if tq.spec.axis is None:
        return {}
    return {"axis": tq.spec.axis, **({"block_size": tq.spec.block_size} if tq.spec.block_size else {})}


def _dequantize_node(name: str, tq: TensorQuant) -> NodeProto:
    names = qdq_names(name)
    return helper.make_node(
        "DequantizeLinear", [names.quantized, names.scale, names.zero_point], [names.dequantized],
        name=f"{name}_DequantizeLinear", **_axis_attrs(tq),
    )


def _constant_qdq(name: str, tq: TensorQuant, value: np.ndarray) -> tuple[list[TensorProto], NodeProto]:
    if tq.spec.float_zero:
        raise PtqError(f"weight {name} has float zero points, which only MatMulNBits takes: export with --format qdq "
                       "(the default), or calibrate without --float-zero-points")
    q = quantize(value, tq.scale, tq.zero_point, tq.spec)
    inits = [_int_tensor(qdq_names(name).quantized, q, tq.spec), *_scale_zp(name, tq)]
    return inits, _dequantize_node(name, tq)


def _activation_qdq(name: str, tq: TensorQuant) -> tuple[list[TensorProto], list[NodeProto]]:
    names = qdq_names(name)
    quant = helper.make_node(
        "QuantizeLinear", [name, names.scale, names.zero_point], [names.quantized],
        name=f"{name}_QuantizeLinear", **_axis_attrs(tq),
    )
    return _scale_zp(name, tq), [quant, _dequantize_node(name, tq)]


def dynamic_layers(g: Graph, plan: Plan) -> dict[str, Layer]:
    """{node: layer} of the MatMuls that run on integers quantized at run time: 8-bit integer
    weights of shape [K, N] and a float input the plan leaves unquantized."""
    if plan.quant.acts.value != "dynamic":
        return {}
    found = {}
    for layer in plan.layers:
        tq = plan.tensors.get(layer.weight)
        w = g.constant(layer.weight)
        if (layer.op_type == "MatMul" and tq is not None and tq.spec.scheme == "int" and tq.spec.storage_bits == 8
                and tq.spec.block_size is None and w is not None and w.ndim == 2 and layer.activation and layer.activation not in plan.tensors
                and g.is_float(layer.activation)):
            found[layer.node] = layer
    return found


# Attention attributes QAttention takes as they are; an Attention with any other (unequal
# qkv_hidden_sizes, a relative position bias input, ...) stays float.
QATTENTION_ATTRIBUTES = frozenset({"num_heads", "unidirectional", "do_rotary", "mask_filter_value", "scale"})


def attention_layers(g: Graph, plan: Plan) -> dict[str, Layer]:
    """{node: layer} of the fused Attention ops (com.microsoft) that become QAttention: 8-bit
    integer QKV weights with one scale per tensor or column, a float input, at most the input,
    weight, bias and mask_index inputs, and attributes QAttention knows."""
    found = {}
    for layer in plan.layers:
        node = g.node_by_name[layer.node]
        tq = plan.tensors.get(layer.weight)
        if not (node.domain == "com.microsoft" and node.op_type == "Attention" and tq is not None
                and tq.spec.scheme == "int" and tq.spec.storage_bits == 8 and tq.spec.block_size is None
                and layer.activation and g.is_float(layer.activation)):
            continue
        if len([i for i in node.input[4:] if i]) or {a.name for a in node.attribute} - QATTENTION_ATTRIBUTES:
            continue
        if plan.quant.acts.value == "dynamic" or plan.tensors.get(layer.activation, None) is not None:
            found[layer.node] = layer
    return found


def _qattention(node: NodeProto, layer: Layer, plan: Plan) -> NodeProto:
    """QAttention on the input quantized by the plan (or at run time: _dynamic_input's names) and
    the integer QKV weight."""
    x, w = layer.activation, qdq_names(layer.weight)
    if x in plan.tensors:
        names = qdq_names(x)
        x_q, x_scale, x_zero = names.quantized, names.scale, names.zero_point
    else:
        x_q, x_scale, x_zero = _dynamic_names(x)
    mask = node.input[3] if len(node.input) > 3 else ""
    inputs = [x_q, w.quantized, node.input[2], x_scale, w.scale, mask, x_zero, w.zero_point]
    attention = helper.make_node("QAttention", inputs, list(node.output), name=node.name, domain="com.microsoft")
    attention.attribute.extend(node.attribute)
    return attention


@dataclass(frozen=True)
class EmbeddingTable:
    """The names a quantized embedding table is stored under, and how its lookups read it."""

    codes: str
    scales: str
    zero_points: str | None = None
    block_size: int | None = None  # blocks along each row, read by GatherBlockQuantized
    bits: int = 8


def embedding_table(name: str, tq: TensorQuant, table: np.ndarray) -> tuple[list[TensorProto], EmbeddingTable]:
    """The table's codes and scales: int8 rows with their scales as a [rows, 1] column, or int4
    blocks packed two to a byte, low nibble first, on the unsigned code scale (GatherBlockQuantized's
    layout, as MatMulNBits'), with [rows, blocks] scales and packed zero points."""
    stored = EmbeddingTable(qdq_names(name).quantized, f"{name}_row_scale")
    q = codes(table, tq.scale, tq.zero_point, tq.spec, np.int16)
    if tq.spec.block_size is None:
        column = np.asarray(tq.scale, dtype=np.float32).reshape(-1, 1)
        return [_int_tensor(stored.codes, q, tq.spec), numpy_helper.from_array(column, stored.scales)], stored
    offset = 1 << (tq.spec.bits - 1)
    inits = [numpy_helper.from_array(nbits.pack_rows((q + offset).astype(np.uint8), tq.spec.bits), stored.codes),
             numpy_helper.from_array(np.asarray(tq.scale, dtype=np.float32), stored.scales)]
    zero_points = None
    if not tq.spec.symmetric:  # without them GatherBlockQuantized takes the middle code, a symmetric grid's
        zero_points = f"{name}_zero_points"
        inits.append(numpy_helper.from_array(nbits.packed_zero_points(np.asarray(tq.zero_point).T, tq.spec),
                                             zero_points))
    return inits, replace(stored, zero_points=zero_points, block_size=tq.spec.block_size, bits=tq.spec.bits)


def embedding_lookup(node: NodeProto, table: EmbeddingTable) -> list[NodeProto]:
    """Only the rows looked up are dequantized (a DequantizeLinear of the table would rebuild all of
    it in float): int8 rows gathered with their scales and multiplied, or int4 blocks by ORT's
    GatherBlockQuantized."""
    ids, y = node.input[1], node.output[0]
    n = helper.make_node
    if table.block_size is not None:
        inputs = [table.codes, ids, table.scales] + ([table.zero_points] if table.zero_points else [])
        return [n("GatherBlockQuantized", inputs, [y], name=node.name, domain="com.microsoft",
                  block_size=table.block_size, gather_axis=0, quantize_axis=1, bits=table.bits)]
    return [
        n("Gather", [table.codes, ids], [f"{y}_codes"], name=f"{node.name}_codes", axis=0),
        n("Cast", [f"{y}_codes"], [f"{y}_codes_float"], name=f"{node.name}_cast", to=TensorProto.FLOAT),
        n("Gather", [table.scales, ids], [f"{y}_row_scale"], name=f"{node.name}_row_scale", axis=0),
        n("Mul", [f"{y}_codes_float", f"{y}_row_scale"], [y], name=node.name),
    ]


def tied_tables(g: Graph, plan: Plan, packed: dict[str, Layer]) -> dict[str, tuple[str, np.ndarray]]:
    """{table: (weight, factors)} of the embedding tables planned tied to a weight that MatMulNBits
    stores on the same grid, and still its transpose up to the per-row factors a smoothing folded
    into it (select.twin_factors): their lookups read that weight's codes. Any other table is
    stored on its own grid."""
    stored = {layer.weight for layer in packed.values()}
    found = {}
    for name, tq in plan.of_role("embedding").items():
        weight = tq.source.get("tied_to")
        if weight in stored and replace(plan.tensors[weight].spec, axis=1) == tq.spec:
            factors = twin_factors(g.constant(weight), g.constant(name))
            if factors is not None:
                found[name] = (weight, factors)
    return found


def nbits_layers(g: Graph, plan: Plan) -> dict[str, Layer]:
    """{node: layer} of the weight-only MatMuls whose block-wise weights MatMulNBits stores."""
    found = {}
    for layer in plan.layers:
        tq, w = plan.tensors.get(layer.weight), g.constant(layer.weight)
        if (tq is not None and w is not None and nbits.takes(layer, tq, w) and layer.activation
                and layer.activation not in plan.tensors):
            found[layer.node] = layer
    return found


def _dynamic_names(tensor: str) -> tuple[str, str, str]:
    """The codes, scale and zero point DynamicQuantizeLinear writes for `tensor`."""
    return tuple(f"{tensor}_dynamic_{p}" for p in ("quantized", "scale", "zero_point"))


def _dynamic_input(tensor: str) -> list[NodeProto]:
    return [helper.make_node("DynamicQuantizeLinear", [tensor], list(_dynamic_names(tensor)),
                             name=f"{tensor}_DynamicQuantizeLinear")]


def _dynamic_matmul(node: NodeProto, layer: Layer) -> list[NodeProto]:
    """MatMulInteger on the run-time-quantized input and the integer weight, rescaled to float."""
    x, w, y = layer.activation, qdq_names(layer.weight), node.output[0]
    x_q, x_scale, x_zero = _dynamic_names(x)
    n = helper.make_node
    return [
        n("MatMulInteger", [x_q, w.quantized, x_zero, w.zero_point],
          [f"{y}_int32"], name=f"{node.name}_MatMulInteger"),
        n("Cast", [f"{y}_int32"], [f"{y}_int32_float"], name=f"{node.name}_Cast", to=TensorProto.FLOAT),
        n("Mul", [x_scale, w.scale], [f"{y}_scale"], name=f"{node.name}_scale"),
        n("Mul", [f"{y}_int32_float", f"{y}_scale"], [y], name=f"{node.name}_rescale"),
    ]


def required_opset(model: ModelProto, plan: Plan, packed: frozenset = frozenset()) -> int:
    """int4, int16 and block-wise DequantizeLinear arrived in opset 21, and so did Casts of the 4-bit
    indices level-set codes may be stored as (`packed` weights go to MatMulNBits instead, and
    embedding tables to Gather or GatherBlockQuantized)."""
    needs_21 = any(t.spec.storage_bits in (4, 16) or t.spec.block_size or indexable(t.spec)
                   for name, t in plan.tensors.items() if name not in packed and t.role != "embedding")
    return max(default_opset(model), INT4_OPSET if needs_21 else 13)


def export_qdq(g: Graph, plan: Plan, contrib_ops: bool = True) -> ModelProto:
    """`contrib_ops=False` keeps to standard ONNX ops (no MatMulNBits)."""
    packed = nbits_layers(g, plan) if contrib_ops else {}
    opset = required_opset(g.model, plan, frozenset(l.weight for l in packed.values()))
    # Built from the weightless shell: the float weights that stay are copied once, at the end, and
    # the quantized ones never (a language model's float copy would double peak memory). The opset
    # converter sees the weights' names, types and shapes only; what it adds is kept.
    if opset > default_opset(g.model):
        light, stubs = without_weight_data(g.model)
        converted = set_opset(light, opset)
        model = shell(converted)
        initializers = {t.name: t for t in converted.graph.initializer if t.name not in stubs}
        initializers.update((t.name, t) for t in g.model.graph.initializer if t.name in stubs)
    else:
        model = shell(g.model)
        initializers = {t.name: t for t in g.model.graph.initializer}
    excluded = {name for name in plan.float_nodes if plan.reads_float_inputs(name)}
    new_inits: list[TensorProto] = []
    head: list[NodeProto] = []
    after: dict[str, list[NodeProto]] = {}
    rewire: dict[str, str] = {}
    producers = {out for n in model.graph.node for out in n.output}
    dynamic = dynamic_layers(g, plan)
    attentions = attention_layers(g, plan)
    # A weight only integer kernels read needs no DequantizeLinear: MatMulInteger and QAttention take its codes.
    direct = {**dynamic, **packed, **attentions}
    integer_only = {layer.weight for layer in direct.values()} - {
        layer.weight for layer in plan.layers if layer.node not in direct}
    quantized_inputs: set[str] = set()
    # Subgraphs read weights by name from the enclosing graph and are not rewired: they keep the float copy.
    read_inside = set().union(*(subgraph_reads(n) for n in model.graph.node))
    embeddings = {}
    tied = tied_tables(g, plan, packed)
    for name, tq in plan.tensors.items():
        if tq.role == "embedding":
            if name in tied:
                initializers.pop(name)
                continue
            inits, embeddings[name] = embedding_table(name, tq, numpy_helper.to_array(initializers.pop(name)))
            new_inits += inits
            continue
        if tq.role == "value":
            if name in initializers:
                shape = tuple(initializers[name].dims)
                initializers[name] = numpy_helper.from_array(tq.value.reshape(shape).astype(np.float32), name)
            continue
        if tq.role in ("weight", "bias", "constant"):
            if name not in initializers:
                raise PtqError(f"plan names weight '{name}', which the model does not have")
            original = numpy_helper.to_array(initializers[name] if name in read_inside else initializers.pop(name))
            if name in integer_only and tq.spec.block_size:
                continue  # MatMulNBits packs its own copy
            inits, dq = _constant_qdq(name, tq, original if tq.value is None else tq.value.reshape(original.shape))
            new_inits += inits
            if name not in integer_only:
                head.append(dq)
        else:
            inits, nodes = _activation_qdq(name, tq)
            new_inits += inits
            (after.setdefault(name, []) if name in producers else head).extend(nodes)
        rewire[name] = qdq_names(name).dequantized
    nodes = list(head)
    for node in model.graph.node:
        if node.name not in excluded:
            for i, name in enumerate(node.input):
                if name in rewire:
                    node.input[i] = rewire[name]
        outputs = list(node.output)
        if node.name in packed:
            layer = packed[node.name]
            inits, packed_node = nbits.matmul_nbits(node, layer, plan.tensors[layer.weight], g.constant(layer.weight),
                                                    plan.quant.accuracy_level)
            new_inits += inits
            nodes.append(packed_node)
        elif node.name in dynamic:
            layer = dynamic[node.name]
            if layer.activation not in quantized_inputs:
                quantized_inputs.add(layer.activation)
                nodes += _dynamic_input(layer.activation)
            nodes += _dynamic_matmul(node, layer)
        elif node.op_type == "Gather" and node.input[0] in embeddings:
            nodes += embedding_lookup(node, embeddings[node.input[0]])
        elif node.op_type == "Gather" and node.input[0] in tied:
            weight, factors = tied[node.input[0]]
            inits, lookup = nbits.tied_lookup(node, weight, plan.tensors[weight], factors)
            new_inits += inits
            nodes += lookup
        elif node.name in attentions:
            layer = attentions[node.name]
            if layer.activation not in plan.tensors and layer.activation not in quantized_inputs:
                quantized_inputs.add(layer.activation)
                nodes += _dynamic_input(layer.activation)
            nodes.append(_qattention(node, layer, plan))
        elif node.name in plan.binary_inputs:
            before, behind, inits = _binarized(g, plan, node)
            nodes += before + [node] + behind
            new_inits += inits
        else:
            nodes.append(node)
        for out in outputs:
            nodes.extend(after.get(out, []))
    del model.graph.node[:]
    model.graph.node.extend(stop_dq_before_subgraphs(pools_before_activations(nodes)))
    if any(n.domain == "com.microsoft" for n in nodes):
        import_domain(model, "com.microsoft")
    model.graph.initializer.extend(list(initializers.values()) + new_inits)
    check_output(model, g.model, "the exported model")
    return model


# The ops ORT's QDQPropagationTransformer carries a DequantizeLinear forward through.
DQ_PROPAGATING = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")


def stop_dq_before_subgraphs(nodes: list[NodeProto]) -> list[NodeProto]:
    """`nodes` with no DequantizeLinear reaching a control-flow node's subgraph through ops ORT
    propagates it across: ORT (1.32 here) would insert a Q/DQ pair on that edge, which it indexes as
    one of the node's explicit inputs, and abort. The first op of such a chain reads the float
    tensor the QuantizeLinear quantized instead (its value is then the float model's, which only
    removes a rounding), and a Q/DQ pair nothing reads any more is dropped."""
    producers = {out: n for n in nodes for out in n.output if out}
    implicit = set()
    for node in nodes:
        for sub in subgraphs(node):
            implicit |= outer_reads(sub)
    detached = []
    for name in sorted(implicit):
        chain, node = [], producers.get(name)
        while node is not None and node.op_type in DQ_PROPAGATING:
            chain.append(node)
            node = producers.get(node.input[0])
        if chain and node is not None and node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                chain[-1].input[0] = q.input[0]
                detached.append((node, q))
    for dq, q in detached:
        used = {name for n in nodes for name in (*n.input, *subgraph_reads(n))}
        if dq.output[0] not in used:
            nodes = [n for n in nodes if n is not dq]
            if not any(q.output[0] in n.input for n in nodes):
                nodes = [n for n in nodes if n is not q]
    return nodes


# Elementwise ops that never decrease: a max over a window commutes with them.
MONOTONE_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip")


def pools_before_activations(nodes: list[NodeProto]) -> list[NodeProto]:
    """`nodes` with each float activation -> MaxPool whose pooled value is quantized written as
    MaxPool -> activation (the same values: a max commutes with a non-decreasing function), the Q/DQ
    pairs before and after the activation dropped (one rounding, of the pooled value, instead of
    three). ORT carries a QuantizeLinear up across a MaxPool and then runs the MaxPool on uint8 in
    NCHW layout, a slow kernel (and a LeakyRelu before it as QLinearLeakyRelu, in NCHW too); an
    activation between them stops that: ORT pools in float, folds a Relu or Clip into the
    QuantizeLinear and runs a LeakyRelu in float on the pooled quarter of the values. The embedded
    model with its stem Conv in float: 37 us with the uint8 MaxPool, 25 us so, float 31 us; PLCMOS
    (a LeakyRelu): 5.25 ms against 3.83 ms in float (batch 1, 2 threads)."""
    producers = {out: n for n in nodes for out in n.output if out}
    readers: dict[str, list[NodeProto]] = {}
    for node in nodes:
        for name in {*node.input, *subgraph_reads(node)}:
            readers.setdefault(name, []).append(node)

    def behind_pair(tensor: str) -> tuple[list[NodeProto], str]:
        """The Q/DQ pair that only carries `tensor`'s float value to its one reader, and that value."""
        dq = producers.get(tensor)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(readers[q.output[0]]) != 1 or len(readers[tensor]) != 1:
            return [], tensor
        return [q, dq], q.input[0]

    def from_integer_kernel(tensor: str) -> bool:
        source = producers.get(tensor)
        return source is not None and (source.op_type == "DequantizeLinear" or any(
            getattr(producers.get(i), "op_type", None) == "DequantizeLinear" for i in source.input))

    dropped: set[int] = set()
    moved: dict[int, NodeProto] = {}  # id(MaxPool) -> the activation to write after it
    for pool in (n for n in nodes if n.op_type == "MaxPool" and len([o for o in n.output if o]) == 1):
        after = readers.get(pool.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        pair_after, activated = behind_pair(pool.input[0])
        act = producers.get(activated)
        if act is None or act.op_type not in MONOTONE_ACTIVATIONS or len(readers[activated]) != 1 \
                or id(act) in dropped or attr(act, "alpha", 0.0) < 0:
            continue
        pair_before, source = behind_pair(act.input[0])
        if from_integer_kernel(source):
            continue  # ORT runs the activation and the MaxPool in its integer layout already
        pooled = pool.output[0]
        pool.input[0], pool.output[0] = source, f"{pooled}_before_{act.op_type.lower()}"
        act.input[0], act.output[0] = pool.output[0], pooled
        dropped |= {id(n) for n in (act, *pair_after, *pair_before)}
        moved[id(pool)] = act
    return [m for n in nodes if id(n) not in dropped for m in (n, moved.get(id(n))) if m is not None]


def _binarized(g: Graph, plan: Plan, node: NodeProto) -> tuple[list[NodeProto], list[NodeProto], list[TensorProto]]:
    """The emulation of a binary-input layer around `node` (see binarize.py; the planner chose
    only layers it supports)."""
    original = g.node_by_name[node.name]
    bias_name = original.input[2] if len(original.input) > 2 and original.input[2] else None
    if bias_name is not None and bias_name not in g.initializers:
        raise PtqError(f"layer {node.name}: a binary-input layer needs a constant bias")
    bias = g.constant(bias_name) if bias_name else None
    return binarize.binarize_layer(node, plan.binary_inputs[node.name], g.constant(original.input[1]), bias)

