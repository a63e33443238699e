"""The integer type that stores each layer's weight codes in a QDQ model, chosen for the kernel that
will run it.

Stock ONNX Runtime's CPU integer kernels (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat)
take 8-bit weights. It never fuses a DequantizeLinear of int4 codes into them: such a layer runs in
float, its weights dequantized on every run (EfficientNet-Lite0 W4A8 ran 4x slower than float
that way). The same codes as int8 (int4 code k as int8 k, uint4 as uint8, same scale and zero
point) are the same levels and the same model, and ORT fuses the layer into its integer kernel.
They need not be int8 in the file: a Cast of a constant is folded when ORT loads the model, so
int4 codes behind a Cast to int8 reach the fusion as an int8 initializer.

Modes (`ptq export --container`):
  auto  int4 in the file and int8 at load (the Cast) where an integer kernel then runs: the layer
        reads an 8-bit quantized activation. Elsewhere the smallest container: a weight-only layer
        gains nothing from int8 codes (ORT dequantizes, folds or repacks them whatever holds
        them). Weight-only int4 MatMuls are MatMulNBits' to run (see `weight_only`).
        A Conv or Gemm on a float input (weight-only) has its codes decoded to float weights when
        ORT loads the model instead (decode_at_load: a Cast and a Mul it folds), so it runs at
        float speed from the small file rather than dequantizing its weights on every run.
  int8  every sub-8-bit weight as int8 in the file, wherever it is read: for runtimes that do not
        fold constants, at half a byte more per weight.
  int4  each format's smallest container (int4 for 2-4-bit integers), no Cast, nothing decoded at load.

Level-set formats (binary, ternary, pow2, exp) have codes that are not consecutive integers: int8
(int16 for exp and wider pow2 levels). With at most 16 levels, auto and int4 store each code as a
4-bit index into the format's level table, and a Gather that ORT folds at load turns the indices
back into the codes: the same kernel (ORT fuses int8 ones), half the bytes or less. Whether the
kernel ran is measured, not assumed: export/measures.layer_kernels reads it from ORT's optimized
graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from ..errors import PtqError
from ..formats import code_levels, indexable
from ..graph import Graph, make_initializer, reads
from ..plan import Layer, Plan
from .integer_kernels import fuse_biases, integer_input
from .qdq import export_qdq, qdq_names

MODES = ("auto", "int4", "int8")
WIDER = {TensorProto.INT4: (TensorProto.INT8, np.int8), TensorProto.UINT4: (TensorProto.UINT8, np.uint8)}
NAMES = {TensorProto.INT4: "int4", TensorProto.UINT4: "uint4", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
         TensorProto.INT16: "int16", TensorProto.INT32: "int32", TensorProto.FLOAT: "float32"}


@dataclass
class Choice:
    mode: str
    widened: dict[str, str] = field(default_factory=dict)  # node -> why its codes are read as 8 bits
    kept: dict[str, str] = field(default_factory=dict)     # sub-8-bit node left in the smallest container -> why
    indexed: dict[str, str] = field(default_factory=dict)  # level-set node whose codes are 4-bit indices -> why
    decoded: dict[str, str] = field(default_factory=dict)  # weight-only node decoded to float at load -> why


def weight_only(layer: Layer) -> str:
    """Why a layer on float inputs keeps its smallest container. Weight-only int4 MatMuls belong to
    MatMulNBits: block-wise ones are exported as such (export/nbits.py), and recent ORT builds fuse a
    per-channel DequantizeLinear(int4) -> MatMul into it themselves (the card's kernel column says
    whether they did). Exporting per-channel ones as MatMulNBits directly would go here."""
    if layer.op_type == "MatMul":
        return "weight-only MatMul: int4 codes are MatMulNBits' to run, no int8 kernel reads a float input"
    return "its input is not an 8-bit quantized activation: no integer kernel would run"


INTEGER_KERNEL_OPS = ("Conv", "Gemm", "MatMul")


def small_codes_fuse(plan: Plan, layer: Layer) -> bool:
    """Does ORT's integer kernel run this layer from sub-8-bit codes in the file under `auto`: int2-int4
    codes widened to int8 at load, or level-set indices decoded to int8 codes at load, on an 8-bit
    quantized input?"""
    tq = plan.tensors.get(layer.weight)
    return (layer.op_type in INTEGER_KERNEL_OPS and tq is not None and tq.role == "weight" and not tq.spec.block_size
            and (tq.spec.storage_bits == 4 or (indexable(tq.spec) and tq.spec.storage_bits == 8))
            and integer_input(plan, layer))


DECODED_REASON = ("weight-only: its codes decoded to float weights when ORT loads the model (a Cast and Mul "
                  "it folds), float speed from the small file")


def decodable(plan: Plan, layer: Layer) -> bool:
    """A weight-only layer ORT would dequantize on every run: a Conv or Gemm (MatMuls go to
    MatMulNBits) on a float input, with one scale per channel or tensor."""
    tq = plan.tensors.get(layer.weight)
    return (tq is not None and tq.role == "weight" and layer.op_type != "MatMul" and not tq.spec.block_size
            and tq.spec.bits < 16 and not integer_input(plan, layer) and layer.node not in plan.binary_inputs)


def choose(plan: Plan, mode: str, elsewhere: frozenset = frozenset()) -> Choice:
    """Which layers' sub-8-bit weights are stored as 8-bit codes (`elsewhere`: layers whose weights
    another operator stores, e.g. the native ones)."""
    if mode not in MODES:
        raise PtqError(f"unknown container '{mode}' (known: {', '.join(MODES)})")
    choice = Choice(mode)
    for layer in plan.layers:
        tq = plan.tensors.get(layer.weight)
        if tq is None or tq.role != "weight" or layer.node in elsewhere:
            continue
        if mode != "int8" and indexable(tq.spec):
            choice.indexed[layer.node] = (f"{len(code_levels(tq.spec))} levels: 4-bit indices into the level table, "
                                          "decoded when ORT loads the model")
        if mode == "auto" and decodable(plan, layer):
            choice.decoded[layer.node] = DECODED_REASON
            continue
        if tq.spec.storage_bits != 4:
            continue
        if tq.spec.block_size:
            choice.kept[layer.node] = "block-wise scales: no integer kernel takes them"
        elif mode == "int4":
            choice.kept[layer.node] = "--container int4"
        elif mode == "int8":
            choice.widened[layer.node] = "--container int8"
        elif integer_input(plan, layer):
            choice.widened[layer.node] = f"its input is 8-bit: ORT's integer {layer.op_type} kernel takes int8 codes"
            if mode == "auto":
                choice.widened[layer.node] += " (widened when ORT loads the model)"
        else:
            choice.kept[layer.node] = weight_only(layer)
    # One initializer per weight: a weight that one reader widens is widened for all of them.
    readers = {layer.node: layer.weight for layer in plan.layers}
    widened_weights = {readers[node] for node in choice.widened}
    for node in [n for n in choice.kept if readers[n] in widened_weights]:
        choice.widened[node] = "shares its weight with a layer stored as int8"
        del choice.kept[node]
    return choice


def index_levels(model: ModelProto, plan: Plan, choice: Choice) -> int:
    """Store the chosen level-set codes as uint4 indices into their level table, in place, decoded by
    a Cast and a Gather that write the codes' old name (ORT folds both at load). Returns the bytes
    this saves."""
    specs = {layer.weight: plan.tensors[layer.weight].spec for layer in plan.layers if layer.node in choice.indexed}
    codes_of = {qdq_names(w).quantized: spec for w, spec in specs.items()}
    saved, nodes = 0, []
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name not in codes_of:
            continue
        codes = numpy_helper.to_array(tensor)
        table = code_levels(codes_of[tensor.name]).astype(codes.dtype)
        index = np.searchsorted(table, codes)
        if not np.array_equal(table[np.minimum(index, len(table) - 1)], codes):
            continue  # not the plan's codes (another operator stores this weight)
        name = tensor.name
        stored = [make_initializer(f"{name}_index", index.astype(np.uint8), TensorProto.UINT4),
                  numpy_helper.from_array(table, f"{name}_levels")]
        saved += tensor.ByteSize() - sum(t.ByteSize() for t in stored)
        model.graph.initializer[i].CopyFrom(stored[0])
        model.graph.initializer.append(stored[1])
        nodes += [helper.make_node("Cast", [f"{name}_index"], [f"{name}_index_int32"], name=f"{name}_index_Cast",
                                   to=TensorProto.INT32),
                  helper.make_node("Gather", [f"{name}_levels", f"{name}_index_int32"], [name], name=f"{name}_decode",
                                   axis=0)]
    saved -= sum(_field_bytes(n) for n in nodes)
    decoded = nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(decoded)
    return saved


def decode_at_load(model: ModelProto, plan: Plan, choice: Choice) -> int:
    """Each chosen layer's weight DequantizeLinear (x - zero) * scale rewritten as a Cast to float,
    a Sub of the zero point (when not all zero) and a Mul by the scale shaped for its axis, in
    place: the same float32 values (the codes and zero points are small integers), from nodes ORT
    folds into the weight when it loads the model, where it keeps a DequantizeLinear for the
    fusions it may find. A chosen layer with no such DequantizeLinear (another operator reads its
    codes) leaves the choice. Returns the bytes this adds to the serialized graph."""
    codes_of = {qdq_names(name).quantized: layer.node for layer in plan.layers if layer.node in choice.decoded
                for name in layer.weights}
    if not codes_of:
        return 0
    inits = {t.name: t for t in model.graph.initializer}
    count = len(model.graph.initializer)
    nodes, added, done = [], 0, set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in codes_of:
            nodes.append(node)
            continue
        made = _decoded(model, node, inits)
        added += sum(_field_bytes(n) for n in made) - _field_bytes(node)
        nodes += made
        done.add(codes_of[node.input[0]])
    for node in set(choice.decoded) - done:
        del choice.decoded[node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    added += sum(_field_bytes(t) for t in model.graph.initializer[count:])
    # The scales and zero points only the DequantizeLinears read are now read in their new shapes
    # (what a subgraph reads from the enclosing graph stays).
    read = reads(model)
    unread = [i for i, t in enumerate(model.graph.initializer[:count]) if t.name not in read]
    for i in reversed(unread):
        added -= _field_bytes(model.graph.initializer[i])
        del model.graph.initializer[i]
    return added


def _decoded(model: ModelProto, dq, inits: dict) -> list:
    """The nodes computing a DequantizeLinear's output from constants ORT folds (decode_at_load)."""
    codes, scale = dq.input[0], dq.input[1]
    zero = dq.input[2] if len(dq.input) > 2 else ""
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    stored = inits.get(codes, inits.get(f"{codes}_index"))  # level-set codes come from their indices
    rank = len(stored.dims)
    scale_value = numpy_helper.to_array(inits[scale])
    shape = [1] * rank
    if scale_value.ndim == 1:
        shape[axis % rank] = -1
    out, made = dq.output[0], []
    shaped = f"{scale}_at_load"
    model.graph.initializer.append(numpy_helper.from_array(scale_value.reshape(shape if scale_value.ndim else ()), shaped))
    # In the scale's float type, as DequantizeLinear's output is (float16 graphs keep float16).
    made.append(helper.make_node("Cast", [codes], [f"{out}_codes_float"], name=f"{dq.name}_Cast",
                                 to=inits[scale].data_type))
    source = f"{out}_codes_float"
    zero_value = numpy_helper.to_array(inits[zero]).astype(scale_value.dtype) if zero in inits else None
    if zero_value is not None and np.any(zero_value):
        centred = f"{zero}_at_load"
        model.graph.initializer.append(numpy_helper.from_array(zero_value.reshape(shape if zero_value.ndim else ()), centred))
        made.append(helper.make_node("Sub", [source, centred], [f"{out}_centred"], name=f"{dq.name}_Sub"))
        source = f"{out}_centred"
    made.append(helper.make_node("Mul", [source, shaped], [out], name=dq.name))
    return made


