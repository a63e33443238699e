"""Loading, preparing and saving ONNX models; read-only views of a graph's structure."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, external_data_helper, helper, numpy_helper

from .errors import PtqError
from .files import check_writable, write_atomic

MIN_OPSET = 13
# Protobuf cannot serialise a single message over 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Lowest IR version that goes with each opset (onnx.helper.VERSION_TABLE, spelled out for the ones we emit).
IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}


@dataclass
class Graph:
    """A model plus cached maps of who produces and who consumes each tensor.

    The maps are computed once per Graph; transforms build a new Graph rather than mutate one.
    """

    model: ModelProto
    source: str = ""
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # what preparation changed, as numbers for the card
    # Where weights stored as external data are read from when the model was loaded without them
    # (load_model(..., weights=False)): each constant() then reads its tensor from disk.
    weights_dir: str = ""

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @cached_property
    def initializers(self) -> dict[str, TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @cached_property
    def producer(self) -> dict[str, NodeProto]:
        return {out: n for n in self.graph.node for out in n.output if out}

    @cached_property
    def consumers(self) -> dict[str, list[NodeProto]]:
        table: dict[str, list[NodeProto]] = {}
        for n in self.graph.node:
            for name in n.input:
                if name:
                    table.setdefault(name, []).append(n)
        return table

    @cached_property
    def node_by_name(self) -> dict[str, NodeProto]:
        return {n.name: n for n in self.graph.node}

    @cached_property
    def value_types(self) -> dict[str, int]:
        """Element type of every tensor whose type is known (inputs, outputs, value_info, constants)."""
        types = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in self.graph.initializer:
            types[t.name] = t.data_type
        return types

    @cached_property
    def value_shapes(self) -> dict[str, list]:
        shapes = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim
                ]
        return shapes

    @cached_property
    def graph_inputs(self) -> list[onnx.ValueInfoProto]:
        """Real inputs: old models also list their initializers as inputs."""
        return [i for i in self.graph.input if i.name not in self.initializers]

    @cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.graph.output]

    @property
    def opset(self) -> int:
        return default_opset(self.model)

    def constant(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return None if t is None else numpy_helper.to_array(t, self.weights_dir)

    def is_float(self, name: str) -> bool:
        return self.value_types.get(name) == TensorProto.FLOAT


def is_huge(model: ModelProto) -> bool:
    """Too big for one protobuf message: must be saved with external data, checked on disk."""
    return approximate_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def approximate_bytes(model: ModelProto) -> int:
    """The serialized size of a model, within a few bytes per tensor. ByteSize() would serialize
    the whole model to measure it (seconds for a language model, on every call); initializers are
    counted from their data fields, nodes (Constant tensors and subgraphs included) in full."""
    graph = model.graph
    nodes = sum(node.ByteSize() for node in graph.node)
    return nodes + sum(tensor_bytes(t) for t in graph.initializer) + 1024 * (len(graph.input) + len(graph.output))


def tensor_bytes(t: onnx.TensorProto) -> int:
    fixed = 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
    small = 4 * (len(t.float_data) + len(t.int32_data))
    return (len(t.raw_data) + fixed + small + sum(len(v) for v in t.string_data) + len(t.name)
            + sum(e.ByteSize() for e in t.external_data) + 16 * len(t.dims) + 32)


def default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: str | os.PathLike, weights: bool = True) -> ModelProto:
    """Read a model (with any external data beside it, unless `weights` is off: then tensors stored
    as external data stay references to their files); every failure is a one-line PtqError."""
    p = Path(path)
    if not p.exists():
        raise PtqError(f"model file not found: {p}")
    if p.is_dir():
        raise PtqError(f"expected an ONNX file, got a directory: {p}")
    try:
        model = onnx.load(str(p), load_external_data=weights)
    except Exception as exc:  # protobuf raises several unrelated types for a bad file
        raise PtqError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise PtqError(f"{p} is not an ONNX model (no graph nodes; truncated or another format?)")
    return model


def check_model(model: ModelProto | Path, what: str) -> None:
    problem = checker_problem(model)
    if problem is not None:
        raise PtqError(f"{what} fails onnx.checker: {problem}")


def checker_problem(model: ModelProto | Path, full: bool = False) -> str | None:
    """onnx.checker's first line about the model (or the model file, external data and all), or
    None when it passes; `full` adds strict shape and type inference. Models over 2 GB cannot be
    checked in memory and pass; as files they are checked."""
    try:
        if isinstance(model, Path):
            onnx.checker.check_model(str(model), full_check=full)
        elif not is_huge(model):
            onnx.checker.check_model(model, full_check=full)
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def check_output(model: ModelProto, source: ModelProto, what: str) -> None:
    """What is written must be valid: onnx.checker, and its full check with shape inference
    wherever the source model passes that too (a source with inconsistent shapes is not ours to
    mend)."""
    check_model(model, what)
    problem = checker_problem(model, full=True)
    if problem is not None and checker_problem(source, full=True) is None:
        raise PtqError(f"{what} fails onnx.checker's shape inference: {problem}")


def save_model(model: ModelProto, path: str | os.PathLike, external: bool = False) -> None:
    """Write atomically; models too large for one protobuf get their tensors in `<name>.data`, and
    so do those `external` asks it of (written tensor by tensor, never serialized whole)."""
    target = Path(path)
    if not is_huge(model) and not external:
        write_atomic(target, model.SerializeToString(deterministic=True))
        return
    check_writable(target)
    try:
        _save_with_external_data(model, target)
    except OSError as exc:
        raise PtqError(f"cannot write {target}: {exc.strerror}") from None


def _save_with_external_data(model: ModelProto, target: Path) -> None:
    with staged(target) as path:
        write_external(shell(model), model.graph.initializer, path)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Where to write a model with external data so that `target` appears whole or not at all: a
    scratch path beside it; when the block succeeds its `.data` file is moved first, the model last."""
    data_name = target.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging / target.name
        if (staging / data_name).exists():  # absent when every tensor was under the size threshold
            os.replace(staging / data_name, target.parent / data_name)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shell(model: ModelProto, initializers: Iterable[onnx.TensorProto] = ()) -> ModelProto:
    """A copy of the model without its initializers (then `initializers` as its own): everything but
    the weights, cheap to copy and change even for a language model."""
    out = ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.initializer.extend(initializers)
    return out


