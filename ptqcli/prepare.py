"""Turn any loaded model into the float graph the quantizer works on.

Each transform is a function ModelProto -> ModelProto that returns a new model; ``prepare`` chains
them. What a transform changed is recorded as a note for the quantization card.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from .graph import (MIN_OPSET, Graph, check_model, clone, default_opset, drop_unused_initializers, is_huge, keep_only,
                    set_opset, subgraphs, through_file, without_weight_data)
from .errors import PtqError
from .ops import attr, op_info
from .runtime import session

# Ops whose value differs between runs: folding them would freeze one draw.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_MAX_FOLDED_ELEMENTS = 64_000_000


def prepare(model: ModelProto, source: str = "") -> Graph:
    """Upgrade, validate, fold constants and BatchNorm, infer shapes."""
    notes: list[str] = []
    facts = {"source_opset": default_opset(model)}
    if default_opset(model) < MIN_OPSET:
        notes.append(f"converted from opset {default_opset(model)} to {MIN_OPSET}")
        model = set_opset(model, MIN_OPSET)
    model = drop_initializer_inputs(model)
    model = name_nodes(model)
    check_model(model, source or "the model")
    model, widened = float32_inside(model)
    if widened:
        notes.append(f"float16 model: computed in float32 inside ({widened} tensors widened), its inputs and "
                     "outputs stay float16 through a Cast each")
    facts["float16_widened"] = widened
    model, folded = fold_constants(model)
    if folded:
        notes.append(f"folded {folded} constant nodes into initializers")
    model, bn = fold_batchnorm(model)
    if bn:
        notes.append(f"folded {bn} BatchNormalization nodes into the preceding Conv/Gemm")
    model, pads = fold_pads_into_convs(model)
    if pads:
        notes.append(f"folded {pads} zero Pad nodes into the Conv that reads each")
    model, divisions = divisions_as_products(model)
    if divisions:
        notes.append(f"{divisions} divisions by a constant written as products with its reciprocal")
    model, sums = sums_as_adds(model)
    if sums:
        notes.append(f"{sums} Sum nodes of two inputs written as Add")
    facts.update(constants_folded=folded, batchnorm_folded=bn, pads_folded=pads, divisions_as_products=divisions,
                 sums_as_adds=sums)
    model = infer_shapes(model)
    model, shuffles = channel_shuffles_as_gathers(model)
    if shuffles:
        notes.append(f"{shuffles} channel shuffles (Reshape, Transpose, Reshape) written as one Gather each")
    facts["shuffles_as_gathers"] = shuffles
    model = add_runtime_types(model)
    return Graph(model, source=source, notes=notes, facts=facts)


def float32_inside(model: ModelProto) -> tuple[ModelProto, int]:
    """A float16 graph with float32 in place of float16 everywhere between its inputs and outputs,
    which keep their float16 types through a Cast each; and how many tensors, constants and type
    attributes changed. ONNX Runtime's CPU kernels compute float16 graphs in float32 anyway (it
    casts around each op) and its integer kernels take float32 scales, so this is the graph
    that quantizes and runs. bfloat16 is refused: ORT's CPU provider cannot run it."""
    if _uses_type(model.graph, TensorProto.BFLOAT16):
        raise PtqError("the model holds bfloat16 tensors, which ONNX Runtime's CPU provider cannot run; "
                       "export it in float32 or float16")
    if not _uses_type(model.graph, TensorProto.FLOAT16):
        return model, 0
    model = clone(model)
    graph = model.graph
    half_inputs = [vi for vi in graph.input if vi.type.tensor_type.elem_type == TensorProto.FLOAT16]
    half_outputs = [vi.name for vi in graph.output if vi.type.tensor_type.elem_type == TensorProto.FLOAT16]
    changed = _widen_graph(graph)
    head, tail = [], []
    for vi in half_inputs:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        inside = f"{vi.name}__float32"
        _rename_reads(graph, vi.name, inside)
        head.append(helper.make_node("Cast", [vi.name], [inside], name=f"{vi.name}__to_float32", to=TensorProto.FLOAT))
    for vi in graph.output:
        if vi.name not in half_outputs:
            continue
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        inside = f"{vi.name}__float32"
        _rename_reads(graph, vi.name, inside)
        for node in graph.node:
            node.output[:] = [inside if o == vi.name else o for o in node.output]
        tail.append(helper.make_node("Cast", [inside], [vi.name], name=f"{vi.name}__to_float16", to=TensorProto.FLOAT16))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model, changed


