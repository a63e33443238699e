"""Loading, preparing and saving ONNX models; read-only views of a graph's structure."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

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
        return None if t is None else numpy_helper.to_array(t)

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


def load_model(path: str | os.PathLike) -> ModelProto:
    """Read a model (with any external data beside it); every failure is a one-line PtqError."""
    p = Path(path)
    if not p.exists():
        raise PtqError(f"model file not found: {p}")
    if p.is_dir():
        raise PtqError(f"expected an ONNX file, got a directory: {p}")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types for a bad file
        raise PtqError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise PtqError(f"{p} is not an ONNX model (no graph nodes; truncated or another format?)")
    return model


def check_model(model: ModelProto, what: str) -> None:
    problem = checker_problem(model)
    if problem is not None:
        raise PtqError(f"{what} fails onnx.checker: {problem}")


def checker_problem(model: ModelProto, full: bool = False) -> str | None:
    """onnx.checker's first line about the model, or None when it passes; `full` adds strict shape
    and type inference. Models over 2 GB cannot be checked in memory and pass."""
    try:
        if not is_huge(model):
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


def save_model(model: ModelProto, path: str | os.PathLike) -> None:
    """Write atomically; models too large for one protobuf get their tensors in `<name>.data`."""
    target = Path(path)
    if not is_huge(model):
        write_atomic(target, model.SerializeToString(deterministic=True))
        return
    check_writable(target)
    try:
        _save_with_external_data(model, target)
    except OSError as exc:
        raise PtqError(f"cannot write {target}: {exc.strerror}") from None


def _save_with_external_data(model: ModelProto, target: Path) -> None:
    """Tensors to `<name>.data`: both files are staged, the data moved first, the model last."""
    data_name = target.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # save_model moves tensors out of the proto it is given: hand it a copy.
        onnx.save_model(clone(model), str(staging / target.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if (staging / data_name).exists():  # absent when every tensor was under the size threshold
            os.replace(staging / data_name, target.parent / data_name)
        os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Above this a model reaches ONNX Runtime through a file: an InferenceSession made from bytes keeps
# them for as long as it lives, a second copy of every weight.
SESSION_BYTES_LIMIT = 64 * 2**20


def model_bytes_or_path(model: ModelProto, scratch: Path) -> bytes | str:
    """What onnxruntime.InferenceSession accepts: bytes when small, a saved file otherwise."""
    if approximate_bytes(model) < SESSION_BYTES_LIMIT:
        return model.SerializeToString()
    path = scratch / "model.onnx"
    save_model(model, path)
    return str(path)


def subgraphs(node: NodeProto) -> list[onnx.GraphProto]:
    """The bodies of a control-flow node (If's branches, Loop's and Scan's body)."""
    return [sub for a in node.attribute for sub in list(a.graphs) + ([a.g] if a.HasField("g") else [])]


def subgraph_reads(node: NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from the enclosing graph (and their own)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(inner.input)
            names.update(subgraph_reads(inner))
    return names


def reads(model: ModelProto) -> set[str]:
    """Every tensor some node reads, in the main graph or in its subgraphs."""
    return {name for n in model.graph.node for name in (*n.input, *subgraph_reads(n))}


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