UNFUSED_REASON = ("ORT ran it in float, dequantizing its weights on every run: decoded to float weights when ORT "
                  "loads the model instead (the same values)")


def decode_unfused(model: ModelProto, plan: Plan, choice: Choice, kernels: dict[str, str]) -> tuple[list[str], int]:
    """The layers ORT's optimized graph shows running in float on weights it dequantizes on every
    run (`kernels`: export/measures.layer_kernels, "<op> (float)"; a layer whose integer kernel did
    not materialize: a Conv whose output stays float, an op ORT has no integer form of) get their
    weights decoded at load as weight-only layers do, in place: the same float32 weights, folded
    once. Codes widened for an integer kernel stay as they are (the card lists them as not fused).
    Under `auto` only, as decode_at_load. Adds the layers to choice.decoded; returns them and the
    bytes this adds."""
    if choice.mode != "auto":
        return [], 0
    late = Choice(choice.mode, decoded={
        layer.node: UNFUSED_REASON for layer in plan.layers
        if kernels.get(layer.node, "").endswith(" (float)") and layer.node not in choice.widened
        and layer.weight in plan.tensors and not plan.tensors[layer.weight].spec.block_size})
    added = decode_at_load(model, plan, late)
    choice.decoded.update(late.decoded)
    return sorted(late.decoded), added


