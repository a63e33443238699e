"""Native export: quantized layers of a QDQ model become ptqcli custom operators that run the
low-bit arithmetic (see native/), with their weights packed; everything else stays as it was.

A layer is replaced when its weights fit a kernel's 4-bit codes (int2-int4, binary and ternary:
Int4*; pow2 up to 4 bits: Shift*) and its input is either
float (then quantized per row by the operator) or an 8-bit per-tensor QuantizeLinear output (then
consumed as integers with that scale and zero point, exactly like the QDQ pair it replaces). A zero
Pad between that QuantizeLinear and its float source joins the convolution's own pads.

Layer choice (`ptq export --native-layers`): with `fastest`, a Conv/Gemm/MatMul whose input is an
8-bit quantized activation and whose weights are int2-int4 codes, or level-set codes (binary,
ternary, pow2) stored as 4-bit indices, stays QDQ, for ORT's integer kernels (QLinearConv, QGemm,
MatMulIntegerToFloat) to run on the codes widened or decoded at load (export/container.py): on
every model measured they ran it faster than the native operator (bench/results/native_models.md),
from a file of about the same size. `all` replaces every layer a kernel takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from ..errors import PtqError
from ..geometry import MATRIX_OPS, flat_rows, geometry, kernel_attributes, native_unsupported
from ..graph import Graph, clone, drop_unused, import_domain
from ..ops import attr
from ..nativelib import DOMAIN, INT_LSTM
from ..plan import Layer, Plan, TensorQuant
from ..quant import codes
from ..recurrent import from_record, operator_inputs
from ..calibrate.lstm import eligible as lstm_eligible, weight_codes
from ..formats import native_family
from . import native_ref as ref
from .binarize import BinaryNames
from .container import small_codes_fuse
from .integer_kernels import absorbable_bias
from .nbits import NBITS_SUFFIX
from .qdq import qdq_names


@dataclass(frozen=True)
class Family:
    """A weight format the kernels run: how plan codes become 4-bit codes."""

    prefix: str
    encode: Callable[[np.ndarray, TensorQuant], tuple[np.ndarray, np.ndarray | None, int]]


def _int4_codes(q: np.ndarray, tq: TensorQuant) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Codes, zero points per channel ([N, 1]) or per block ([N, groups]; None when all are the
    signed default) and the padding code (the last group's zero point of each row).

    Signed integers (and the -1/0/+1 of binary and ternary) are stored as q + 8; unsigned ones as q
    with their zero point."""
    offset = 0 if tq.spec.scheme == "int" and not tq.spec.signed else ref.INT4_ZERO
    given = np.asarray(tq.zero_point, dtype=np.int64)
    per_row = given.T if tq.spec.block_size else given.reshape(-1, 1)  # blocks: [k_blocks, N] in the plan
    zero = np.broadcast_to(per_row, (q.shape[0], per_row.shape[1])) + offset
    codes = (q + offset).astype(np.uint8)
    if np.all(zero == ref.INT4_ZERO):
        return codes, None, ref.INT4_ZERO
    return codes, np.ascontiguousarray(zero, dtype=np.uint8), zero[:, -1].astype(np.uint8)


def _shift_codes(q: np.ndarray, tq: TensorQuant) -> tuple[np.ndarray, np.ndarray | None, int]:
    return ref.shift_codes(q), None, ref.SHIFT_ZERO_CODE


# Which kernels run which weight formats: the format table names the family (formats.native_family).
FAMILIES = {"Int4": Family("Int4", _int4_codes), "Shift": Family("Shift", _shift_codes)}


def _family(tq: TensorQuant) -> Family | None:
    name = native_family(tq.spec)
    return FAMILIES[name] if name else None


@dataclass
class NativeReport:
    replaced: dict[str, str]     # float node -> custom op type
    kept: dict[str, str]         # quantized node left as QDQ/float -> why


def _activation_inputs(node: NodeProto, layer: Layer, plan: Plan) -> tuple[list[str], str | None]:
    """[X, X_scale, X_zero_point] for the custom op, or a reason the input cannot be fed to it."""
    tq = plan.tensors.get(layer.activation) if layer.activation else None
    if tq is None or tq.role != "activation":
        return [node.input[0], "", ""], None  # float input: the operator quantizes it per row
    if tq.spec.bits != 8 or tq.spec.axis is not None or tq.spec.scheme != "int":
        return [], "its input is not 8-bit per-tensor"
    names = qdq_names(layer.activation)
    if node.input[0] != names.dequantized:
        return [], "its input is not the plan's quantized activation"
    return [names.quantized, names.scale, names.zero_point], None


def _float_bias(g: Graph, layer: Layer, plan: Plan, n: int) -> tuple[np.ndarray | None, str | None]:
    """The bias as the QDQ model computes with it, in float32: from the plan (an int32 bias on its
    grid, a corrected float one) or the model's own."""
    if layer.bias is None:
        return None, None
    tq = plan.tensors.get(layer.bias)
    if layer.bias not in g.initializers:
        return None, f"its {layer.op_type} bias is not a constant"
    original = g.constant(layer.bias)
    if tq is None:
        value = original
    elif tq.role == "value":
        value = tq.value
    else:
        value = tq.on_grid(original)
    if np.size(value) != n:
        return None, f"its {layer.op_type} bias is not a constant of {n} values"
    return np.asarray(value, dtype=np.float32).reshape(n), None


