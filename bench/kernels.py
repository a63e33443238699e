"""Native operator latency: the ptqcli Int4/Binary/Shift kernels beside ONNX Runtime's fp32, int8 and
MatMulNBits (int4) kernels, on GEMM shapes and three EfficientNet-Lite0 convolutions at batch 1.

    python bench/kernels.py [--quick] [--reps 20] [--min-time 1.0] [--threads 2]

Every session runs on the CPUExecutionProvider with intra_op_num_threads=--threads and the default
graph optimization level. A latency is the median of all timed runs of one model (inputs bound once
through I/O binding), after warm-up; the models of one shape are timed in interleaved rounds so
background load hits them alike. Before timing, every ptqcli operator's output is checked: bit for
bit against ptqcli.export.native_ref on one GEMM shape and on every conv shape, and on every GEMM
shape against a float64 model of its own arithmetic (ORT's int8 and int4 against fp32, loosely).
A model whose output fails its check is reported as wrong and not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptqcli import nativelib  # noqa: E402
from ptqcli.runtime import without_spinning  # noqa: E402
from ptqcli.export import native_ref as R  # noqa: E402

GEMM_M = (1, 16, 128)
GEMM_KN = (768, 2048, 4096)
QUICK_M = (1, 16)
QUICK_KN = (768,)
EXACT_SHAPE = (16, 768)  # (M, K=N) checked bit for bit against native_ref
# name, in channels, size, out channels, kernel, stride, pad, group
CONVS = (
    ("stem 3->32 3x3 s2, 224x224", 3, 224, 32, 3, 2, 1, 1),
    ("pointwise 40->240 1x1, 28x28", 40, 28, 240, 1, 1, 0, 1),
    ("depthwise 672 5x5, 14x14", 672, 14, 672, 5, 1, 2, 672),
)
QUICK_CONVS = ("pointwise 40->240 1x1, 28x28",)
BINARY_TARGET_K = 2048
BINARY_TARGET = 10.0
GEMM_COLUMNS = ("fp32", "ORT int8", "MatMulNBits", "Int4 g32", "Int4 per-ch", "Binary", "Shift")
CONV_COLUMNS = ("fp32", "ORT int8", "Int4 u8-in", "Int4 f32-in", "Binary", "Shift")
X_SCALE, X_ZERO = np.float32(0.02), np.uint8(128)


def rich_table(title: str, columns, rows, left: str) -> Table:
    """A console table; the `left` column is left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == left else "right")
    for row in rows:
        table.add_row(*row)
    return table


# --------------------------------------------------------------------------- sessions and timing

def ort_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return without_spinning(options)  # timed in turns with other kernels


def ort_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), ort_options(threads), providers=["CPUExecutionProvider"])


