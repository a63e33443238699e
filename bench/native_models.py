"""Whole models, native export beside its anchors: the embedded model and EfficientNet-Lite0 (BN
folded) quantized W4A8 by ptqcli and exported both as QDQ and with the native operators, next to
fp32 ONNX Runtime, ptqcli's W8A8 QDQ export and ONNX Runtime's own static int8 quantization (QDQ,
per-channel weights).

    python bench/native_models.py [--models embedded,efficientnet] [--threads 2] [--calib-samples 64]

Per model: file size, top-1 on the labelled held-out set, and batch-1 latency (median over at least
--reps runs and --min-time seconds per model after warm-up, the models timed in interleaved rounds,
input bound once through I/O binding). Latency is measured for every model on the same input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import Runner, machine, measure, md_table, write_atomic  # noqa: E402
from models import model_sets  # noqa: E402

from ptqcli import nativelib, stages  # noqa: E402
from ptqcli.runtime import without_spinning  # noqa: E402
from ptqcli.config import DataConfig, QuantConfig  # noqa: E402

COLUMNS = ("model", "file bytes", "top-1 %", "latency ms", "vs fp32")


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # ORT's notes on unused initializers are not results
    without_spinning(options)  # timed in turns with other models
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def top1(session: ort.InferenceSession, inputs: np.ndarray, labels: np.ndarray, batch: int = 50) -> float:
    name = session.get_inputs()[0].name
    preds = [session.run(None, {name: inputs[i:i + batch]})[0].argmax(axis=1) for i in range(0, len(inputs), batch)]
    return 100.0 * float(np.mean(np.concatenate(preds) == labels))


def ort_static_int8(model: Path, calib: np.ndarray, out: Path) -> Path:
    """ONNX Runtime's own post-training quantization: QDQ, uint8 activations, int8 per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = ort_session(model, 1).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def bench_model(label: str, model: Path, calib_path: Path, eval_path: Path, args, tmp: Path) -> tuple[list, list]:
    console = Console(stderr=True)
    evaluation = np.load(eval_path)
    inputs, labels = evaluation["input"][:args.eval_samples], evaluation["labels"][:args.eval_samples]
    calib = np.load(calib_path)["input"][:args.calib_samples]

    console.log(f"{label}: ptq calibrate W4A8 ({args.calib_samples} samples)")
    run_dir = tmp / f"{label}_run"
    start = time.perf_counter()
    stages.calibrate(model, QuantConfig(weights="int4"), DataConfig(path=str(calib_path), num_samples=args.calib_samples),
                     run_dir)
    calibrate_s = time.perf_counter() - start
    paths = {"fp32 ORT": model}
    console.log(f"{label}: ptq export (QDQ, native)")
    paths["ptqcli W4A8 QDQ"] = tmp / f"{label}.qdq.onnx"
    stages.export(run_dir, paths["ptqcli W4A8 QDQ"])
    paths["ptqcli W4A8 native"] = tmp / f"{label}.native.onnx"
    stages.export(run_dir, paths["ptqcli W4A8 native"], fmt="native")
    console.log(f"{label}: ptq calibrate + export W8A8 (QDQ)")
    int8_run = tmp / f"{label}_run_int8"
    stages.calibrate(model, QuantConfig(weights="int8"), DataConfig(path=str(calib_path), num_samples=args.calib_samples),
                     int8_run)
    paths["ptqcli W8A8 QDQ"] = tmp / f"{label}.w8a8.onnx"
    stages.export(int8_run, paths["ptqcli W8A8 QDQ"])
    console.log(f"{label}: ORT quantize_static (int8)")
    paths["ORT int8 QDQ (quantize_static)"] = ort_static_int8(model, calib, tmp / f"{label}.ort_int8.onnx")

    sessions = {name: (nativelib.session(path, threads=args.threads) if "native" in name
                       else ort_session(path, args.threads)) for name, path in paths.items()}
    console.log(f"{label}: top-1 on {len(labels)} held-out samples")
    accuracy = {name: top1(s, inputs, labels) for name, s in sessions.items()}
    console.log(f"{label}: batch-1 latency")
    runners = {name: Runner(s, inputs[:1]) for name, s in sessions.items()}
    latency = measure(runners, args.reps, args.min_time)
    base = latency["fp32 ORT"]
    rows = [[name, f"{path.stat().st_size:,}", f"{accuracy[name]:.2f}", f"{latency[name]:.3g}",
             f"{base / latency[name]:.2f}x"] for name, path in paths.items()]
    ops = {}
    for node in __import__("onnx").load(str(paths["ptqcli W4A8 native"])).graph.node:
        if node.domain == nativelib.DOMAIN:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    notes = [f"{label}: calibration {calibrate_s:.1f} s; native operators in the model: "
             + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))]
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "native_models.md")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {"embedded", "efficientnet"})
    if unknown or not names:
        parser.error(f"--models takes embedded and/or efficientnet (got {', '.join(unknown) or 'nothing'})")
    sets = model_sets(names, "calib_64")
    info = machine()
    started = time.perf_counter()
    lines = ["# Whole models: ptqcli native export beside fp32 and int8 ONNX Runtime", "",
             f"Machine: `nproc` {info['nproc']}, CPU \"{info['cpu']}\" ({info['isa']}); onnxruntime {ort.__version__}; "
             f"ptqcli at commit {info['commit']}, native kernel path `{nativelib.instruction_set()}`. "
             f"Sessions: CPUExecutionProvider, intra_op_num_threads={args.threads}.", "",
             f"ptqcli: `ptq calibrate --weights int4` (uint8 activations, per-channel weights, minmax, bias correction) "
             f"on {args.calib_samples} calibration samples, exported as QDQ and as native; W8A8 likewise "
             "(`--weights int8`, QDQ). ORT int8: "
             "`quantize_static` on the same samples (QDQ, uint8 activations, int8 per-channel weights). Top-1 on up to "
             f"{args.eval_samples} labelled held-out samples; latency at batch 1, median of at least {args.reps} runs "
             f"and {args.min_time} s per model, models interleaved.", ""]
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model, calib, evaluation) in sets.items():
            rows, notes = bench_model(label, model, calib, evaluation, args, Path(tmp))
            table = Table(title=label)
            for col in COLUMNS:
                table.add_column(col, justify="left" if col == "model" else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
            lines += [f"## {label}", "", *md_table(COLUMNS, rows), "", *[f"- {n}" for n in notes], ""]
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write_atomic(args.out, "\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