def _weight(g: Graph, layer: Layer, tq: TensorQuant) -> np.ndarray:
    """The float weight the plan quantizes (its own value, or the model's)."""
    original = g.constant(layer.weight)
    return np.asarray(original if tq.value is None else tq.value, dtype=np.float32).reshape(original.shape)


LAYER_CHOICES = ("fastest", "all")


def left_to_ort(plan: Plan, choice: str) -> dict[str, str]:
    """{node: why} of the layers `choice` leaves to ORT's integer kernels (see the module's doc)."""
    if choice not in LAYER_CHOICES:
        raise PtqError(f"unknown --native-layers '{choice}' (known: {', '.join(LAYER_CHOICES)})")
    if choice == "all":
        return {}
    return {layer.node: f"ORT's integer {layer.op_type} kernel runs its 8-bit input faster (--native-layers all "
                        "to replace it)" for layer in plan.layers
            if small_codes_fuse(plan, layer) and _family(plan.tensors[layer.weight]) is not None}


def export_native(qdq: ModelProto, g: Graph, plan: Plan,
                  leave: dict[str, str] | None = None) -> tuple[ModelProto, NativeReport]:
    """A copy of the QDQ model with every supported layer replaced by its ptqcli operator, except
    those in `leave` ({node: why}, left_to_ort)."""
    leave = leave or {}
    model = clone(qdq)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    report = NativeReport({}, {})
    new_inits: list = []
    nodes: list[NodeProto] = []
    dropped: set[str] = set()
    layers = {layer.node: layer for layer in plan.layers}
    for node in model.graph.node:
        if node.name in dropped:
            continue
        layer = layers.get(node.name.removesuffix(NBITS_SUFFIX) if node.op_type == "MatMulNBits" else node.name)
        if layer is not None and layer.node in leave:
            report.kept[layer.node] = leave[layer.node]
            replacement = None
        elif layer is not None and node.op_type == "LSTM":
            replacement = _replace_lstm(node, layer, g, plan, new_inits, report)
        elif layer is None or node.op_type not in (*MATRIX_OPS, "MatMulNBits") or layer.weight not in plan.tensors:
            replacement = None
        elif node.name in plan.binary_inputs:
            replacement = _replace_binarized(node, layer, g, plan, inits, new_inits, report)
            if replacement is not None:
                dropped.update(BinaryNames(node.name).output_nodes)
        else:
            absorbed = absorbable_bias(g, plan, layer) if layer.bias is None else None
            replacement = _replace(node, layer, g, plan, new_inits, report, absorbed)  # zero Pads: folded by prepare
            if replacement is not None and absorbed is not None:
                dropped.add(absorbed[0].name)
        nodes.append(replacement or node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    drop_unused(model)
    if report.replaced:
        import_domain(model, DOMAIN)
    return model, report


def _replace(node: NodeProto, layer: Layer, g: Graph, plan: Plan, new_inits, report,
             absorbed: tuple[NodeProto, str] | None = None) -> NodeProto | None:
    """`node` is the QDQ model's layer: the float op (reading DequantizeLinear outputs) or the
    MatMulNBits of a block-wise weight-only MatMul; the operator replacing it takes the layer's
    own op type and node name. `absorbed`: the bias Add after a MatMul (absorbable_bias) and its
    vector, which the operator adds itself, writing the Add's output."""
    tq = plan.tensors[layer.weight]
    family = _family(tq)
    if family is None:
        report.kept[layer.node] = f"{tq.spec.label} weights have no native kernel"
        return None
    if tq.spec.float_zero:
        report.kept[layer.node] = "its float zero points have no native kernel (MatMulNBits runs them)"
        return None
    w = _weight(g, layer, tq)
    original = g.node_by_name[layer.node]
    why = native_unsupported(original, w)
    x_inputs, why_x = _activation_inputs(node, layer, plan)
    if why or why_x:
        report.kept[layer.node] = why or why_x
        return None
    rows_q, w_scale = _code_rows(original, tq, w)
    if w_scale is None:
        report.kept[layer.node] = ("its weight blocks are not a multiple of 32 input channels" if tq.spec.block_size
                                   else "its weight scales are not per output channel")
        return None
    node = original
    n, k = rows_q.shape
    codes, zero, pad = family.encode(rows_q, tq)
    bias, why_b = _float_bias(g, layer, plan, n)
    if why_b:
        report.kept[node.name] = why_b
        return None
    outputs = list(node.output)
    if absorbed is not None:
        bias, outputs = g.constant(absorbed[1]).astype(np.float32), list(absorbed[0].output)
    prefix = f"{node.name}_native"
    group_size = tq.spec.block_size or 0
    kp = ref.padded_k(k, group_size)
    constants = {"W": ref.pack_nibbles(codes, kp, pad), "W_scale": w_scale}
    if zero is not None:
        constants["W_zero_point"] = zero
    if bias is not None:
        constants["Bias"] = bias
    named = {key: f"{prefix}_{key}" for key in constants}
    new_inits.extend(numpy_helper.from_array(np.ascontiguousarray(v), named[key]) for key, v in constants.items())
    inputs = [x_inputs[0], named["W"], named["W_scale"], named.get("W_zero_point", ""), x_inputs[1], x_inputs[2],
              named.get("Bias", "")]
    while inputs[-1] == "":
        inputs.pop()
    op_type = family.prefix + node.op_type
    report.replaced[node.name] = op_type
    return helper.make_node(op_type, inputs, outputs, name=node.name, domain=DOMAIN, K=k, N=n,
                            group_size=group_size, **kernel_attributes(node, w))


def _replace_lstm(node: NodeProto, layer: Layer, g: Graph, plan: Plan, new_inits, report) -> NodeProto | None:
    """ptqcli's IntLSTM for an LSTM whose tables calibration fitted (ptqcli/recurrent.py)."""
    record = plan.config.get("integer_lstm", {}).get(layer.node)
    if record is None:
        _, why = lstm_eligible(g, plan)
        report.kept[layer.node] = why.get(layer.node, "its integer tables were not fitted (calibrated without data)")
        return None
    original = g.node_by_name[layer.node]
    (w, w_scale), (r, r_scale) = (weight_codes(g, plan, name) for name in layer.weights)
    bias = g.constant(original.input[3]) if len(original.input) > 3 and original.input[3] else None
    params = from_record(record, w, w_scale, r, r_scale, bias)
    named = {key: f"{node.name}_int_{key}" for key in ("W", "R", "W_mult", "R_mult", "Bias", "knots", "values", "slopes")}
    new_inits.extend(numpy_helper.from_array(np.ascontiguousarray(value), named[key])
                     for key, value in operator_inputs(params).items())
    states = [node.input[i] if len(node.input) > i else "" for i in (5, 6)]
    inputs = [node.input[0], *named.values(), *states]
    while inputs[-1] == "":
        inputs.pop()
    report.replaced[node.name] = INT_LSTM
    return helper.make_node(INT_LSTM, inputs, list(node.output), name=node.name, domain=DOMAIN,
                            hidden_size=attr(original, "hidden_size"), x_scale=params.x_scale,
                            cell_frac=params.cell_frac, direction=attr(original, "direction", "forward"))


def _code_rows(node: NodeProto, tq: TensorQuant, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The weight's integer codes as [N, K] rows and its scales as [N, 1], or [N, groups] for blocks
    along K of a multiple of 32 (None for any other layout)."""
    rows_q = flat_rows(node, codes(w, tq.scale, tq.zero_point, tq.spec, np.int16))
    n = rows_q.shape[0]
    scale = np.asarray(tq.scale, dtype=np.float32)
    if scale.size == 1:
        return rows_q, np.full((n, 1), scale.ravel()[0], dtype=np.float32)
    if tq.spec.block_size:
        in_blocks = node.op_type == "MatMul" and tq.spec.axis % w.ndim == 0 and tq.spec.block_size % ref.NIBBLE_BLOCK == 0
        return rows_q, (np.ascontiguousarray(scale.T) if in_blocks else None)
    if tq.spec.axis is not None and tq.spec.axis % w.ndim == geometry(node, w.ndim).out_axis:
        return rows_q, scale.reshape(n, 1)
    return rows_q, None


def _replace_binarized(node: NodeProto, layer: Layer, g: Graph, plan: Plan, inits, new_inits, report) -> NodeProto | None:
    """A binary-input layer's emulation (see binarize.py) becomes one Binary* operator reading
    x - mu and writing the layer's output."""
    names = BinaryNames(node.name)
    tq = plan.tensors[layer.weight]
    w = _weight(g, layer, tq)
    why = native_unsupported(node, w)
    rows_q, w_scale = _code_rows(node, tq, w)
    if why or w_scale is None:
        report.kept[node.name] = why or "its weight scales are not per output channel"
        return None
    n, k = rows_q.shape
    prefix = f"{node.name}_native"
    constants = {"W": ref.pack_signs(rows_q.astype(np.float32)), "W_scale": w_scale.reshape(n),
                 "Bias": inits[names.folded_bias].astype(np.float32).reshape(n)}
    new_inits.extend(numpy_helper.from_array(np.ascontiguousarray(v), f"{prefix}_{key}") for key, v in constants.items())
    op_type = "Binary" + node.op_type
    report.replaced[node.name] = op_type
    return helper.make_node(op_type, [names.centered] + [f"{prefix}_{key}" for key in ref.BINARY_INPUTS[1:]],
                            [layer.output], name=node.name, domain=DOMAIN, K=k, N=n, **kernel_attributes(node, w))
