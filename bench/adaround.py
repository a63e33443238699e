"""Layer-wise rounding on real models: wall time and peak memory, per layer and in total, and
fidelity for nearest, nearest + bias correction, AdaRound and AdaQuant at W4A8 and W3A8.

Each configuration runs in a fresh child process so its peak RSS is its own.

    python bench/adaround.py [--models embedded,efficientnet] [--samples 512] [--iters 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
VARIANTS = [("nearest", False), ("nearest", True), ("adaround", True), ("adaquant", True)]


def model_sets(names):
    from models import model_sets as shared

    return shared(names, "calib_1024")


def child(args) -> None:
    """One configuration: calibrate (with the rounding), export, measure; print JSON."""
    from ptqcli import stages
    from ptqcli.config import DataConfig, QuantConfig

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        quant = QuantConfig(weights=args.weights, rounding=args.rounding, rounding_iters=args.iters,
                            rounding_samples=args.samples, bias_correction=args.bias_correction == "on")
        start = time.perf_counter()
        stages.calibrate(args.model, quant, DataConfig(path=args.calib, num_samples=args.samples), run)
        seconds = time.perf_counter() - start
        _, fidelity = stages.export(run, Path(tmp) / "q.onnx", args.eval, args.eval_samples)
        layers = json.loads((run / "rounding.json").read_text())["layers"] if (run / "rounding.json").is_file() else []
    out = next(iter(fidelity.outputs.values()))
    print(json.dumps({"seconds": seconds, "accuracy": fidelity.accuracy, "agreement": out.get("top1_agreement"),
                      "kl": out.get("kl"), "layers": layers}))


def run_child(model, calib, evaluation, weights, rounding, corrected, args) -> dict:
    cmd = [sys.executable, __file__, "_child", "--model", str(model), "--calib", str(calib), "--eval", str(evaluation),
           "--weights", weights, "--rounding", rounding, "--bias-correction", "on" if corrected else "off",
           "--samples", str(args.samples), "--iters", str(args.iters), "--eval-samples", str(args.eval_samples)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaround.md")
    args = parser.parse_args()
    lines = [f"# Layer-wise rounding: {args.samples} calibration samples, {args.iters} steps per layer", ""]
    for name, (model, calib, evaluation) in model_sets(args.models.split(",")).items():
        table = Table(title=f"{name}: {model.name}")
        cols = ("weights", "rounding", "top-1 %", "top-1 agreement %", "KL", "calibrate s", "peak RSS MB",
                "slowest layer s")
        for col in cols:
            table.add_column(col, justify="left" if col in ("weights", "rounding") else "right")
        rows = []
        for weights in ("int4", "int3"):
            for rounding, corrected in VARIANTS:
                r = run_child(model, calib, evaluation, weights, rounding, corrected, args)
                label = rounding + (" + bias corr." if corrected else "")
                slowest = max((l["seconds"] for l in r["layers"]), default=None)
                row = (f"{weights}/A8", label,
                       f"{100 * r['accuracy']['quantized']:.2f}" if r["accuracy"] else "-",
                       f"{100 * r['agreement']:.2f}", f"{r['kl']:.4f}", f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}",
                       "-" if slowest is None else f"{slowest:.1f}")
                rows.append(row)
                table.add_row(*row)
                Console().print(f"{name} {row}")
        float_acc = r["accuracy"].get("float") if r["accuracy"] else None
        table.caption = f"float top-1 {100 * float_acc:.2f}%" if float_acc is not None else None
        Console().print(table)
        lines += [f"## {name} ({model.name}) {table.caption or ''}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)] + ["| " + " | ".join(row) + " |" for row in rows] + [""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        p = argparse.ArgumentParser()
        for flag in ("--model", "--calib", "--eval", "--weights", "--rounding", "--bias-correction"):
            p.add_argument(flag)
        for flag in ("--samples", "--iters", "--eval-samples"):
            p.add_argument(flag, type=int)
        child(p.parse_args(sys.argv[2:]))
    else:
        main()