def fragment(model: ModelProto, nodes: Iterable[NodeProto], inputs: Iterable[onnx.ValueInfoProto],
             outputs: Iterable[onnx.ValueInfoProto], initializers: Iterable[onnx.TensorProto]) -> ModelProto:
    """A model of some of `model`'s nodes (its opsets, functions and IR version), with the given
    inputs, outputs and initializers."""
    out = ModelProto()
    _copy_fields(model, out, skip="graph")
    out.graph.name = model.graph.name or "fragment"
    out.graph.node.extend(nodes)
    out.graph.input.extend(inputs)
    out.graph.output.extend(outputs)
    out.graph.initializer.extend(initializers)
    return out


def _copy_fields(source, target, skip: str) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        mine = getattr(target, descriptor.name)
        if hasattr(mine, "extend"):  # a repeated field
            mine.extend(value)
        elif hasattr(mine, "CopyFrom"):
            mine.CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def without_weight_data(model: ModelProto) -> tuple[ModelProto, set[str]]:
    """A copy of the model whose float initializers over 1 KiB keep their name, type and shape only
    (what shape inference and the opset converter read of weights), and the names of those."""
    stubs: set[str] = set()
    kept = []
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and tensor_bytes(t) > 1024:
            kept.append(onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type))
            stubs.add(t.name)
        else:
            kept.append(t)
    return shell(model, kept), stubs


INLINE_BYTES = 1024  # tensors up to this size stay inside the .onnx file


def write_external(model: ModelProto, initializers: Iterable[onnx.TensorProto], path: Path) -> None:
    """`model` (a shell) with `initializers` written to `path`, their data to `<path>.data` one
    tensor at a time: the whole model is never serialized at once (that would be another copy of
    every weight in memory, and impossible past protobuf's 2 GB)."""
    stubs = write_tensors(initializers, path.parent / (path.name + ".data"))
    model.graph.initializer.extend(stubs)
    try:
        path.write_bytes(model.SerializeToString(deterministic=True))
    finally:
        del model.graph.initializer[len(model.graph.initializer) - len(stubs):]


def write_tensors(initializers: Iterable[onnx.TensorProto], data_path: Path) -> list[onnx.TensorProto]:
    """Each tensor's data appended to `data_path` as it comes (an iterable may make them one at a
    time); the initializers that refer to it (small ones inline, as given)."""
    stubs = []
    with open(data_path, "wb") as data:
        for t in initializers:
            if t.data_type == onnx.TensorProto.STRING or tensor_bytes(t) <= INLINE_BYTES \
                    or t.data_location == onnx.TensorProto.EXTERNAL:
                stubs.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            offset = data.tell()
            data.write(raw)
            data.write(b"\0" * (-len(raw) % 64))  # aligned, so that a runtime may map tensors in place
            stub = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type,
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                stub.external_data.add(key=key, value=value)
            stubs.append(stub)
    return stubs