def our_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = without_spinning(nativelib.session_options(threads))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def optimized_ops(model: onnx.ModelProto, threads: int) -> list[str]:
    """Operator types of ORT's optimized graph (what actually runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort_options(threads)
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


class Runner:
    """One session with its input bound once; run() executes it, output() returns the result."""

    def __init__(self, session: ort.InferenceSession, x: np.ndarray):
        self.session = session
        self.binding = session.io_binding()
        self.value = ort.OrtValue.ortvalue_from_numpy(x)  # kept alive while bound
        self.binding.bind_ortvalue_input(session.get_inputs()[0].name, self.value)
        self.binding.bind_output(session.get_outputs()[0].name)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def output(self) -> np.ndarray:
        self.run()
        return self.binding.copy_outputs_to_cpu()[0]


def measure(runners: dict[str, Runner], reps: int, min_time: float, rounds: int = 3) -> dict[str, float]:
    """Median latency in ms of each runner; runners take turns over `rounds` rounds."""
    for runner in runners.values():
        warm_end = time.perf_counter() + 0.1
        for i in range(1000):
            runner.run()
            if i >= 2 and time.perf_counter() > warm_end:
                break
    samples: dict[str, list[float]] = {name: [] for name in runners}
    per_round_reps, per_round_time = -(-reps // rounds), min_time / rounds
    for _ in range(rounds):
        for name, runner in runners.items():
            end = time.perf_counter() + per_round_time
            count = 0
            while count < per_round_reps or time.perf_counter() < end:
                start = time.perf_counter()
                runner.run()
                samples[name].append(time.perf_counter() - start)
                count += 1
    return {name: 1000 * float(np.median(s)) for name, s in samples.items()}


# --------------------------------------------------------------------------- weight formats

def int4_weights(wt: np.ndarray, group: int):
    """Symmetric int4 of wt [N, K] per group (0 = per channel): packed, W_scale [N, G], codes, dequantized."""
    n, k = wt.shape
    kp = R.padded_k(k, group)
    g = group or kp
    padded = np.zeros((n, kp), np.float32)
    padded[:, :k] = wt
    blocks = padded.reshape(n, kp // g, g)
    amax = np.abs(blocks).max(axis=2)
    scale = np.where(amax > 0, amax / 7, 1).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, :, None]), -8, 7)
    codes = R.int4_codes(q.reshape(n, kp)[:, :k])
    deq = (q * scale[:, :, None]).reshape(n, kp)[:, :k].astype(np.float32)
    return R.pack_nibbles(codes, kp, R.INT4_ZERO), scale, codes, deq


def shift_weights(wt: np.ndarray):
    """Per-channel power-of-two weights: packed, W_scale [N, 1], codes, dequantized."""
    amax = np.abs(wt).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 2 ** R.SHIFT_MAX_EXPONENT, 1).astype(np.float32)
    v = wt / scale
    exponent = np.rint(np.log2(np.maximum(np.abs(v), 1e-30)))
    values = np.where(exponent < 0, 0, np.sign(v) * 2.0 ** np.clip(exponent, 0, R.SHIFT_MAX_EXPONENT)).astype(np.int64)
    codes = R.shift_codes(values)
    packed = R.pack_nibbles(codes, R.padded_k(wt.shape[1]), R.SHIFT_ZERO_CODE)
    return packed, scale, codes, (values * scale).astype(np.float32)


def binary_weights(wt: np.ndarray):
    scale = np.abs(wt).mean(axis=1).astype(np.float32)
    return R.pack_signs(wt), scale


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


# --------------------------------------------------------------------------- output checks

def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64).reshape(want.shape), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def exact_or_close(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> tuple[bool, str]:
    got = np.asarray(got).reshape(want.shape)
    if np.array_equal(got, want):
        return True, "bit-exact"
    err = rel_err(got, want)
    return err <= tol, f"not bit-exact, max |diff| {np.abs(got - want).max():.3g}, rel. err {err:.2e}"


class Checks:
    """Results of the output checks; a failed check takes its model out of the timing."""

    def __init__(self):
        self.lines: list[str] = []
        self.failed: set[tuple[str, str]] = set()
        self.worst: dict[str, float] = {}

    def record(self, shape: str, column: str, ok: bool, detail: str, verbose: bool = True) -> None:
        if not ok:
            self.failed.add((shape, column))
        if verbose or not ok:
            self.lines.append(f"{'ok' if ok else 'FAILED'}: {column} at {shape}: {detail}")

    def loose(self, shape: str, column: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
        err = rel_err(got, want)
        self.worst[column] = max(self.worst.get(column, 0.0), err)
        self.record(shape, column, err <= tol, f"rel. err {err:.2e} (limit {tol:g})", verbose=False)


# --------------------------------------------------------------------------- models

def opsets(*extra) -> list:
    return [helper.make_opsetid("", 17), *extra]


def fp32_matmul(m: int, w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=opsets())


def fp32_conv(c: int, size: int, w: np.ndarray, bias: np.ndarray, stride: int, pad: int, group: int):
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=list(w.shape[2:]), strides=[stride] * 2,
                            pads=[pad] * 4, group=group)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")])
    return helper.make_model(graph, opset_imports=opsets())


def ort_int8_dynamic(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(model, src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    return onnx.load(dst)


def ort_matmul_nbits(w: np.ndarray, m: int, accuracy_level: int, block: int = 32) -> onnx.ModelProto:
    """com.microsoft MatMulNBits, 4 bits, symmetric, weights blocked by ORT's own C++ helper (the one
    MatMulNBitsQuantizer calls; the quantizer module itself needs onnx_ir, which this venv lacks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero, block, n, blocks * block, True)
    attrs = dict(K=k, N=n, bits=4, block_size=block)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", ["X", "B", "scales"], ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "matmul_nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")])
    return helper.make_model(graph, opset_imports=opsets(helper.make_opsetid("com.microsoft", 1)))


