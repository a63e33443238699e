"""Data-free calibration from BatchNorm statistics: generation speed, peak memory, and what the
synthetic inputs are worth as calibration data against real data and plain noise.

For each model and each gradient backend (``--backend numpy,jax``: the numpy executor, or jax
compiled by XLA), fresh child processes generate the BatchNorm-fitted samples
(``ptqcli.calibrate.synthetic``), so each one's peak resident memory is its own: a short probe at
the batch size of interest for speed and memory (skipped when the calibration set is generated at
that batch anyway), then the calibration set. The parent calibrates W8A8 and W4A8 on real data,
on each backend's synthetic set and on plain noise, and measures each quantized model on held-out
data; ``--speed-only`` stops after the generation runs.

    python bench/synthetic.py [--models embedded,efficientnet] [--backend auto|numpy|jax[,...]]
                              [--embedded-iters 200] [--efficientnet-samples 16]
                              [--efficientnet-iters 60] [--efficientnet-batch 16] [--probe-batch 32]
                              [--probe-iters 2] [--lr 0.1] [--speed-only]
                              [--out bench/results/synthetic.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
ASSETS = BENCH_DIR.parent / "ptqcli" / "assets"
WORK_DIR = BENCH_DIR / ".cache" / "synthetic"
DEFAULT_OUT = BENCH_DIR / "results" / "synthetic.md"
CHILD_COMMAND = "_child"
# Label -> (weight format, bias correction or None for the default: on below 8 bits).
FORMATS = {"W8A8": ("int8", None), "W4A8": ("int4", None), "W4A8, no bias correction": ("int4", False)}
REAL_SAMPLES = 256

sys.path.insert(0, str(BENCH_DIR))
from harness import cpu_description, ptq_source  # noqa: E402


@dataclass(frozen=True)
class ModelSet:
    name: str
    model: Path  # BatchNorm kept: the generator needs the running statistics
    calib: Path | None  # None with --speed-only
    evaluation: Path | None
    eval_samples: int
    samples: int  # synthetic samples to generate and calibrate on
    iters: int
    batch: int
    lr: float
    baselines: tuple[str, ...]
    formats: tuple[str, ...]


def model_sets(args) -> list[ModelSet]:
    sets = []
    if "embedded" in args.models:
        sets.append(ModelSet("embedded", ASSETS / "fashion_cnn.onnx", ASSETS / "fashion_calib.npz",
                             ASSETS / "fashion_test.npz", 2000, REAL_SAMPLES, args.embedded_iters, 32, args.lr,
                             ("gaussian", "uniform"), tuple(FORMATS)))
    if "efficientnet" in args.models:
        from models import DEFAULT_CACHE_DIR, export_efficientnet_lite0, write_npz_sets

        model = export_efficientnet_lite0(DEFAULT_CACHE_DIR)
        # The images are needed only to calibrate and evaluate.
        data = {} if args.speed_only else write_npz_sets(DEFAULT_CACHE_DIR)
        # Fewer runs: every calibration here is minutes of held-out evaluation.
        sets.append(ModelSet("efficientnet", model, data.get("calib_256"), data.get("eval_500"), 500,
                             args.efficientnet_samples, args.efficientnet_iters, args.efficientnet_batch, args.lr,
                             ("gaussian",), ("W8A8", "W4A8")))
    return sets


# --------------------------------------------------------------------------- #
# Child side: one generation run, timed, with its own peak memory
# --------------------------------------------------------------------------- #


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tape_bytes(program, name: str, x: np.ndarray) -> tuple[int, int]:
    """What one recorded pass holds for the backward: the tape's own saved values, and the
    BatchNorm inputs the loss reads."""
    tape = program.record({name: x}, [name])
    return tape.saved_bytes(), sum(v.nbytes for v in tape.values.values())


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"synthetic.py {CHILD_COMMAND}")
    for flag in ("--model", "--out", "--result"):
        parser.add_argument(flag, type=Path, required=True)
    for flag in ("--samples", "--iters", "--batch"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    from ptqcli.calibrate import synthetic
    from ptqcli.graph import load_model

    # Load and build once, before the clock (jax compiles at the first step, which is timed).
    synthetic.bn_objective(args.model, args.backend)
    name = synthetic.synthetic_input(load_model(args.model)).name
    ready_mb = _rss_mb()
    trace: dict[int, float] = {}
    reported: dict[int, float] = {}  # batch 0's step -> when its loss was reported
    last = [time.perf_counter()]

    def progress(batch: int, iteration: int, loss: float) -> None:
        now = time.perf_counter()
        if batch == 0:
            trace[iteration] = loss
            reported[iteration] = now
        if now - last[0] > 30:
            print(f"  batch {batch} iteration {iteration}: loss {loss:.4g}", file=sys.stderr, flush=True)
            last[0] = now

    args.out.unlink(missing_ok=True)  # a resumed file would make the timing meaningless
    start = time.perf_counter()
    batches = list(synthetic.iter_generate(args.model, "bn", args.samples, args.batch, args.iters, args.lr,
                                           out_path=args.out, progress=progress, backend=args.backend))
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backend = synthetic.stored_backend(args.out)
    saved = kept = None
    if backend == "numpy":  # the jax backend has no tape to measure: XLA plans its own buffers
        saved, kept = (b / 2**20 for b in _tape_bytes(synthetic.bn_program(args.model)[0], name, batches[0].inputs))
    # Step 1 includes jax's compilation; later steps are the steady state.
    steps = [reported[i + 1] - reported[i] for i in sorted(reported) if i + 1 in reported]
    result = {
        "backend": backend, "wall_s": wall, "samples": args.samples, "iters": args.iters, "batch": args.batch,
        "peak_rss_mb": peak_mb, "vm_hwm_mb": _vm_hwm_mb(), "ready_rss_mb": ready_mb,
        "tape_saved_mb": saved, "bn_inputs_mb": kept,
        "first_step_s": reported[min(reported)] - start if reported else None,
        "step_s": float(np.median(steps)) if steps else None,
        "initial": [b.initial_loss for b in batches], "final": [b.final_loss for b in batches],
        "trace": trace,
    }
    args.result.write_text(json.dumps(result))
    return 0


def run_child(ms: ModelSet, out: Path, samples: int, iters: int, batch: int, backend: str) -> dict:
    result = out.with_suffix(".json")
    cmd = [sys.executable, __file__, CHILD_COMMAND, "--model", str(ms.model), "--out", str(out),
           "--result", str(result), "--samples", str(samples), "--iters", str(iters),
           "--batch", str(batch), "--lr", str(ms.lr), "--backend", backend]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


# --------------------------------------------------------------------------- #
# Parent side: the noise baselines, the reference losses, calibration and evaluation
# --------------------------------------------------------------------------- #


def save_npz(path: Path, name: str, x: np.ndarray) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **{name: x})
    return path


def quantize_and_measure(model: Path, calib: Path, samples: int, fmt: str, evaluation: Path,
                         eval_samples: int) -> dict:
    from ptqcli import stages
    from ptqcli.config import DataConfig, QuantConfig

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        weights, bias_correction = FORMATS[fmt]
        stages.calibrate(model, QuantConfig(weights=weights, rounding="nearest", bias_correction=bias_correction),
                         DataConfig(path=str(calib), num_samples=samples), run_dir)
        _, fidelity = stages.export(run_dir, Path(tmp) / "q.onnx", eval_data=str(evaluation), eval_samples=eval_samples)
    out = next(iter(fidelity.outputs.values()))
    return {"float": fidelity.accuracy.get("float"), "quantized": fidelity.accuracy.get("quantized"),
            "agreement": out.get("top1_agreement")}


def mean_bn_loss(model: Path, x: np.ndarray, batch: int) -> float:
    from ptqcli.calibrate import synthetic

    return float(np.mean(synthetic.bn_loss(model, x, batch)))


def bench_model(ms: ModelSet, backends: list[str], probe_batch: int, probe_iters: int, speed_only: bool,
                lines: list[str]) -> None:
    from ptqcli.calibrate import synthetic
    from ptqcli.calibrate.data import open_npz
    from ptqcli.graph import load_model

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    runs, made = {}, {}  # made: backend -> (its calibration-set run, its .npz)
    for backend in backends:
        if ms.batch != probe_batch:
            print(f"[{ms.name}] {backend}: speed and memory probe, batch {probe_batch} x {probe_iters} iterations",
                  flush=True)
            runs[f"probe ({backend})"] = run_child(ms, WORK_DIR / f"{ms.name}_probe_{backend}.npz", probe_batch,
                                                   probe_iters, probe_batch, backend)
        print(f"[{ms.name}] {backend}: generating {ms.samples} samples x {ms.iters} iterations (batch {ms.batch})",
              flush=True)
        bn_path = WORK_DIR / f"{ms.name}_bn_{backend}.npz"
        runs[f"calibration set ({backend})"] = gen = run_child(ms, bn_path, ms.samples, ms.iters, ms.batch, backend)
        made[gen["backend"]] = (gen, bn_path)
    if speed_only:
        write_speed(ms, runs, made, lines)
        return

    name = synthetic.synthetic_input(load_model(ms.model)).name
    noise = {kind: synthetic.generate(ms.model, kind, REAL_SAMPLES, ms.batch) for kind in ms.baselines}
    noise_paths = {kind: save_npz(WORK_DIR / f"{ms.name}_{kind}.npz", name, x) for kind, x in noise.items()}

    # On as many samples as were generated, so every source's loss averages the same batches.
    print(f"[{ms.name}] BatchNorm loss of each source", flush=True)
    real = np.asarray(open_npz(ms.calib)[name][0:ms.samples])
    losses = {"real": mean_bn_loss(ms.model, real, ms.batch)}
    losses.update({f"bn ({b})": mean_bn_loss(ms.model, np.load(path)[name], ms.batch) for b, (_, path) in made.items()})
    losses.update({kind: mean_bn_loss(ms.model, x[:ms.samples], ms.batch) for kind, x in noise.items()})

    sources = [("real", ms.calib, REAL_SAMPLES)]
    if ms.samples != REAL_SAMPLES:
        sources.append(("real", ms.calib, ms.samples))
    sources += [(f"bn ({b})", path, ms.samples) for b, (_, path) in made.items()]
    sources += [(kind, path, REAL_SAMPLES) for kind, path in noise_paths.items()]
    rows = []
    for label, path, n in sources:
        for fmt in ms.formats:
            start = time.perf_counter()
            r = quantize_and_measure(ms.model, path, n, fmt, ms.evaluation, ms.eval_samples)
            print(f"[{ms.name}] {fmt} {label} {n}: top-1 {_pct(r['quantized'])} agreement {_pct(r['agreement'])} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
            rows.append((label, n, fmt, r))
    write_section(ms, runs, made, losses, rows, lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _trace(trace: dict, iters: int) -> str:
    marks = sorted({1, 5, *range(10, iters, 10), iters} & {int(k) for k in trace})
    return ", ".join(f"{k}: {trace[str(k)]:.4g}" for k in marks)


def _mb(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_speed(ms: ModelSet, runs: dict, made: dict, lines: list[str]) -> None:
    """The generation runs: time, memory, and how far each backend's loss fell."""
    lines += [
        f"## {ms.name}: {ms.model.name}", "",
        f"Adam lr {ms.lr}, N(0, 1) start; each run in a fresh child process. Wall time includes jax's "
        "compilation (in its first step), the forward pass that measures each batch's final loss and the "
        "rewrite of the output file after each batch. s per step: median time between batch 0's steps "
        "(batches of one size are optimised together, so one step advances all of them).", "",
        "| run | backend | samples | batch | iterations | wall s | first step s | s per step | samples/s "
        "| peak RSS MB | RSS before generating MB | tape saved MB | BatchNorm inputs MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in runs.items():
        lines.append(
            f"| {label} | {r['backend']} | {r['samples']} | {r['batch']} | {r['iters']} | {r['wall_s']:.1f} | "
            f"{_seconds(r['first_step_s'])} | {_seconds(r['step_s'])} | {r['samples'] / r['wall_s']:.3g} | "
            f"{r['peak_rss_mb']:.0f} | {r['ready_rss_mb']:.0f} | {_mb(r['tape_saved_mb'])} | {_mb(r['bn_inputs_mb'])} |")
    lines += [
        "",
        "Tape saved MB (numpy only): what the recorded pass of one batch keeps for its backward (masks, pooling "
        "winners, weights); BatchNorm inputs MB: the activations the loss reads, the other term of the peak. "
        "XLA plans the jax backend's buffers itself.", "",
    ]
    for backend, (gen, _) in made.items():
        ratios = [i / f for i, f in zip(gen["initial"], gen["final"])]
        lines += [
            f"{backend}: BatchNorm loss per batch, initial -> final: "
            + "; ".join(f"{i:.4g} -> {f:.4g} ({r:.1f}x)" for i, f, r in zip(gen["initial"], gen["final"], ratios))
            + f" (min {min(ratios):.1f}x, median {np.median(ratios):.1f}x).", "",
            f"{backend}: loss of batch 0 by iteration: {_trace(gen['trace'], gen['iters'])}.", "",
        ]


def write_section(ms: ModelSet, runs: dict, made: dict, losses: dict, rows: list, lines: list[str]) -> None:
    write_speed(ms, runs, made, lines)
    lines += [
        f"Mean BatchNorm loss per batch of {ms.batch} over {ms.samples} samples of each source: "
        + "; ".join(f"{k} {v:.4g}" for k, v in losses.items()) + ".", "",
        f"Calibration: minmax, per-channel weights, uint8 activations; W4 weights get bias correction unless "
        "stated (the output mean shift is estimated from the calibration data's per-channel layer-input means). "
        f"Evaluated on {ms.eval_samples} held-out samples. gaussian is N(0, 1), uniform U(-1, 1), neither "
        "rescaled to the model's input range.", "",
        "| source | samples | format | float top-1 % | quantized top-1 % | top-1 agreement % |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {n} | {fmt} | {_pct(r['float'])} | {_pct(r['quantized'])} | {_pct(r['agreement'])} |"
              for label, n, fmt, r in rows]
    lines.append("")


def _jax_version() -> str:
    try:
        import jax
    except ImportError:
        return "jax not installed"
    return f"jax {jax.__version__}"


def _threads() -> str:
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    set_ = {n: os.environ[n] for n in names if n in os.environ}
    return ", ".join(f"{k}={v}" for k, v in set_.items()) or "BLAS threads at their default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--embedded-iters", type=int, default=200)
    parser.add_argument("--efficientnet-samples", type=int, default=16)
    parser.add_argument("--efficientnet-iters", type=int, default=60)
    parser.add_argument("--efficientnet-batch", type=int, default=16)
    parser.add_argument("--probe-batch", type=int, default=32, help="batch of the speed and memory probe")
    parser.add_argument("--probe-iters", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backend", default="auto",
                        help="gradient backends to compare, comma-separated: auto, numpy, jax")
    parser.add_argument("--speed-only", action="store_true",
                        help="generation runs only: no calibration, evaluation or noise baselines")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.models = args.models.split(",")
    backends = args.backend.split(",")

    import ptqcli

    start = time.perf_counter()
    load = os.getloadavg()
    lines = ["# Synthetic calibration data from BatchNorm statistics", "",
             f"ptqcli {ptqcli.__version__}, {ptq_source()}; numpy {np.__version__}; {_jax_version()}; "
             f"{cpu_description()}, {_threads()}; load average at start {load[0]:.1f}.", ""]
    for ms in model_sets(args):
        bench_model(ms, backends, args.probe_batch, args.probe_iters, args.speed_only, lines)
    lines += [f"Total bench time {time.perf_counter() - start:.0f} s; load average at end "
              f"{os.getloadavg()[0]:.1f}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD_COMMAND:
        sys.exit(child_main(sys.argv[2:]))
    main()