def widened_at(mode: str) -> str:
    """Where the chosen codes become 8-bit: in the file (`--container int8`) or when ORT loads it."""
    return "file" if mode == "int8" else "load"


def widen(model: ModelProto, plan: Plan, choice: Choice) -> int:
    """Have the chosen layers' int4/uint4 codes and zero points read as int8/uint8, in place: stored
    so, or behind a Cast that ORT folds at load. Returns the bytes this adds to the model file."""
    weights = {layer.weight for layer in plan.layers if layer.node in choice.widened}
    names = {getattr(qdq_names(w), part) for w in weights for part in ("quantized", "zero_point")}
    narrow = [(i, t) for i, t in enumerate(model.graph.initializer) if t.name in names and t.data_type in WIDER]
    if widened_at(choice.mode) == "load":
        return _cast_at_load(model, [t for _, t in narrow])
    added = 0
    for i, tensor in narrow:
        kind, dtype = WIDER[tensor.data_type]
        wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name)
        assert wide.data_type == kind
        added += wide.ByteSize() - tensor.ByteSize()
        model.graph.initializer[i].CopyFrom(wide)
    return added


def _cast_at_load(model: ModelProto, tensors: list[TensorProto]) -> int:
    """Every reader of each tensor reads a Cast of it to its 8-bit type instead; the Casts go first, as
    their inputs are initializers. Returns the bytes this adds to the serialized graph."""
    wide = {t.name: f"{t.name}_8bit" for t in tensors}
    casts = [helper.make_node("Cast", [t.name], [wide[t.name]], name=f"{t.name}_Cast", to=WIDER[t.data_type][0])
             for t in tensors]
    readers = [node for node in model.graph.node if any(x in wide for x in node.input)]
    before = sum(_field_bytes(node) for node in readers)
    for node in readers:
        node.input[:] = [wide.get(x, x) for x in node.input]
    added = sum(_field_bytes(node) for node in readers + casts) - before
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return added