def _uses_type(graph: onnx.GraphProto, elem: int) -> bool:
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(vi.type.tensor_type.elem_type == elem for vi in values):
        return True
    if any(t.data_type == elem for t in graph.initializer):
        return True
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == elem:
                return True
            if a.name == "to" and a.i == elem:
                return True
        if any(_uses_type(sub, elem) for sub in subgraphs(node)):
            return True
    return False


# Attributes that name an element type of what the op writes.
_TYPE_ATTRIBUTES = frozenset({"to", "dtype", "output_dtype"})


def _widen_graph(graph: onnx.GraphProto) -> int:
    """float16 -> float32 in this graph and its subgraphs, in place (inputs and outputs of the main
    graph are set back to float16 by the caller; subgraph signatures are widened with the rest)."""
    changed = 0
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            changed += 1
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
            changed += 1
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                changed += 1
            elif a.type == onnx.AttributeProto.INT and a.name in _TYPE_ATTRIBUTES and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
                changed += 1
        for sub in subgraphs(node):
            changed += _widen_graph(sub)
    return changed


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node that reads `old`, in this graph and in the subgraphs that see it, reads `new`."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for sub in subgraphs(node):
            if old not in {i.name for i in sub.input}:  # a subgraph input of that name hides it
                _rename_reads(sub, old, new)


def drop_initializer_inputs(model: ModelProto) -> ModelProto:
    """IR < 4 lists every initializer as a graph input; newer IRs treat that as an overridable input."""
    names = {t.name for t in model.graph.initializer}
    if not any(i.name in names for i in model.graph.input):
        return model
    model = clone(model)
    keep = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def name_nodes(model: ModelProto) -> ModelProto:
    """Give every node a unique name: plans, recipes and reports refer to nodes by name."""
    names = [n.name for n in model.graph.node]
    if all(names) and len(set(names)) == len(names):
        return model
    model = clone(model)
    taken: set[str] = set()
    for idx, node in enumerate(model.graph.node):
        if not node.name or node.name in taken:
            node.name = f"{node.op_type}_{idx}" if f"{node.op_type}_{idx}" not in taken else f"{node.op_type}_{idx}_{len(taken)}"
        taken.add(node.name)
    return model


