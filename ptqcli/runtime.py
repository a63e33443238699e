"""ONNX Runtime sessions: the one place sessions are configured."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper

from .errors import PtqError
from .graph import clone, model_bytes_or_path


def session(model: ModelProto, optimize: bool = True, scratch: Path | None = None) -> ort.InferenceSession:
    """A CPU session; `optimize=False` runs every node as written (emulated QDQ, no fusion)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        source = model_bytes_or_path(model, Path(scratch or tmp))
        try:
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PtqError(f"ONNX Runtime cannot load the model: {first}") from None


def with_outputs(model: ModelProto, names: list[str]) -> ModelProto:
    """A copy of the model that also returns the given intermediate tensors."""
    out = clone(model)
    existing = {o.name for o in out.graph.output}
    out.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in existing
    )
    return out


def optimized_op_counts(model: ModelProto) -> dict[str, int]:
    """Op types of the graph ORT actually runs after its optimizations (the kernel path)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model_bytes_or_path(model, Path(tmp)), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
