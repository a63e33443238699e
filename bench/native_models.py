"""Whole models, every export side by side: the embedded model, EfficientNet-Lite0 (BN folded) and
the paraphrase-MiniLM-L3-v2 sentence encoder, each as fp32 ONNX Runtime, ONNX Runtime's own int8
quantization, ptqcli W8A8 QDQ, ptqcli W4A8 QDQ and W4A8 native; the CNNs also with binary and
shift (pow2:4) weights on the native operators (first and last layers kept at 8 bits).

    python bench/native_models.py [--models embedded,efficientnet,minilm] [--threads 2] [--calib-samples 64]

Per model: file size, quality on held-out data (top-1 for the CNNs, with top-1 agreement with fp32;
the encoder's sentence embeddings by cosine to fp32's), and batch-1 latency at --threads and at 1
thread (median over at least --reps runs and --min-time seconds per model after warm-up, the models
timed in interleaved rounds, their threads sleeping between runs).
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

from kernels import machine, measure, md_table, write_atomic  # noqa: E402
from models import model_sets  # noqa: E402

from ptqcli import nativelib, stages  # noqa: E402
from ptqcli.runtime import without_spinning  # noqa: E402
from ptqcli.config import DataConfig, QuantConfig  # noqa: E402

COLUMNS = ("model", "file bytes", "top-1 %", "agrees with fp32 %", "ms", "vs fp32", "ms 1 thread",
           "vs fp32 1 thread", "2 threads vs 1")
ENCODER_COLUMNS = ("model", "file bytes", "embedding cosine", "worst", "ms", "vs fp32", "ms 1 thread",
                   "vs fp32 1 thread", "2 threads vs 1")


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """Every model's session, ptqcli's operators registered (the native rows need them)."""
    options = nativelib.session_options(threads)
    options.log_severity_level = 3  # ORT's notes on unused initializers are not results
    without_spinning(options)  # timed in turns with other models
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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


class FeedsRunner:
    """One session run on fixed feeds (models with several inputs)."""

    def __init__(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]):
        self.session, self.feeds = session, feeds

    def run(self) -> None:
        self.session.run(None, self.feeds)


def variants(label: str) -> list[tuple[str, dict, str]]:
    """(row, QuantConfig options, export format) of ptqcli's rows. "native" chooses per layer
    (--native-layers fastest); "native, all layers" runs ptqcli's operators wherever they can."""
    rows = [("ptqcli W8A8 QDQ", {"weights": "int8"}, "qdq"), ("ptqcli W4A8 QDQ", {"weights": "int4"}, "qdq"),
            ("ptqcli W4A8 native", {"weights": "int4"}, "native"),
            ("ptqcli W4A8 native, all layers", {"weights": "int4"}, "native-all")]
    if label != "minilm":
        rows += [("ptqcli binary native", {"weights": "binary", "keep": ("first", "last")}, "native"),
                 ("ptqcli shift native", {"weights": "pow2:4", "keep": ("first", "last")}, "native")]
    return rows


def quantize_rows(label: str, model: Path, calib_path: Path, args, tmp: Path, console) -> tuple[dict, dict]:
    paths, seconds, runs = {"fp32 ORT": model}, {}, {}
    for name, options, fmt in variants(label):
        key = tuple(sorted(options.items()))
        if key not in runs:
            console.log(f"{label}: ptq calibrate {options}")
            runs[key] = tmp / f"{label}_run_{len(runs)}"
            start = time.perf_counter()
            stages.calibrate(model, QuantConfig(**options), DataConfig(path=str(calib_path),
                                                                       num_samples=args.calib_samples), runs[key])
            seconds[name] = time.perf_counter() - start
        paths[name] = tmp / f"{label}.{name.split()[1].replace(':', '')}.{fmt}.onnx"
        stages.export(runs[key], paths[name], fmt=fmt.removesuffix("-all"), latency=False,
                      native_layers="all" if fmt.endswith("-all") else "fastest")
    return paths, seconds


def latencies(sessions_at, paths: dict, feeds: dict, args) -> dict[int, dict[str, float]]:
    """Median ms per model at --threads and at 1 thread (each thread count timed on its own)."""
    out = {}
    for threads in dict.fromkeys([args.threads, 1]):
        runners = {name: FeedsRunner(sessions_at(path, threads), feeds) for name, path in paths.items()}
        out[threads] = measure(runners, args.reps, args.min_time)
    return out


def table_rows(paths: dict, quality: dict, lat: dict, args) -> list[list[str]]:
    base, one = lat[args.threads]["fp32 ORT"], lat[1]["fp32 ORT"]
    return [[name, f"{path.stat().st_size:,}", *quality[name], f"{lat[args.threads][name]:.3g}",
             f"{base / lat[args.threads][name]:.2f}x", f"{lat[1][name]:.3g}", f"{one / lat[1][name]:.2f}x",
             f"{lat[1][name] / lat[args.threads][name]:.2f}x"] for name, path in paths.items()]


def native_ops(path: Path) -> str:
    ops = {}
    for node in __import__("onnx").load(str(path)).graph.node:
        if node.domain == nativelib.DOMAIN:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "none"


