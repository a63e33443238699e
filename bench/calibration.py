"""Calibration benchmark: ptqcli against ``onnxruntime.quantization.quantize_static``.

Both tools quantize the same BN-folded EfficientNet-Lite0 to W8A8 QDQ with matched
settings, on 64, 256 and 1024 calibration crops. Every (tool, method, count) runs in
a fresh child process so its peak resident memory is its own; the parent then scores
every produced model with one shared fidelity function on the held-out crops.

Usage::

    python bench/calibration.py [--samples 64,256,1024] [--methods ptq-minmax,ort-entropy,...]
                                [--eval-samples 500] [--mem-limit-gb 20] [--timeout-s 1800]
                                [--reduce-range on|off|auto] [--out bench/results/calibration.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
WORK_DIR = CACHE_DIR / "calibration"
MODEL_PATH = CACHE_DIR / "efficientnet_lite0.onnx"
DEFAULT_OUT = BENCH_DIR / "results" / "calibration.md"

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_SIZE = 16
EVAL_BATCH = 50

PTQ_METHODS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("minmax", "percentile", "entropy")
ALL_METHODS = tuple(f"ptq-{m}" for m in PTQ_METHODS) + tuple(f"ort-{m}" for m in ORT_METHODS)
TOOL_NAMES = {"ptq": "ptqcli", "ort": "onnxruntime"}

CHILD_COMMAND = "_child"  # hidden sub-command: one calibration in this process
_POLL_S = 0.2


def calib_path(samples: int) -> Path:
    return CACHE_DIR / f"imagenet_calib_{samples}.npz"


def eval_path() -> Path:
    return CACHE_DIR / "imagenet_eval_500.npz"


# --------------------------------------------------------------------------- #
# Child side: one calibration + export, nothing else
# --------------------------------------------------------------------------- #


def _limit_address_space(limit_gb: float) -> None:
    """Cap virtual memory so a runaway calibrator raises MemoryError instead of
    pushing the whole machine into the kernel's OOM killer."""
    limit = int(limit_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _ptq_quantize(method: str, samples: int, reduce_range: bool, out_model: Path, run_dir: Path):
    """ptqcli library path, equivalent to `ptq calibrate` followed by `ptq export`."""
    from ptqcli import rundir, stages
    from ptqcli.config import DataConfig, QuantConfig
    from ptqcli.export.qdq import export_qdq
    from ptqcli.graph import Graph, save_model

    def run() -> None:
        data = DataConfig(path=str(calib_path(samples)), num_samples=samples, batch_size=BATCH_SIZE)
        quant = QuantConfig(method=method, reduce_range="on" if reduce_range else "off")
        plan = stages.calibrate(MODEL_PATH, quant, data, run_dir)
        g = Graph(rundir.read_float_model(run_dir))
        save_model(export_qdq(g, plan), out_model)

    return run


def iter_npz_batches(path: Path, key: str, batch_size: int):
    """Consecutive batches of one array in an ``.npz``, read from the file batch by batch.

    ``np.load`` would decompress the whole array; streaming keeps the reader's own
    memory at one batch, so that what grows with the sample count is the calibrator.
    """
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran:
            raise ValueError(f"{path.name}: Fortran-ordered arrays cannot be streamed")
        sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(fh.read(n * sample_bytes), dtype=dtype).reshape(n, *shape[1:])


class NpzBatches:
    """CalibrationDataReader over one npz array, ``BATCH_SIZE`` samples per feed.

    Reading starts on first use, inside the timed part, as it does for ptqcli.
    """

    def __init__(self, path: Path):
        self.path = path
        self._batches = None

    def get_next(self):
        if self._batches is None:
            self._batches = iter_npz_batches(self.path, INPUT_NAME, BATCH_SIZE)
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._batches = None


def _ort_quantize(method: str, samples: int, reduce_range: bool, out_model: Path, run_dir: Path):
    """quantize_static with the settings matched to ptqcli's; everything else at ORT's defaults."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    reader_cls = type("NpzReader", (NpzBatches, CalibrationDataReader), {})
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]

    def run() -> None:
        quantize_static(
            str(MODEL_PATH),
            str(out_model),
            reader_cls(calib_path(samples)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
        )

    return run


def _is_allocation_failure(exc: BaseException) -> bool:
    """ORT reports a failed allocation as its own exception type, not MemoryError."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("bad_alloc", "failed to allocate", "unable to allocate", "out of memory"))


def child_main(argv: list[str]) -> int:
    """Run one calibration and write ``{"status", "wall_s", "error"}`` as JSON to --result."""
    parser = argparse.ArgumentParser(prog=f"calibration.py {CHILD_COMMAND}")
    parser.add_argument("--tool", choices=sorted(TOOL_NAMES), required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--out-model", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--mem-limit-gb", type=float, required=True)
    parser.add_argument("--reduce-range", choices=("on", "off"), required=True)
    args = parser.parse_args(argv)

    _limit_address_space(args.mem_limit_gb)
    # Imports happen in the factories, before the clock starts.
    factory = _ptq_quantize if args.tool == "ptq" else _ort_quantize
    run = factory(args.method, args.samples, args.reduce_range == "on", args.out_model, args.run_dir)

    result = {"status": "ok", "wall_s": None, "error": None}
    start = time.perf_counter()
    try:
        run()
        result["wall_s"] = time.perf_counter() - start
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the report
        result["wall_s"] = time.perf_counter() - start
        result["status"] = "oom" if _is_allocation_failure(exc) else "error"
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        import traceback

        traceback.print_exc()
    args.result.write_text(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


# --------------------------------------------------------------------------- #
# Parent side: spawn, watch, collect
# --------------------------------------------------------------------------- #


@dataclass
class RunResult:
    tool: str
    method: str
    samples: int
    status: str  # ok | oom | timeout | error
    wall_s: float | None
    peak_rss_mb: float | None
    model: str | None
    error: str | None = None
    agreement: float | None = None
    kl: float | None = None
    top1: float | None = None


def _wait_with_timeout(pid: int, timeout_s: float):
    """wait4 the child, killing its process group at the deadline.

    Returns (exit status, rusage, timed_out). wait4 gives this child's own
    rusage; RUSAGE_CHILDREN would mix all children run so far.
    """
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return status, usage, timed_out
        if not timed_out and time.monotonic() > deadline:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
        time.sleep(_POLL_S)


def _classify(status: int, timed_out: bool, report: dict | None, log_tail: str) -> tuple[str, str | None]:
    """Status label from how the child ended; a C++ bad_alloc aborts instead of raising."""
    if timed_out:
        return "timeout", None
    if report is not None:
        return report["status"], report["error"]
    if "bad_alloc" in log_tail or "MemoryError" in log_tail:
        return "oom", log_tail.strip().splitlines()[-1]
    if os.WIFSIGNALED(status):
        return "error", f"killed by signal {os.WTERMSIG(status)}"
    return "error", f"exit status {os.WEXITSTATUS(status)}: {log_tail.strip()[-500:]}"


def run_child(tool: str, method: str, samples: int, reduce_range: str, mem_limit_gb: float,
              timeout_s: float) -> RunResult:
    """One calibration in a fresh interpreter; peak RSS comes from wait4 on its pid."""
    name = f"{tool}-{method}-{samples}"
    work = WORK_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    out_model, result_file, log_file = work / f"{name}.onnx", work / "result.json", work / "child.log"
    for stale in (out_model, result_file):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD_COMMAND, "--tool", tool, "--method", method,
           "--samples", str(samples), "--out-model", str(out_model), "--run-dir", str(work / "run"),
           "--result", str(result_file), "--mem-limit-gb", str(mem_limit_gb), "--reduce-range", reduce_range]
    with open(log_file, "wb") as log:
        # Own session so a timeout can kill the child and anything it started.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        status, usage, timed_out = _wait_with_timeout(proc.pid, timeout_s)
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    report = json.loads(result_file.read_text()) if result_file.exists() else None
    log_tail = log_file.read_text(errors="replace")[-4000:]
    state, error = _classify(status, timed_out, report, log_tail)
    wall = report["wall_s"] if report else None
    return RunResult(tool, method, samples, state, wall if state == "ok" else None,
                     usage.ru_maxrss / 1024,  # Linux reports KiB
                     str(out_model) if state == "ok" and out_model.exists() else None, error)


# --------------------------------------------------------------------------- #
# Fidelity: the same function for every model
# --------------------------------------------------------------------------- #


def default_session(path: Path):
    """Default session options: the fused integer-kernel path users deploy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Model outputs for ``inputs``, in batches to bound memory."""
    session = default_session(path)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i:i + EVAL_BATCH]})[0]
                           for i in range(0, len(inputs), EVAL_BATCH)])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fidelity(float_logits: np.ndarray, quant_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with float, mean KL(float || quant) of softmaxes, top-1 accuracy."""
    log_p, log_q = log_softmax(float_logits), log_softmax(quant_logits)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    return {
        "agreement": float(np.mean(float_logits.argmax(1) == quant_logits.argmax(1))),
        "kl": float(np.mean(kl)),
        "top1": float(np.mean(quant_logits.argmax(1) == labels)),
    }


def load_eval(n: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(eval_path()) as npz:
        return npz["input"][:n], npz["labels"][:n]


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #

COLUMNS = ("tool", "method", "samples", "wall s", "peak RSS MB", "top-1 agreement %", "KL", "top-1 %")


def _row(r: RunResult, mem_limit_gb: float) -> list[str]:
    """Table cells; failed runs say why instead of showing numbers."""
    rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
    if r.status == "ok" and r.agreement is not None:
        wall = f"{r.wall_s:.1f}"
        metrics = [f"{100 * r.agreement:.1f}", f"{r.kl:.4f}", f"{100 * r.top1:.1f}"]
    else:
        wall = {"oom": f"OOM (> {mem_limit_gb:g} GB)", "timeout": "timeout"}.get(r.status, "error")
        metrics = ["-", "-", "-"]
    return [TOOL_NAMES[r.tool], r.method, str(r.samples), wall, rss, *metrics]


def print_table(results: list[RunResult], mem_limit_gb: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in results:
        table.add_row(*_row(r, mem_limit_gb))
    # A fixed width keeps the columns readable when output goes to a log file.
    Console(width=140).print(table)


def markdown_table(results: list[RunResult], mem_limit_gb: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6) + "|"]
    lines += ["| " + " | ".join(_row(r, mem_limit_gb)) + " |" for r in results]
    return "\n".join(lines)


def speedups(results: list[RunResult], timeout_s: float) -> list[str]:
    """ORT wall time / ptqcli wall time for each method both tools offer."""
    by_key = {(r.tool, r.method, r.samples): r for r in results}
    lines = []
    for (tool, method, samples), ptq in by_key.items():
        ort = by_key.get(("ort", method, samples))
        if tool != "ptq" or ort is None:
            continue
        label = f"{method} @ {samples}"
        if ptq.status != "ok":
            lines.append(f"{label}: ptqcli {ptq.status}")
        elif ort.status == "ok":
            lines.append(f"{label}: speed-up of ptqcli over ORT {ort.wall_s / ptq.wall_s:.2f}x "
                         f"(ptqcli {ptq.wall_s:.1f}s, ORT {ort.wall_s:.1f}s)")
        elif ort.status == "timeout":
            lines.append(f"{label}: speed-up of ptqcli over ORT > {timeout_s / ptq.wall_s:.1f}x (ORT timed out)")
        else:
            lines.append(f"{label}: ORT {ort.status}, ptqcli {ptq.wall_s:.1f}s")
    return lines


def rss_flatness(results: list[RunResult], tool: str = "ptq", tolerance: float = 0.10) -> list[str]:
    """Per method: does peak RSS stay within ``tolerance`` of its smallest value across counts?"""
    lines = []
    for method in dict.fromkeys(r.method for r in results if r.tool == tool):
        runs = sorted((r for r in results if r.tool == tool and r.method == method and r.peak_rss_mb),
                      key=lambda r: r.samples)
        if len(runs) < 2:
            continue
        lo, hi = min(r.peak_rss_mb for r in runs), max(r.peak_rss_mb for r in runs)
        verdict = f"flat (within {tolerance:.0%})" if hi - lo <= tolerance * lo else f"not flat (spread > {tolerance:.0%})"
        series = ", ".join(f"{r.samples}: {r.peak_rss_mb:.0f}" for r in runs)
        lines.append(f"{TOOL_NAMES[tool]} {method} peak RSS: {verdict}; MB by sample count {series}; "
                     f"spread {hi - lo:.0f} MB")
    return lines


def provenance() -> str:
    """Versions of both tools and where ptqcli is imported from, without importing ptqcli here."""
    import importlib.metadata
    import importlib.util

    origin = Path(importlib.util.find_spec("ptqcli").origin).parent

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(origin), *cmd], capture_output=True, text=True).stdout.strip()
        except OSError:  # no git: provenance is a nicety, not a reason to fail
            return ""

    ptq = f"ptqcli {importlib.metadata.version('ptqcli')} from {origin}"
    commit = git("log", "-1", "--format=%h", "--", ".")
    if commit:
        # Timings belong to a code state; an edited checkout is not the commit.
        ptq += f" (commit {commit}{', with uncommitted changes' if git('status', '--porcelain', '--', '.') else ''})"
    return f"{ptq}; onnxruntime {importlib.metadata.version('onnxruntime')}"


def write_markdown(path: Path, results: list[RunResult], args, float_top1: float, notes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Calibration benchmark: EfficientNet-Lite0\n\n"
              f"{provenance()}.\n\n"
              f"Held-out crops: {args.eval_samples}; float top-1: {100 * float_top1:.1f}%; "
              f"reduce_range {args.reduce_range} for both tools; "
              f"memory limit {args.mem_limit_gb:g} GB; timeout {args.timeout_s:g} s.\n\n")
    body = markdown_table(results, args.mem_limit_gb)
    extra = "\n\n" + "\n".join(f"- {line}" for line in notes) if notes else ""
    path.write_text(header + body + extra + "\n")


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def ensure_inputs() -> None:
    """Build the model and crop sets if the cache is empty (imports torch only then)."""
    missing = [p for p in (MODEL_PATH, eval_path(), *(calib_path(n) for n in (64, 256, 1024))) if not p.exists()]
    if missing:
        sys.path.insert(0, str(BENCH_DIR))
        import models

        models.export_efficientnet_lite0(CACHE_DIR)
        models.write_npz_sets(CACHE_DIR)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="64,256,1024", help="comma-separated calibration sample counts")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, from {','.join(ALL_METHODS)}")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--mem-limit-gb", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # One value for both tools: ptqcli's "auto" depends on the CPU while ORT has no
    # such mode, so leaving each at its default could compare 7-bit with 8-bit weights.
    parser.add_argument("--reduce-range", choices=("on", "off", "auto"), default="on",
                        help="7-bit weights for both tools; auto = whatever ptqcli's own rule picks on this CPU")
    args = parser.parse_args(argv)
    args.samples = [int(s) for s in args.samples.split(",") if s]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    for n in args.samples:
        if n not in (64, 256, 1024):
            parser.error(f"no calibration set of {n} samples (have 64, 256, 1024)")
    if args.reduce_range == "auto":
        from ptqcli.config import cpu_needs_reduce_range

        args.reduce_range = "on" if cpu_needs_reduce_range() else "off"
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ensure_inputs()
    inputs, labels = load_eval(args.eval_samples)
    float_logits = logits(MODEL_PATH, inputs)
    float_top1 = float(np.mean(float_logits.argmax(1) == labels))
    print(f"float top-1 on {len(labels)} held-out crops: {100 * float_top1:.1f}%; "
          f"reduce_range {args.reduce_range} for both tools", flush=True)
    print(provenance(), flush=True)

    results = []
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / "results.jsonl").write_text("")
    # Strictly one child at a time: concurrent children would distort both time and memory.
    for samples in args.samples:
        for spec in args.methods:
            tool, method = spec.split("-", 1)
            print(f"{TOOL_NAMES[tool]} {method} @ {samples} ...", end=" ", flush=True)
            r = run_child(tool, method, samples, args.reduce_range, args.mem_limit_gb, args.timeout_s)
            if r.model is not None:
                r.__dict__.update(fidelity(float_logits, logits(Path(r.model), inputs), labels))
            print(r.status, f"{r.wall_s:.1f}s" if r.wall_s else "", f"{r.peak_rss_mb:.0f} MB",
                  f"({r.error})" if r.error else "", flush=True)
            results.append(r)
            # Kept as runs finish, so an interrupted benchmark still leaves its numbers.
            with (WORK_DIR / "results.jsonl").open("a") as log:
                log.write(json.dumps(asdict(r)) + "\n")

    print_table(results, args.mem_limit_gb, f"Calibration: EfficientNet-Lite0 (float top-1 {100 * float_top1:.1f}%)")
    notes = speedups(results, args.timeout_s) + rss_flatness(results)
    for line in notes:
        print(line)
    write_markdown(args.out, results, args, float_top1, notes)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_COMMAND:
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