def infer_shapes(model: ModelProto) -> ModelProto:
    """The model with ONNX's inferred types and shapes in its value_info (its subgraphs' too).

    Inference runs on a copy without the data of large float tensors (shapes and types are all it
    reads of them): a language model's weights would otherwise be serialized to the inference and
    back, seconds and gigabytes, and a model over 2 GB could not be inferred in memory at all."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weight_data(model)[0], data_prop=True)
    except Exception:
        # Unknown custom ops defeat inference; the quantizer then skips tensors of unknown type.
        return model
    # A large model is annotated in place: a copy would be another set of its weights in memory.
    out = model if through_file(model) else clone(model)
    _copy_inferred(inferred.graph, out.graph)
    return out


def _copy_inferred(inferred: onnx.GraphProto, target: onnx.GraphProto) -> None:
    """value_info and output types of `inferred` into `target`, the same graph with its weights,
    recursively through the subgraphs of its nodes (same nodes, same order)."""
    del target.value_info[:]
    target.value_info.extend(inferred.value_info)
    for mine, theirs in zip(target.output, inferred.output):
        mine.CopyFrom(theirs)
    for mine, theirs in zip(target.node, inferred.node):
        for a, b in zip(mine.attribute, theirs.attribute):
            if a.HasField("g"):
                _copy_inferred(b.g, a.g)
            for sub_a, sub_b in zip(a.graphs, b.graphs):
                _copy_inferred(sub_b, sub_a)


def add_runtime_types(model: ModelProto) -> ModelProto:
    """Element types ONNX's inference cannot give (outputs of ORT's contrib ops: Attention,
    SkipLayerNormalization, ... in graphs its transformer optimizer fused), read from an ORT session
    that lists those tensors as outputs. A tensor of unknown type is never quantized, so without
    them every activation after the first fused op would stay float."""
    known = {vi.name for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
             if vi.type.tensor_type.elem_type} | {t.name for t in model.graph.initializer}
    unknown = [o for n in model.graph.node for o in n.output if o and o not in known]
    if not unknown or is_huge(model):
        return model
    probe = clone(model)
    for name in unknown:
        probe.graph.output.add().name = name
    try:
        sess = session(probe, optimize=False)
    except PtqError:
        return model  # ORT cannot load it either (an unknown custom op): the types stay unknown
    out = clone(model)
    for o in sess.get_outputs():
        elem = _ORT_TYPES.get(o.type)
        if o.name in unknown and elem is not None:
            out.graph.value_info.append(helper.make_tensor_value_info(o.name, elem, None))
    return out


_ORT_TYPES = {f"tensor({name})": getattr(TensorProto, name.upper()) for name in (
    "float", "float16", "double", "bfloat16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
    "uint64", "bool", "string")}


def fold_constants(model: ModelProto) -> tuple[ModelProto, int]:
    """Replace nodes whose inputs are all constant (e.g. ConstantOfShape weights) by initializers."""
    from onnx.reference import ReferenceEvaluator

    g = Graph(model)
    consts = dict(g.initializers)
    graph_outputs = set(g.output_names)
    kept, new_inits, folded = [], [], 0
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and all(i in consts for i in inputs)
            and not any(o in graph_outputs for o in node.output)
            and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
        )
        values = _evaluate_node(ReferenceEvaluator, node, consts) if foldable else None
        if values is None:
            kept.append(node)
            continue
        folded += 1
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            consts[name] = tensor
            new_inits.append(tensor)
    if not folded:
        return model, 0
    out = clone(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(new_inits)
    return drop_unused_initializers(out), folded


def _evaluate_node(evaluator_cls, node, consts) -> list | None:
    feeds = {i: numpy_helper.to_array(consts[i]) for i in node.input if i}
    if sum(v.size for v in feeds.values()) > _MAX_FOLDED_ELEMENTS:
        return None
    inputs = [helper.make_tensor_value_info(i, consts[i].data_type, None) for i in feeds]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output]
    single = helper.make_model(
        helper.make_graph([node], "fold", inputs, outputs),
        opset_imports=[helper.make_opsetid("", MIN_OPSET)],
    )
    try:
        values = evaluator_cls(single).run(None, feeds)
    except Exception:
        return None  # an op the reference cannot evaluate simply stays in the graph
    if any(np.asarray(v).size > _MAX_FOLDED_ELEMENTS for v in values):
        return None
    return values


def divisions_as_products(model: ModelProto) -> tuple[ModelProto, int]:
    """Div(x, c) with a float constant c becomes Mul(x, 1 / c): ONNX Runtime multiplies quantized
    tensors (QLinearMul) but has no quantized division, and a decomposed HardSwish
    x * clip(x + 3, 0, 6) / 6 would otherwise leave the integer path between two convolutions.
    The result differs from the division by float rounding only."""
    consts = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n.op_type)
    # x / sqrt(2) inside an erf GELU stays a division: ORT fuses the pattern into one Gelu only then,
    # and Erf has no quantized form for a product to serve.
    targets = [n for n in model.graph.node if n.op_type == "Div" and n.domain in ("", "ai.onnx") and len(n.input) == 2
               and n.input[1] in consts and consts[n.input[1]].data_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
               and readers.get(n.output[0]) != ["Erf"]]
    targets = [n for n in targets if np.all(numpy_helper.to_array(consts[n.input[1]]) != 0)]
    if not targets:
        return model, 0
    model = clone(model)
    by_name = {n.name: n for n in model.graph.node}
    added = {}
    for target in targets:
        node, divisor = by_name[target.name], target.input[1]
        if divisor not in added:
            value = numpy_helper.to_array(consts[divisor])
            added[divisor] = f"{divisor}__reciprocal"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / value).astype(value.dtype), added[divisor]))
        node.op_type = "Mul"
        node.input[1] = added[divisor]
    return model, len(targets)


def sums_as_adds(model: ModelProto) -> tuple[ModelProto, int]:
    """Sum(a, b) becomes Add(a, b), the same value with the same broadcasting: ORT adds quantized
    tensors (QLinearAdd) but has no integer Sum, so a residual join written as Sum (older exporters'
    ResNet and ShuffleNet blocks) ran in float between DequantizeLinear and QuantizeLinear pairs
    (light ShuffleNet: 32 QuantizeLinear and 47 DequantizeLinear nodes at run time, 7 and 9 with Add)."""
    targets = [n.name for n in model.graph.node if n.op_type == "Sum" and n.domain in ("", "ai.onnx") and len(n.input) == 2]
    if not targets:
        return model, 0
    model = clone(model)
    for node in model.graph.node:
        if node.name in targets:
            node.op_type = "Add"
    return model, len(targets)


def channel_shuffles_as_gathers(model: ModelProto) -> tuple[ModelProto, int]:
    """Reshape (one axis split into a x b) -> Transpose (the two swapped) -> Reshape (merged back),
    ShuffleNet's channel shuffle, becomes one Gather of that axis's permutation: the same values.
    ORT runs the 5-D Transpose of a quantized tensor slowly and keeps the NCHW layout around it; a
    Gather of uint8 channels it runs fast (light ShuffleNet W8A8: 5.1 ms -> 1.9 ms, float 2.3 ms)."""
    g = Graph(model)
    shapes = g.value_shapes
    found = []  # (first Reshape, Transpose, last Reshape, axis, a, b)
    for first in g.graph.node:
        split = _shuffle_split(g, first, shapes)
        if split is None:
            continue
        axis, a, b = split
        swap = _sole_reader(g, first.output[0])
        if swap is None or swap.op_type != "Transpose":
            continue
        perm = list(attr(swap, "perm", ()))
        if perm != [*range(axis), axis + 1, axis, *range(axis + 2, len(perm))]:
            continue
        last = _sole_reader(g, swap.output[0])
        if last is None or last.op_type != "Reshape" or not _restores(g, last, shapes.get(first.input[0])):
            continue
        found.append((first, swap, last, axis, a, b))
    if not found:
        return model, 0
    model = clone(model)
    replaced = {}
    for first, swap, last, axis, a, b in found:
        order = np.arange(a * b, dtype=np.int64).reshape(a, b).T.reshape(-1)
        name = f"{last.output[0]}_shuffle_order"
        model.graph.initializer.append(numpy_helper.from_array(order, name))
        replaced[first.name] = helper.make_node("Gather", [first.input[0], name], [last.output[0]], name=last.name,
                                                axis=axis)
    dropped = {n.name for first, swap, last, *_ in found for n in (swap, last)}
    nodes = [replaced.get(n.name, n) for n in model.graph.node if n.name not in dropped]
    gone = {out for first, swap, *_ in found for out in (first.output[0], swap.output[0])}
    keep_only(model.graph.value_info, lambda vi: vi.name not in gone)
    del model.graph.node[:]
    model.graph.node.extend(nodes)  # the inferred shapes stay: every other tensor is as it was
    return drop_unused_initializers(model), len(found)


def _sole_reader(g: Graph, tensor: str):
    readers = g.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 and tensor not in g.output_names else None


def _same_dim(target: int, dim) -> bool:
    """A Reshape target entry that keeps the input's dimension: equal, 0 (copy) or -1 (the rest)."""
    return target in (0, -1) or (isinstance(dim, int) and dim > 0 and target == dim)