def bench_cnn(label: str, model: Path, calib_path: Path, eval_path: Path, args, tmp: Path) -> tuple[list, list]:
    console = Console(stderr=True)
    evaluation = np.load(eval_path)
    inputs, labels = evaluation["input"][:args.eval_samples], evaluation["labels"][:args.eval_samples]
    calib = np.load(calib_path)["input"][:args.calib_samples]
    paths, seconds = quantize_rows(label, model, calib_path, args, tmp, console)
    console.log(f"{label}: ORT quantize_static (int8)")
    paths["ORT int8 QDQ (quantize_static)"] = ort_static_int8(model, calib, tmp / f"{label}.ort_int8.onnx")
    sessions = {name: ort_session(path, args.threads) for name, path in paths.items()}
    console.log(f"{label}: top-1 on {len(labels)} held-out samples")
    predictions = {name: predict(s, inputs) for name, s in sessions.items()}
    quality = {name: (f"{100 * np.mean(p == labels):.2f}", f"{100 * np.mean(p == predictions['fp32 ORT']):.2f}")
               for name, p in predictions.items()}
    console.log(f"{label}: batch-1 latency")
    name = sessions["fp32 ORT"].get_inputs()[0].name
    lat = latencies(ort_session, paths, {name: inputs[:1]}, args)
    notes = [f"{label}: calibration " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())]
    notes += [f"{label} {row}: native operators {native_ops(paths[row])}" for row in paths if "native" in row]
    return table_rows(paths, quality, lat, args), notes


def predict(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 50) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0].argmax(axis=1)
                           for i in range(0, len(inputs), batch)])


def bench_encoder(args, tmp: Path) -> tuple[list, list]:
    """paraphrase-MiniLM-L3-v2 on Wikipedia passages (bench/text_data.py): sentence embeddings."""
    import text_data

    console = Console(stderr=True)
    material = text_data.build(verbose=False)
    paths, seconds = quantize_rows("minilm", material.model, material.calib, args, tmp, console)
    console.log("minilm: ORT quantize_dynamic (int8)")
    from onnxruntime.quantization import quantize_dynamic

    paths["ORT int8 (quantize_dynamic)"] = tmp / "minilm.ort_dynamic.onnx"
    quantize_dynamic(str(material.model), str(paths["ORT int8 (quantize_dynamic)"]), per_channel=True)
    with np.load(material.eval) as d:
        feeds = {k: d[k][:args.eval_samples] for k in text_data.INPUTS}
    embedded = {}
    for name, path in paths.items():
        sess = ort_session(path, args.threads)
        embedded[name] = np.concatenate([sess.run([text_data.EMBEDDING], {k: v[i:i + 50] for k, v in feeds.items()})[0]
                                         for i in range(0, len(feeds["input_ids"]), 50)])
    ref = embedded["fp32 ORT"]
    quality = {}
    for name, e in embedded.items():
        cos = np.sum(ref * e, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(e, axis=1))
        quality[name] = (f"cos {cos.mean():.4f}", f"min {cos.min():.4f}")
    with np.load(material.latency) as d:
        one = {k: d[k][:1] for k in text_data.INPUTS}
    console.log("minilm: batch-1 latency (128 tokens)")
    lat = latencies(ort_session, paths, one, args)
    notes = ["minilm: calibration " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
             f"minilm: quality = cosine of the sentence embedding to fp32's over {len(ref)} held-out passages "
             "(mean, min); latency on one 128-token passage",
             f"minilm ptqcli W4A8 native: native operators {native_ops(paths['ptqcli W4A8 native'])}"]
    return table_rows(paths, quality, lat, args), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,efficientnet,minilm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "native_models.md")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {"embedded", "efficientnet", "minilm"})
    if unknown or not names:
        parser.error(f"--models takes embedded, efficientnet and minilm (got {', '.join(unknown) or 'nothing'})")
    sets = model_sets([n for n in names if n != "minilm"], "calib_64")
    info = machine()
    started = time.perf_counter()
    lines = ["# Whole models: ptqcli native export beside fp32 and int8 ONNX Runtime", "",
             f"Machine: `nproc` {info['nproc']}, CPU \"{info['cpu']}\" ({info['isa']}); onnxruntime {ort.__version__}; "
             f"ptqcli at commit {info['commit']}, native kernel path `{nativelib.instruction_set()}`. "
             f"Sessions: CPUExecutionProvider, intra_op_num_threads={args.threads} (and 1 for the 1-thread columns), "
             "threads not spinning between runs.", "",
             f"ptqcli: `ptq calibrate --weights int4|int8|binary|pow2:4` with its defaults (uint8 activations, "
             f"per-channel weights, minmax, below 8 bits layer-wise rounding (`--rounding auto`: AdaRound, 200 steps) except for binary, which rounds to nearest with bias correction; binary and shift keep the first and last "
             f"layers at 8 bits) on {args.calib_samples} calibration samples, exported as QDQ (default container) or "
             "native. ORT int8: `quantize_static` on the same samples for the CNNs (QDQ, uint8 activations, int8 "
             "per-channel weights), `quantize_dynamic` (per channel) for the encoder. Quality on up to "
             f"{args.eval_samples} held-out samples; latency at batch 1, median of at least {args.reps} runs "
             f"and {args.min_time} s per model, models interleaved.", ""]
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(label, COLUMNS, lambda label=label, m=m, c=c, e=e: bench_cnn(label, m, c, e, args, Path(tmp)))
                for label, (m, c, e) in sets.items()]
        if "minilm" in names:
            jobs.append(("minilm", ENCODER_COLUMNS, lambda: bench_encoder(args, Path(tmp))))
        for label, columns, job in jobs:
            rows, notes = job()
            table = Table(title=label)
            for col in columns:
                table.add_column(col, justify="left" if col == "model" else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
            lines += [f"## {label}", "", *md_table(columns, rows), "", *[f"- {n}" for n in notes], ""]
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write_atomic(args.out, "\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
