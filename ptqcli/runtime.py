"""ONNX Runtime sessions: the one place sessions are configured."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from . import nativelib
from .errors import PtqError
from .parallel import session_threads
from .graph import (clone, keep_only, load_model, model_bytes_or_path, nodes_within, reads, shell, subgraph_reads, through_file,
                    write_external)


def uses_native_ops(model: ModelProto) -> bool:
    return any(o.domain == nativelib.DOMAIN for o in model.opset_import)


def session_options(model: ModelProto) -> ort.SessionOptions:
    """Quiet options, with the ptqcli operator library registered when the model uses it."""
    options = nativelib.session_options() if uses_native_ops(model) else ort.SessionOptions()
    options.log_severity_level = 3
    if session_threads():  # a Ray task's share of its machine
        options.intra_op_num_threads = session_threads()
    return options


def without_spinning(options: ort.SessionOptions) -> ort.SessionOptions:
    """`options` with the session's threads sleeping as soon as a run ends. ORT's threads otherwise
    spin a while waiting for more work, keeping their cores busy into whatever runs next, which then
    shares them: on 2 cores a 2.6 ms MatMul timed straight after another session's run took 12 ms,
    and numpy's X^T X of a [4096, 1536] output straight after its run 2.7x longer. For sessions
    that take turns with other sessions or with numpy; what a deployed model (one session) gains
    from spinning is the same for every model compared."""
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session(model: ModelProto, optimize: bool = True, scratch: Path | None = None, outputs: list[str] | None = None,
            only: bool = False, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session; `optimize=False` runs every node as written (emulated QDQ, no fusion);
    `spinning=False` for one that takes turns with other work (see without_spinning).
    `outputs` adds intermediate tensors to the model's outputs (as `with_outputs`), or with `only`
    makes them its sole outputs and drops what they do not need (as `truncated`). A large model's
    variant is made from its weightless shell and written with its weights read in place: no
    copy of the weights is ever made for a session."""
    if through_file(model):
        return session_with_weights(_variant(shell(model), outputs, only), model, optimize, scratch, spinning)
    options = _options(model, optimize, spinning)
    with tempfile.TemporaryDirectory() as tmp:
        return _loaded(model_bytes_or_path(_variant(model, outputs, only), Path(scratch or tmp)), options, "the model")


def session_with_weights(graph_only: ModelProto, weights: ModelProto, optimize: bool = True,
                         scratch: Path | None = None, spinning: bool = True) -> ort.InferenceSession:
    """A session of `graph_only` (a shell: see graph.shell) with the initializers it reads taken
    from `weights`, written beside it tensor by tensor."""
    needed = reads(graph_only) | {o.name for o in graph_only.graph.output}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(scratch or tmp) / "model.onnx"
        write_external(graph_only, (t for t in weights.graph.initializer if t.name in needed), path)
        loaded = _loaded(str(path), _options(graph_only, optimize, spinning), "the model")
    release_memory()
    return loaded


def _options(model: ModelProto, optimize: bool, spinning: bool = True) -> ort.SessionOptions:
    options = session_options(model) if spinning else without_spinning(session_options(model))
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _variant(model: ModelProto, outputs: list[str] | None, only: bool) -> ModelProto:
    if outputs is None:
        return model
    return truncated(model, outputs) if only else with_outputs(model, outputs)