def with_data(t: onnx.TensorProto, weights_dir: str) -> onnx.TensorProto:
    """`t` with its data inside (read from its external file when it has one)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t
    out = onnx.TensorProto()
    out.CopyFrom(t)
    external_data_helper.load_external_data_for_tensor(out, weights_dir)
    out.data_location = onnx.TensorProto.DEFAULT
    del out.external_data[:]
    return out


# Above this a model reaches ONNX Runtime through a file: an InferenceSession made from bytes keeps
# them for as long as it lives, a second copy of every weight.
SESSION_BYTES_LIMIT = 64 * 2**20


def through_file(model: ModelProto) -> bool:
    """Does the model reach ONNX Runtime through a file (SESSION_BYTES_LIMIT)?"""
    return approximate_bytes(model) >= SESSION_BYTES_LIMIT


def model_bytes_or_path(model: ModelProto, scratch: Path) -> bytes | str:
    """What onnxruntime.InferenceSession accepts: bytes when small, else a file in `scratch` with
    the weights beside it (write_external)."""
    if not through_file(model):
        return model.SerializeToString()
    path = scratch / "model.onnx"
    write_external(shell(model), model.graph.initializer, path)
    return str(path)


def subgraphs(node: NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a control-flow node (If's branches, Loop's and Scan's body)."""
    return [sub for a in node.attribute for sub in list(a.graphs) + ([a.g] if a.HasField("g") else [])]


def nodes_within(graph: onnx.GraphProto) -> Iterator[NodeProto]:
    """Every node of the graph, and of its control-flow nodes' subgraphs."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from nodes_within(sub)


def subgraph_reads(node: NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing graph (and their own)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(inner.input)
            names.update(subgraph_reads(inner))
    return names


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from the scopes around it."""
    defined = ({t.name for t in graph.initializer} | {i.name for i in graph.input}
               | {out for node in graph.node for out in node.output})
    read = {name for node in graph.node for name in node.input if name}
    for node in graph.node:
        for sub in subgraphs(node):
            read |= outer_reads(sub)
    return read - defined


def reads(model: ModelProto) -> set[str]:
    """Every tensor some node reads, in the main graph or in its subgraphs."""
    return {name for n in model.graph.node for name in (*n.input, *subgraph_reads(n))}


def keep_only(repeated, keep) -> None:
    """Delete the elements of a repeated protobuf field for which `keep(element)` is false, in place.
    Holding the kept elements while clearing the field and extending it again would copy each one
    (and keep the old storage alive): a language model's weights twice over."""
    for i in reversed(range(len(repeated))):
        if not keep(repeated[i]):
            del repeated[i]


def import_domain(model: ModelProto, domain: str, version: int = 1) -> None:
    """Declare an operator domain the model's nodes use (com.microsoft, ptqcli's), once."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def drop_unused(model: ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads (repeat until stable)."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = reads(model) | graph_outputs
        live = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(live) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(live)
    drop_unused_initializers(model)


def drop_unused_initializers(model: ModelProto) -> ModelProto:
    """`model` (changed in place) without the initializers no node reads and no output names."""
    used = reads(model) | {o.name for o in model.graph.output}
    keep_only(model.graph.initializer, lambda t: t.name in used)
    return model


def clone(model: ModelProto) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(model)
    return copy


def set_opset(model: ModelProto, opset: int) -> ModelProto:
    """Convert the default-domain opset (upwards) and raise the IR version to match it."""
    current = default_opset(model)
    if current < opset:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:
            raise PtqError(f"cannot convert the model from opset {current} to {opset}: {exc}") from None
    model.ir_version = max(model.ir_version, IR_FOR_OPSET.get(max(opset, current), 10))
    return model


def make_initializer(name: str, array: np.ndarray, onnx_type: int | None = None) -> TensorProto:
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        # Two codes a byte, the first in the low nibble, as raw bytes: half a byte per code in the file
        # (int32_data would store each byte as a varint, up to two).
        nibbles = (array.astype(np.int64).ravel() & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return helper.make_tensor(name, onnx_type, list(array.shape), packed.tobytes(), raw=True)
    return numpy_helper.from_array(array, name)