def _shuffle_split(g: Graph, node, shapes) -> tuple[int, int, int] | None:
    """(axis, a, b) when the Reshape splits one axis of its known-rank input into a x b and keeps
    every other, at most one of them inferred (-1)."""
    if node.op_type != "Reshape" or len(node.input) < 2 or attr(node, "allowzero", 0):
        return None
    target, dims = g.constant(node.input[1]), shapes.get(node.input[0])
    if target is None or dims is None or target.ndim != 1 or len(target) != len(dims) + 1 or list(target).count(-1) > 1:
        return None
    target = [int(t) for t in target]
    for axis, dim in enumerate(dims):
        a, b = target[axis], target[axis + 1]
        if isinstance(dim, int) and a > 1 and b > 1 and a * b == dim and \
                all(_same_dim(t, d) for t, d in zip(target[:axis] + target[axis + 2:], dims[:axis] + dims[axis + 1:])):
            return axis, a, b
    return None


def _restores(g: Graph, node, dims) -> bool:
    """The Reshape's target is the original shape `dims` again."""
    target = g.constant(node.input[1]) if len(node.input) > 1 else None
    if target is None or dims is None or target.ndim != 1 or len(target) != len(dims) or attr(node, "allowzero", 0):
        return False
    return list(target).count(-1) <= 1 and all(_same_dim(int(t), d) for t, d in zip(target, dims))