def release_memory() -> None:
    """Hand freed heap back to the system. A language model's serialized copies (for ORT, for the
    checker, for shape inference) are freed but stay in the process's heap otherwise, and peak
    memory is what decides whether a model can be quantized on a given machine."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl without the symbol): nothing to trim
        return None


_LIBC = _libc()


def file_session(path: str | Path, what: str) -> ort.InferenceSession:
    """A CPU session of a model file, ORT reading its external data itself (nothing loaded here)."""
    return _loaded(str(path), session_options(load_model(path, weights=False)), what)


def _loaded(source: bytes | str, options: ort.SessionOptions, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqError(f"ONNX Runtime cannot load {what}: {first}") from None


def tensor_outputs(sess: ort.InferenceSession) -> list[str]:
    """The session's outputs that are tensors: a ZipMap's sequence of maps (scikit-learn
    classifiers) repeats the probability tensor and is neither compared nor stacked."""
    return [o.name for o in sess.get_outputs() if o.type.startswith("tensor")]


def run_session(sess: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """session.run, with a failing node reported as one line (ORT's own log of it silenced)."""
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        return sess.run(names, feeds, quiet)
    except Exception as exc:  # ORT raises its own exception types, one per status code
        text = str(exc)
        detail = text.split("Status Message: ", 1)[1] if "Status Message: " in text else text.splitlines()[0]
        raise PtqError(f"ONNX Runtime failed running the model: {detail.strip()}") from None


def feeds_for(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds the session takes (ORT refuses names it does not know, e.g. after `truncated`)."""
    wanted = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def with_outputs(model: ModelProto, names: list[str]) -> ModelProto:
    """A copy of the model that also returns the given intermediate tensors."""
    out = clone(model)
    existing = {o.name for o in out.graph.output}
    out.graph.output.extend(_output(model, n) for n in names if n not in existing)
    return out


def _output(model: ModelProto, name: str):
    """An output declaration of `name`, of the element type the model's value_info gives it (float
    when it does not say: what most tensors asked for are)."""
    known = next((vi.type.tensor_type.elem_type for vi in (*model.graph.value_info, *model.graph.input)
                  if vi.name == name and vi.type.HasField("tensor_type")), TensorProto.FLOAT)
    return helper.make_tensor_value_info(name, known or TensorProto.FLOAT, None)


def truncated(model: ModelProto, outputs: list[str]) -> ModelProto:
    """A copy that computes only `outputs`: the nodes they depend on and the inputs those read.

    ONNX Runtime runs every node of a session whatever outputs are asked for, so a pass that
    needs an early tensor should not pay for the rest of the network."""
    out = clone(model)
    needed, kept = set(outputs), []
    for node in reversed(out.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(subgraph_reads(node))
    del out.graph.node[:]
    out.graph.node.extend(reversed(kept))
    for field in (out.graph.input, out.graph.initializer):
        keep_only(field, lambda t: t.name in needed)
    del out.graph.output[:]
    out.graph.output.extend(_output(model, n) for n in outputs)
    return out


def optimized_model(model: ModelProto, what: str = "the model") -> ModelProto:
    """The graph ORT actually runs after its optimizations (the kernel path); external data is not loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        return optimized_graph(model_bytes_or_path(model, Path(tmp)), session_options(model), what)


def optimized_graph(source: bytes | str, options: ort.SessionOptions, what: str) -> ModelProto:
    """optimized_model of a model given as bytes or a file (with its weights beside it); the
    optimized weights go to a file of their own, so a model of any size can be read back."""
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        _loaded(source, options, what)
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def optimized_op_counts(model: ModelProto | None = None, optimized: ModelProto | None = None) -> dict[str, int]:
    """Op types of the graph ORT actually runs after its optimizations (the kernel path), subgraphs included."""
    optimized = optimized if optimized is not None else optimized_model(model)
    # the subgraphs' ops too: a quantized If branch runs its own kernels
    return dict(sorted(Counter(node.op_type for node in nodes_within(optimized.graph)).items()))


@lru_cache(maxsize=1)
def int8_kernels_saturate() -> bool:
    """Does this ORT build, on this CPU, saturate u8s8 products in its fused int8 Conv?

    Without VNNI, x86 kernels add pairs of u8 x s8 products in 16 bits (vpmaddubsw), which
    overflows with full-range weights. Asking the kernel beats reading CPU flags: hypervisors
    and ORT builds differ in what they use. A 1x1 conv over 64 channels of 255 x 127 has an exact
    sum of 2,072,640; saturated pairs give at most 32 x 32,767.
    """
    channels = 64
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zp_u8"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zp_u8"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "one", "zp_s8"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "out_scale", "zp_u8"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "out_scale", "zp_u8"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(10_000.0, np.float32), "out_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
        numpy_helper.from_array(np.array(0, np.int8), "zp_s8"),
        numpy_helper.from_array(np.full((1, channels, 1, 1), 127, np.int8), "wq"),
    ]
    graph = helper.make_graph(nodes, "saturation_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    out = session(model).run(None, {"x": np.full((1, channels, 2, 2), 255.0, np.float32)})[0]
    exact = channels * 255 * 127
    return bool(np.any(np.abs(out - round(exact / 10_000) * 10_000) > 10_000))