def ort_int8_static(model: onnx.ModelProto, shape, tmp: Path, seed: int) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.items = iter([{"X": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    src, dst = tmp / "conv_fp32.onnx", tmp / "conv_int8.onnx"
    onnx.save(model, src)
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


# --------------------------------------------------------------------------- GEMM

def gemm_shape(m: int, kn: int, args, checks: Checks, rng, tmp: Path, notes: dict) -> tuple[dict, dict]:
    """Latencies (ms, None where the output check failed) of one GEMM shape, and the weight bytes per format."""
    k = n = kn
    label = f"M={m} K=N={kn}"
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    wt = np.ascontiguousarray(w.T)
    x = rng.standard_normal((m, k)).astype(np.float32)
    threads = args.threads

    models: dict[str, tuple[onnx.ModelProto, bool]] = {}  # column -> (model, ours)
    models["fp32"] = (fp32_matmul(m, w), False)
    models["ORT int8"] = (ort_int8_dynamic(models["fp32"][0], tmp), False)
    nbits = {level: ort_matmul_nbits(w, m, level) for level in (4, 0)}
    g32 = int4_weights(wt, 32)
    pc = int4_weights(wt, 0)
    sh = shift_weights(wt)
    bw, bscale = binary_weights(wt)
    models["Int4 g32"] = (R.single_op_model("Int4MatMul", x.shape, np.float32, {"W": g32[0], "W_scale": g32[1]},
                                            K=k, N=n, group_size=32), True)
    models["Int4 per-ch"] = (R.single_op_model("Int4MatMul", x.shape, np.float32, {"W": pc[0], "W_scale": pc[1]},
                                               K=k, N=n, group_size=0), True)
    models["Binary"] = (R.single_op_model("BinaryGemm", x.shape, np.float32, {"W": bw, "W_scale": bscale},
                                          K=k, N=n), True)
    models["Shift"] = (R.single_op_model("ShiftMatMul", x.shape, np.float32, {"W": sh[0], "W_scale": sh[1]},
                                         K=k, N=n), True)

    if "gemm_ops" not in notes:
        notes["gemm_ops"] = {"ORT int8": optimized_ops(models["ORT int8"][0], threads),
                             "MatMulNBits": optimized_ops(nbits[4], threads)}

    runners = {col: Runner((our_session if ours else ort_session)(model, threads), x)
               for col, (model, ours) in models.items()}
    nbits_runners = {level: Runner(ort_session(model, threads), x) for level, model in nbits.items()}

    # ---- checks
    ref = x.astype(np.float64) @ w.astype(np.float64)
    outs = {col: r.output() for col, r in runners.items()}
    checks.loose(label, "fp32", outs["fp32"], ref, 1e-4)
    checks.loose(label, "ORT int8", outs["ORT int8"], ref, 0.05)
    for level, r in nbits_runners.items():
        checks.loose(label, f"MatMulNBits level {level}", r.output(), ref, 0.25)
    q, xs = R.quantize_rows(x)
    qx = q.astype(np.float64) * xs.astype(np.float64)[:, None]
    for col, deq in (("Int4 g32", g32[3]), ("Int4 per-ch", pc[3]), ("Shift", sh[3])):
        checks.loose(label, col, outs[col], qx @ deq.astype(np.float64).T, 1e-4)
    sx = np.where(x < 0, -1.0, 1.0)
    sw = np.where(wt < 0, -1.0, 1.0)
    xabs = np.abs(x).astype(np.float64).mean(axis=1)
    checks.loose(label, "Binary", outs["Binary"], (sx @ sw.T) * xabs[:, None] * bscale.astype(np.float64)[None, :], 1e-4)
    if (m, kn) == EXACT_SHAPE:
        for col, want in (("Int4 g32", R.int4_matmul_reference(x, g32[2], g32[1], 32)),
                          ("Int4 per-ch", R.int4_matmul_reference(x, pc[2], pc[1], 0)),
                          ("Shift", R.shift_matmul_reference(x, sh[2], sh[1])),
                          ("Binary", R.binary_gemm_reference(x, wt, bscale))):
            ok, detail = exact_or_close(outs[col], want)
            checks.record(label, col, ok, f"{detail} vs native_ref")

    timed = {col: r for col, r in runners.items() if (label, col) not in checks.failed}
    timed.update({f"nbits{level}": r for level, r in nbits_runners.items()
                  if (label, f"MatMulNBits level {level}") not in checks.failed})
    ms = measure(timed, args.reps, args.min_time)
    result = {col: ms.get(col) for col in runners}
    levels = {lvl: ms[f"nbits{lvl}"] for lvl in (4, 0) if f"nbits{lvl}" in ms}
    if levels:
        best = min(levels, key=levels.get)
        result["MatMulNBits"] = levels[best]
        result["nbits_level"] = best
        result["nbits_levels"] = levels
    else:
        result["MatMulNBits"] = None
    sizes = {"fp32": initializer_bytes(models["fp32"][0]), "ORT int8 (per tensor)": initializer_bytes(models["ORT int8"][0]),
             "MatMulNBits (block 32, symmetric)": initializer_bytes(nbits[4]),
             "ours Int4 g32": initializer_bytes(models["Int4 g32"][0]),
             "ours Int4 per-channel": initializer_bytes(models["Int4 per-ch"][0]),
             "ours Binary": initializer_bytes(models["Binary"][0]), "ours Shift": initializer_bytes(models["Shift"][0])}
    return result, sizes


def cell(ms: float | None, base: float | None, suffix: str = "") -> str:
    if ms is None:
        return "wrong output"
    if base is None:
        return f"{ms:.3g}{suffix}"
    return f"{ms:.3g} ({base / ms:.2f}x){suffix}"


def gemm_targets(kn: int, r: dict) -> tuple[str, dict[str, bool | None]]:
    fp32, nb = r["fp32"], r["MatMulNBits"]
    met: dict[str, bool | None] = {}

    def faster(ours, ref):
        return None if ours is None or ref is None else ours <= ref

    met["Int4 g32 <= MatMulNBits"] = faster(r["Int4 g32"], nb) if r["Int4 g32"] is not None else False
    met["Int4 per-ch <= MatMulNBits"] = faster(r["Int4 per-ch"], nb) if r["Int4 per-ch"] is not None else False
    if kn >= BINARY_TARGET_K:
        met["Binary >= 10x fp32"] = (r["Binary"] is not None and fp32 is not None
                                     and fp32 / r["Binary"] >= BINARY_TARGET)
    met["Shift <= fp32"] = faster(r["Shift"], fp32) if r["Shift"] is not None else False
    short = {"Int4 g32 <= MatMulNBits": "int4 g32", "Int4 per-ch <= MatMulNBits": "int4 pc",
             "Binary >= 10x fp32": "bin 10x", "Shift <= fp32": "shift"}
    text = ", ".join(f"{short[key]} {'met' if ok else ('n/a' if ok is None else 'MISSED')}" for key, ok in met.items())
    return text, met


# --------------------------------------------------------------------------- conv

def conv_shape(spec, args, checks: Checks, rng, tmp: Path, notes: dict) -> dict:
    name, c, size, n, kernel, stride, pad, group = spec
    threads = args.threads
    cg = c // group
    k = cg * kernel * kernel
    w4 = (rng.standard_normal((n, cg, kernel, kernel)) * (1 / np.sqrt(k))).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    wt = np.ascontiguousarray(w4.reshape(n, k))
    x = rng.standard_normal((1, c, size, size)).astype(np.float32)
    xu8 = rng.integers(0, 256, x.shape).astype(np.uint8)
    attrs = dict(kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4, dilations=[1, 1], group=group)
    ref_args = ((kernel, kernel), (stride, stride), (pad,) * 4, (1, 1), group)

    pc = int4_weights(wt, 0)
    sh = shift_weights(wt)
    bw, bscale = binary_weights(wt)
    fp32 = fp32_conv(c, size, w4, bias, stride, pad, group)
    int8 = ort_int8_static(fp32, x.shape, tmp, seed=int(rng.integers(1 << 30)))
    notes.setdefault("conv_ops", {})[name] = optimized_ops(int8, threads)
    models = {
        "fp32": (fp32, False, x),
        "ORT int8": (int8, False, x),
        "Int4 u8-in": (R.single_op_model("Int4Conv", x.shape, np.uint8, {
            "W": pc[0], "W_scale": pc[1], "X_scale": np.array(X_SCALE), "X_zero_point": np.array(X_ZERO),
            "Bias": bias}, K=k, N=n, **attrs), True, xu8),
        "Int4 f32-in": (R.single_op_model("Int4Conv", x.shape, np.float32, {"W": pc[0], "W_scale": pc[1], "Bias": bias},
                                          K=k, N=n, **attrs), True, x),
        "Binary": (R.single_op_model("BinaryConv", x.shape, np.float32, {"W": bw, "W_scale": bscale, "Bias": bias},
                                     K=k, N=n, **attrs), True, x),
        "Shift": (R.single_op_model("ShiftConv", x.shape, np.float32, {"W": sh[0], "W_scale": sh[1], "Bias": bias},
                                    K=k, N=n, **attrs), True, x),
    }
    runners = {col: Runner((our_session if ours else ort_session)(model, threads), xin)
               for col, (model, ours, xin) in models.items()}
    outs = {col: r.output() for col, r in runners.items()}

    ref = ort_session(fp32, threads).run(None, {"X": x})[0]  # only used for the loose int8 check
    checks.loose(name, "ORT int8", outs["ORT int8"], ref, 0.1)
    wants = {
        "Int4 u8-in": R.conv_reference(xu8, lambda rows, _v, cols: R.int4_matmul_reference(
            rows, pc[2][cols], pc[1][cols], 0, None, bias[cols], X_SCALE, int(X_ZERO)), n, *ref_args,
            pad_value=int(X_ZERO)),
        "Int4 f32-in": R.conv_reference(x, lambda rows, _v, cols: R.int4_matmul_reference(
            rows, pc[2][cols], pc[1][cols], 0, None, bias[cols]), n, *ref_args),
        "Binary": R.conv_reference(x, lambda rows, valid, cols: R.binary_gemm_reference(
            rows, wt[cols], bscale[cols], bias[cols], valid), n, *ref_args, masked=True),
        "Shift": R.conv_reference(x, lambda rows, _v, cols: R.shift_matmul_reference(
            rows, sh[2][cols], sh[1][cols], bias[cols]), n, *ref_args),
    }
    for col, want in wants.items():
        ok, detail = exact_or_close(outs[col], want)
        checks.record(name, col, ok, f"{detail} vs native_ref")

    timed = {col: r for col, r in runners.items() if (name, col) not in checks.failed}
    ms = measure(timed, args.reps, args.min_time)
    return {col: ms.get(col) for col in runners}


# --------------------------------------------------------------------------- report

def machine() -> dict[str, str]:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    model, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    isa = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                      "avx512_vpopcntdq", "avx512_bitalg")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return {"nproc": nproc, "cpu": model, "isa": " ".join(isa) or "-", "commit": commit}


def md_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in {1,16}, K=N=768, the pointwise conv only")
    parser.add_argument("--reps", type=int, default=20, help="at least this many timed runs per model")
    parser.add_argument("--min-time", type=float, default=1.0, help="and at least this many seconds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.md")
    args = parser.parse_args()
    nativelib.require_library()
    rng = np.random.default_rng(args.seed)
    ms_list, kn_list = (QUICK_M, QUICK_KN) if args.quick else (GEMM_M, GEMM_KN)
    convs = [c for c in CONVS if not args.quick or c[0] in QUICK_CONVS]
    console = Console(width=max(Console().width, 200))
    load_start = os.getloadavg()
    started = time.perf_counter()
    checks, notes = Checks(), {}

    gemm_rows, gemm_results, sizes, target_rows = [], {}, {}, []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for kn in kn_list:
            for m in ms_list:
                console.log(f"GEMM M={m} K=N={kn}")
                r, sizes[kn] = gemm_shape(m, kn, args, checks, rng, tmp, notes)
                gemm_results[(m, kn)] = r
        conv_results = {}
        for spec in convs:
            console.log(f"conv {spec[0]}")
            conv_results[spec[0]] = conv_shape(spec, args, checks, rng, tmp, notes)

    gemm_cols = ("M", "K=N") + tuple(f"{c} ms" for c in GEMM_COLUMNS) + ("targets",)
    tally: dict[str, list[bool]] = {}
    for (m, kn), r in sorted(gemm_results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = r["fp32"]
        text, met = gemm_targets(kn, r)
        for key, ok in met.items():
            if ok is not None:
                tally.setdefault(key, []).append(ok)
        row = [str(m), str(kn)]
        for col in GEMM_COLUMNS:
            suffix = f" L{r['nbits_level']}" if col == "MatMulNBits" and r.get("nbits_level") is not None else ""
            row.append(cell(r[col], None if col == "fp32" else base, suffix))
        gemm_rows.append(row + [text])
        lv = r.get("nbits_levels", {})
        target_rows.append(f"M={m} K=N={kn}: MatMulNBits accuracy_level 4 {lv.get(4, float('nan')):.3g} ms, "
                           f"default (0) {lv.get(0, float('nan')):.3g} ms")

    conv_cols = ("conv",) + tuple(f"{c} ms" for c in CONV_COLUMNS)
    conv_rows = [[name] + [cell(r[c], None if c == "fp32" else r["fp32"]) for c in CONV_COLUMNS]
                 for name, r in conv_results.items()]

    size_kn = 4096 if 4096 in sizes else max(sizes)
    fp32_bytes = sizes[size_kn]["fp32"]
    size_rows = [[fmt, f"{b:,}", f"{fp32_bytes / b:.1f}x"] for fmt, b in sizes[size_kn].items()]

    summary = [f"{key}: met at {sum(v)} of {len(v)} shapes" + (
        "" if all(v) else " (missed at " + ", ".join(
            f"M={m} K=N={kn}" for ((m, kn), r) in sorted(gemm_results.items(), key=lambda kv: (kv[0][1], kv[0][0]))
            if gemm_targets(kn, r)[1].get(key) is False) + ")") for key, v in tally.items()]
    conv_note = [f"{name}: ORT int8 graph after optimization: {' -> '.join(ops)}"
                 for name, ops in notes.get("conv_ops", {}).items()]
    gemm_note = [f"{col} graph after optimization: {' -> '.join(ops)}" for col, ops in notes.get("gemm_ops", {}).items()]
    loose = [f"{col}: largest rel. error over the GEMM shapes {err:.2e}" for col, err in checks.worst.items()]

    # ---- console
    console.print(rich_table(f"GEMM Y[M,N] = X[M,K] W[K,N], ms (speed-up vs fp32), {args.threads} threads",
                             gemm_cols, gemm_rows, left="targets"))
    console.print(rich_table(f"EfficientNet-Lite0 convolutions, batch 1, ms (speed-up vs fp32), {args.threads} threads",
                             conv_cols, conv_rows, left="conv"))
    stable = rich_table(f"weight bytes (initializers), K=N={size_kn}", ("format", "bytes", "vs fp32"), size_rows,
                        left="format")
    console.print(stable)
    for line in summary + checks.lines + gemm_note + conv_note + target_rows:
        console.print(line)

    # ---- markdown
    info = machine()
    load_end = os.getloadavg()
    fmt_load = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
    lines = [
        "# Native kernels: ptqcli Int4 / Binary / Shift operators beside ONNX Runtime", "",
        f"Machine: `nproc` {info['nproc']}, CPU \"{info['cpu']}\" ({info['isa']}); onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}; ptqcli at commit {info['commit']} "
        f"(native library as built in the working tree; ptqcli kernel path `{nativelib.instruction_set()}`, "
        "PTQ_NATIVE_ISA caps it). Sessions: CPUExecutionProvider, intra_op_num_threads="
        f"{args.threads}, default graph optimization level. Load average (1, 5, 15 min) at start {fmt_load(load_start)}, "
        f"at end {fmt_load(load_end)}; the CPUs are shared with other work, so times are noisy.",
        "",
        f"Latency: median over at least {args.reps} runs and {args.min_time:g} s per model after warm-up, inputs bound "
        "once through I/O binding; the models of one shape are timed in 3 interleaved rounds. "
        f"{'Quick run (--quick). ' if args.quick else ''}Total wall time {time.perf_counter() - started:.0f} s.",
        "",
        "Columns: fp32 = ORT MatMul/Conv; ORT int8 = `quantize_dynamic` (QInt8 weights, per tensor) for GEMM and "
        "`quantize_static` QDQ (QUInt8 activations, QInt8 per-channel weights, fused by ORT into QLinearConv) for "
        "conv; MatMulNBits = com.microsoft int4, block 32, symmetric (weights blocked by ORT's `quantize_matmul_4bits`, the helper its MatMulNBitsQuantizer uses), the faster of accuracy_level 4 (int8 "
        "compute, `L4`) and the default (`L0`); Int4 g32 / per-ch = `Int4MatMul` with float X (quantized per row "
        "inside the kernel), group_size 32 / per channel; Binary = `BinaryGemm`/`BinaryConv`; Shift = "
        "`ShiftMatMul`/`ShiftConv` (per-channel scale, float X); Int4 u8-in / f32-in = `Int4Conv` (per channel) "
        "on uint8 input with X_scale/X_zero_point, or on float input.",
        "",
        "Targets: Int4MatMul at least as fast as MatMulNBits (judged for g32, the like-for-like block size, and "
        "also shown for per-channel); BinaryGemm >= 10x faster than fp32 at K >= 2048; Shift no slower than fp32. "
        "A target is met only if the median says so (no noise margin).",
        "",
        "## GEMM", "",
    ]
    lines += md_table(gemm_cols, gemm_rows)
    lines += ["", "Targets over all GEMM shapes:", ""] + [f"- {s}" for s in summary]
    lines += ["", "## Convolutions (EfficientNet-Lite0, batch 1)", ""] + md_table(conv_cols, conv_rows)
    lines += ["", f"## Weight bytes, K=N={size_kn} (all initializers, scales included)", ""]
    lines += md_table(("format", "bytes", "vs fp32"), size_rows)
    lines += ["", "## Output checks", ""]
    lines += [f"- {line}" for line in checks.lines + loose]
    lines += ["", "## Notes", ""] + [f"- {line}" for line in gemm_note + conv_note + target_rows]
    write_atomic(args.out, "\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")
    if checks.failed:
        console.print(f"[red]{len(checks.failed)} output checks FAILED; those models were not timed[/red]")


if __name__ == "__main__":
    main()