def fold_pads_into_convs(model: ModelProto) -> tuple[ModelProto, int]:
    """A zero-constant Pad of a Conv's spatial dimensions that only that Conv reads becomes the
    Conv's own padding. ONNX Runtime does this for float models, but not once the Pad sits between
    a DequantizeLinear and a QuantizeLinear: there it stays a float Pad with a quantize and a
    dequantize around it (EfficientNet-Lite0's 17 "same" paddings took a third of its int8 time)."""
    g = Graph(model)
    consts = {t.name: t for t in model.graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    folds: dict[str, tuple[str, list[int]]] = {}  # conv name -> (Pad input, pads to add)
    for pad in g.graph.node:
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or pad.output[0] in g.output_names:
            continue
        readers = g.consumers.get(pad.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Conv" or readers[0].domain not in ("", "ai.onnx") \
                or readers[0].input[0] != pad.output[0]:
            continue
        conv, attrs = readers[0], {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        amounts = constant(pad.input[1]) if len(pad.input) > 1 else None
        value = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if (attrs.get("mode", b"constant") not in (b"constant", "constant") or amounts is None or value is None
                or np.any(value != 0) or (len(pad.input) > 3 and pad.input[3])
                or conv_attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        rank = len(amounts) // 2
        begin, end = amounts[:rank].tolist(), amounts[rank:].tolist()
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(begin + end) < 0:
            continue  # batch or channel padding, or cropping: not a convolution's padding
        folds[conv.name] = (pad.input[0], begin[2:] + end[2:])
    if not folds:
        return model, 0
    out = clone(model)
    dropped = {g.producer[g.node_by_name[name].input[0]].name for name in folds}
    kept = []
    for node in out.graph.node:
        if node.name in dropped:
            continue
        if node.name in folds:
            source, extra = folds[node.name]
            spatial = len(extra) // 2
            current = next((list(a.ints) for a in node.attribute if a.name == "pads"), [0] * (2 * spatial))
            keep_only(node.attribute, lambda a: a.name != "pads")
            node.attribute.append(helper.make_attribute("pads", [int(a + b) for a, b in zip(current, extra)]))
            node.input[0] = source
        kept.append(node)
    return _with_nodes(out, kept), len(folds)


def fold_batchnorm(model: ModelProto) -> tuple[ModelProto, int]:
    """Fold inference-mode BatchNormalization into a Conv/Gemm that feeds only it.

    ORT cannot fold BN once the conv weight sits behind a DequantizeLinear, and quantizing
    the unfolded weight would quantize the wrong numbers, so the fold happens before anything else.
    """
    g = Graph(model)
    out = clone(model)
    inits = {t.name: t for t in out.graph.initializer}
    graph_outputs = set(g.output_names)
    removed: set[int] = set()
    renames: dict[str, tuple[str, str]] = {}
    for idx, bn in enumerate(g.graph.node):
        producer = g.producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if producer is None or not _can_fold(g, producer, bn, graph_outputs):
            continue
        weight, bias = _folded_parameters(g, producer, bn)
        w_name, b_name = producer.input[1], f"{producer.name or producer.output[0]}_bn_bias"
        inits[w_name].CopyFrom(numpy_helper.from_array(weight, w_name))
        new_bias = numpy_helper.from_array(bias, b_name)
        out.graph.initializer.append(new_bias)
        inits[b_name] = new_bias
        renames[producer.output[0]] = (b_name, bn.output[0])
        removed.add(idx)
    if not removed:
        return model, 0
    kept = []
    for idx, node in enumerate(out.graph.node):
        if idx in removed:
            continue
        if node.output and node.output[0] in renames:
            bias_name, new_out = renames[node.output[0]]
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias_name
            node.output[0] = new_out
        kept.append(node)
    return _with_nodes(out, kept), len(removed)


def _with_nodes(model: ModelProto, nodes: list) -> ModelProto:
    """`model` (a copy the caller owns) holding `nodes` instead of its own, its value infos dropped
    (shapes are re-inferred after a rewrite) and the initializers nothing reads any more."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return drop_unused_initializers(model)


def _can_fold(g: Graph, producer, bn, graph_outputs) -> bool:
    info = op_info(producer.op_type, producer.domain)
    if info is None or not info.folds_batchnorm:
        return False
    if producer.output[0] in graph_outputs or len(g.consumers.get(producer.output[0], [])) != 1:
        return False
    if any(a.name == "training_mode" and a.i for a in bn.attribute) or len(bn.output) > 1 and any(bn.output[1:]):
        return False
    params = [producer.input[1]] + list(bn.input[1:5])
    if any(g.constant(p) is None for p in params):
        return False
    if len(producer.input) > 2 and producer.input[2] and g.constant(producer.input[2]) is None:
        return False
    if producer.op_type == "Gemm":
        attrs = {a.name: a for a in producer.attribute}
        if attrs.get("alpha", None) and attrs["alpha"].f != 1.0 or attrs.get("beta", None) and attrs["beta"].f != 1.0:
            return False
        bias = g.constant(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        if bias is not None and bias.ndim != 1:
            return False
    return True


def _folded_parameters(g: Graph, producer, bn) -> tuple[np.ndarray, np.ndarray]:
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (g.constant(n).astype(np.float64) for n in bn.input[1:5])
    weight = g.constant(producer.input[1]).astype(np.float64)
    has_bias = len(producer.input) > 2 and producer.input[2]
    bias = g.constant(producer.input[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
    k = gamma / np.sqrt(var + eps)
    axis = op_info(producer.op_type).channel_axis(producer)
    shape = [1] * weight.ndim
    shape[axis] = -1
    weight = weight * k.reshape(shape)
    bias = (bias - mean) * k + beta
    dtype = g.constant(producer.input[1]).dtype
    return weight.astype(dtype), bias.astype(dtype)

