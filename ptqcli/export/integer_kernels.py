"""Which layers ORT runs on its integer kernels, and integer MatMuls with their bias added inside the kernel.

ONNX Runtime turns DequantizeLinear(x) -> MatMul <- DequantizeLinear(W) into MatMulIntegerToFloat,
but leaves the Add of the bias that follows as a node of its own: one more pass over the layer's
output, on every layer of a transformer. MatMulIntegerToFloat takes a bias input, and ORT's own
dynamic quantization fills it; here the export writes that node itself, reading the same codes,
scales and zero points the QDQ pairs held (MiniLM-L3's 15 bias Adds and its three GELU biases:
W8A8 1.56x -> 1.71x fp32, measured interleaved). The result is what ORT computed before, less one
rounding of the output to float between the product and the bias.
"""

from __future__ import annotations

from onnx import ModelProto, NodeProto, TensorProto, helper

from ..calibrate.select import GELU_REASON
from ..graph import Graph, drop_unused, import_domain
from ..plan import Layer, Plan

EIGHT_BIT = (TensorProto.INT8, TensorProto.UINT8)


def integer_input(plan: Plan, layer: Layer) -> bool:
    """Does ORT get an integer kernel for this layer once its weights are 8-bit? Its input must be
    an 8-bit, per-tensor quantized activation (the QDQ pair ORT fuses with the layer)."""
    tq = plan.tensors.get(layer.activation) if layer.activation else None
    return (tq is not None and tq.role == "activation" and tq.spec.scheme == "int" and tq.spec.bits == 8
            and tq.spec.axis is None and layer.node not in plan.binary_inputs)


def absorbable_bias(g: Graph, plan: Plan, layer: Layer) -> tuple[NodeProto, str] | None:
    """The Add of a constant [N] vector that alone reads a MatMul layer's float output ([K, N]
    weight), and that vector's name: an operator with a bias input can add it itself."""
    readers = g.consumers.get(layer.output, [])
    dims = tuple(g.initializers[layer.weight].dims) if layer.weight in g.initializers else ()
    if (layer.op_type != "MatMul" or len(dims) != 2 or len(readers) != 1 or layer.output in plan.tensors
            or layer.output in g.output_names):
        return None
    add = readers[0]
    # The bias Add of an erf GELU is float only to be fused by ORT; added in the kernel, the rest of
    # the pattern still becomes one Gelu (faster than the BiasGelu it would have been).
    if add.op_type != "Add" or plan.float_nodes.get(add.name, GELU_REASON) != GELU_REASON or len(add.input) != 2:
        return None
    bias = add.input[1] if add.input[0] == layer.output else add.input[0]
    if (bias not in g.initializers or tuple(g.initializers[bias].dims) != dims[1:] or bias in plan.tensors
            or not g.is_float(bias)):
        return None
    return add, bias


def candidates(g: Graph, plan: Plan) -> dict[str, tuple[Layer, NodeProto, str]]:
    """{MatMul node: (layer, its bias Add, the bias)} of the layers ORT would run as
    MatMulIntegerToFloat: an 8-bit per-tensor quantized input, integer weights with one scale per
    tensor or output column, a float output that only the Add of a constant bias reads."""
    found = {}
    for layer in plan.layers:
        tq = plan.tensors.get(layer.weight)
        if (layer.op_type != "MatMul" or tq is None or tq.spec.scheme != "int" or tq.spec.block_size
                or tq.spec.axis not in (None, 1) or not integer_input(plan, layer)):
            continue
        absorbed = absorbable_bias(g, plan, layer)
        if absorbed is not None:
            found[layer.node] = (layer, *absorbed)
    return found


def _eight_bit_codes(name: str, producers: dict, inits: dict) -> bool:
    """Is `name` an 8-bit integer constant: an initializer, or a Cast of one to 8 bits (folded at load)?"""
    if name in inits:
        return inits[name] in EIGHT_BIT
    cast = producers.get(name)
    return (cast is not None and cast.op_type == "Cast" and cast.input[0] in inits
            and cast.attribute[0].i in EIGHT_BIT)


def fuse_biases(model: ModelProto, g: Graph, plan: Plan) -> list[str]:
    """Rewrite, in place, each candidate layer still exported as DequantizeLinear pairs around a
    MatMul with 8-bit weight codes (not sub-8-bit codes left in their small container, not a native
    operator) as one MatMulIntegerToFloat that adds the bias; drop what nothing reads any more.
    Returns the layers rewritten."""
    found = candidates(g, plan)
    producers = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    fused: dict[str, NodeProto] = {}
    removed: set[str] = set()
    for node in model.graph.node:
        if node.name not in found or node.op_type != "MatMul":
            continue
        layer, add, bias = found[node.name]
        x, w = (producers.get(name) for name in node.input[:2])
        if not (x is not None and w is not None and x.op_type == w.op_type == "DequantizeLinear"
                and _eight_bit_codes(w.input[0], producers, inits) and len(x.input) == len(w.input) == 3):
            continue
        fused[node.name] = helper.make_node(
            "MatMulIntegerToFloat", [x.input[0], w.input[0], x.input[1], w.input[1], x.input[2], w.input[2], bias],
            list(add.output), name=node.name, domain="com.microsoft")
        removed.add(add.name)
    if not fused:
        return []
    nodes = [fused.get(n.name, n) for n in model.graph.node if n.name not in removed]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    import_domain(model, "com.microsoft")
    drop_unused(model)
    return sorted(fused)