def _field_bytes(message) -> int:
    """A message's bytes as a field of its parent: tag, length and body."""
    size = message.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def stored_types(model: ModelProto, plan: Plan) -> dict[str, str]:
    """{node: the ONNX type holding its weight}: the codes' initializer behind a DequantizeLinear
    (with the type a Cast widens it to at load, or the level table its indices decode through), or
    the weight itself when it stayed float."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    cast_to = {n.input[0]: NAMES[n.attribute[0].i] for n in model.graph.node
               if n.op_type == "Cast" and n.input and n.input[0] in inits}
    out = {}
    for layer in plan.layers:
        codes = qdq_names(layer.weight).quantized
        if f"{codes}_index" in inits and f"{codes}_levels" in inits:
            out[layer.node] = f"uint4 indices, {NAMES[inits[f'{codes}_levels']]} levels at load"
            continue
        for name in (codes, layer.weight):
            if name in inits:
                out[layer.node] = NAMES.get(inits[name], TensorProto.DataType.Name(inits[name]).lower())
                if name in cast_to:
                    out[layer.node] += f", {cast_to[name]} at load"
                break
    return out


@dataclass(frozen=True)
class Stored:
    """What `store` chose and what it cost or saved, in bytes of the model file."""

    choice: Choice
    extra_bytes: int
    saved_bytes: int
    decoded_bytes: int
    bias_fused: list[str]

    def record(self) -> dict:
        """The card's account (model.container): the choice, its size cost, what the level-set
        indices saved, what decoding at load changed (a few bytes either way), the fused biases."""
        c = self.choice
        return {"mode": c.mode, "int8": dict(c.widened), "smallest": dict(c.kept), "extra_bytes": int(self.extra_bytes),
                "widened_at": widened_at(c.mode),
                **({"indexed": dict(c.indexed), "saved_bytes": int(self.saved_bytes)} if c.indexed else {}),
                **({"decoded": dict(c.decoded), "decoded_bytes": int(self.decoded_bytes)} if c.decoded else {}),
                **({"bias_fused": self.bias_fused} if self.bias_fused else {})}


def store(model: ModelProto, g: Graph, plan: Plan, mode: str = "auto", elsewhere: frozenset = frozenset(),
          contrib_ops: bool = True) -> Stored:
    """Each layer's codes put, in place, in the container `mode` chooses (`elsewhere`: layers another
    operator stores); with contrib ops, integer MatMuls then take their bias (export/integer_kernels.py)."""
    choice = choose(plan, mode, elsewhere)
    saved = index_levels(model, plan, choice)
    extra = widen(model, plan, choice)
    decoded = decode_at_load(model, plan, choice)
    return Stored(choice, extra, saved, decoded, fuse_biases(model, g, plan) if contrib_ops else [])


def export(g: Graph, plan: Plan, mode: str = "auto", contrib_ops: bool = True) -> tuple[ModelProto, Stored]:
    """The QDQ model with each layer's codes in the container `mode` chooses, and what was stored how."""
    model = export_qdq(g, plan, contrib_ops=contrib_ops)
    return model, store(model, g, plan, mode, contrib_ops=contrib_ops)
