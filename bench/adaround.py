"""Layer-wise rounding on real models: wall time and peak memory, per layer and in total, and
fidelity for nearest, nearest + bias correction, AdaRound and AdaQuant at W4A8 and W3A8.

Each configuration runs in a fresh child process so its peak RSS is its own. The child reports
its progress (calibration, each rounded layer, evaluation) with timestamps on stderr.

    python bench/adaround.py [--models embedded,efficientnet] [--weights int4,int3]
                             [--variants nearest,bc,adaround,adaquant] [--samples 512] [--iters 1000]

A run of some `--models` keeps the other models' sections of the `--out` file and replaces only
the sections of the models it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
# name: (rounding, bias correction)
# Layer-wise rounding runs without bias correction, as `ptq calibrate` does by default: it already
# fits each layer to its quantized inputs, and correcting afterwards measured worse.
# "default": what `ptq quantize --weights W --data D` does, every rounding option left to ptqcli
# (--iters and --samples other than the calibration sample count do not apply to it).
VARIANTS = {"nearest": ("nearest", False), "bc": ("nearest", True), "adaround": ("adaround", False),
            "adaquant": ("adaquant", False), "default": ("default", None)}
LABELS = {"nearest": "nearest", "bc": "nearest + bias corr.", "adaround": "adaround", "adaquant": "adaquant",
          "default": "ptqcli default"}
TITLE = "# Layer-wise rounding: nearest, bias correction, AdaRound, AdaQuant"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def model_sets(names):
    from models import model_sets as shared

    return shared(names, "calib_1024")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(description: str, total: int | None):
    """Timestamped progress on stderr: every step of the rounding stage, every 10% otherwise."""
    started = last = time.perf_counter()
    state = {"done": 0, "shown": 0}
    _log(f"{description}: start (total {total})")

    def advance(n: int, note: str | None = None) -> None:
        nonlocal last
        state["done"] += n
        now = time.perf_counter()
        every = 1 if description.endswith("layers") or not total else max(1, total // 10)
        if state["done"] - state["shown"] >= every or state["done"] == total:
            _log(f"{description}: {state['done']}/{total} (+{now - last:.1f}s, {now - started:.1f}s total)"
                 + (f" {note}" if note else ""))
            state["shown"], last = state["done"], now

    yield advance
    _log(f"{description}: done in {time.perf_counter() - started:.1f}s")


def child(args) -> None:
    """One configuration: calibrate (with the rounding), export, measure; print JSON."""
    from ptqcli import stages
    from ptqcli.config import DataConfig, QuantConfig

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        quant = QuantConfig(weights=args.weights) if args.rounding == "default" else QuantConfig(
            weights=args.weights, rounding=args.rounding, rounding_iters=args.iters, rounding_samples=args.samples,
            bias_correction=args.bias_correction == "on")
        start = time.perf_counter()
        plan = stages.calibrate(args.model, quant, DataConfig(path=args.calib, num_samples=args.samples), run, _progress)
        seconds = time.perf_counter() - start
        _log(f"calibrate finished in {seconds:.1f}s; exporting and evaluating")
        _, fidelity = stages.export(run, Path(tmp) / "q.onnx", args.eval, args.eval_samples, _progress)
        layers = json.loads((run / "rounding.json").read_text())["layers"] if (run / "rounding.json").is_file() else []
    out = next(iter(fidelity.outputs.values()))
    chosen = plan.quant.rounding.value + (" + bias corr." if plan.quant.corrects_bias else "")
    print(json.dumps({"seconds": seconds, "chosen": chosen, "accuracy": fidelity.accuracy, "agreement": out.get("top1_agreement"),
                      "kl": out.get("kl"), "layers": layers}))


def run_child(model, calib, evaluation, weights, rounding, corrected, args) -> dict:
    cmd = [sys.executable, __file__, "_child", "--model", str(model), "--calib", str(calib), "--eval", str(evaluation),
           "--weights", weights, "--rounding", rounding, "--bias-correction", "on" if corrected else "off",
           "--samples", str(args.samples), "--iters", str(args.iters), "--eval-samples", str(args.eval_samples)]
    start = time.perf_counter()
    # stderr (the child's progress) goes straight to ours; stdout carries the JSON result.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (status {status}); see its stderr above")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024
    result["wall"] = time.perf_counter() - start
    return result


def _command() -> str:
    env = [f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ]
    cpus = sorted(os.sched_getaffinity(0))
    pin = [f"taskset -c {','.join(map(str, cpus))}"] if len(cpus) < os.cpu_count() else []
    return " ".join(env + pin + ["python", "bench/adaround.py"] + [shlex.quote(a) for a in sys.argv[1:]])


def _layer_lines(label: str, layers: list[dict]) -> list[str]:
    """Per-layer seconds (from run/rounding.json) with a summary line."""
    seconds = [l["seconds"] for l in layers]
    slowest = sorted(layers, key=lambda l: -l["seconds"])[:5]
    lines = [f"#### {label}: per-layer rounding time", "",
             f"{len(layers)} layers, {sum(seconds):.1f} s in total, median {statistics.median(seconds):.1f} s; "
             "5 slowest: " + ", ".join(f"{l['node']} {l['seconds']:.1f} s" for l in slowest) + ".", "",
             "| # | node | seconds | peak RSS so far MB | columns | loss nearest | loss after | after / nearest |",
             "|---|---|---|---|---|---|---|---|"]
    for i, l in enumerate(layers):
        ratio = l["loss_after"] / l["loss_nearest"] if l["loss_nearest"] else float("nan")
        peak = f"{l['peak_rss_mb']:.0f}" if l.get("peak_rss_mb") is not None else "-"
        lines.append(f"| {i} | {l['node']} | {l['seconds']:.1f} | {peak} | {l['columns']} | {l['loss_nearest']:.3g} | "
                     f"{l['loss_after']:.3g} | {ratio:.3f} |")
    return lines + [""]


def _sections(path: Path) -> tuple[dict[str, list[str]], str | None]:
    """The per-model sections of an earlier results file (so a run of some models keeps the others),
    and that file's title line."""
    sections: dict[str, list[str]] = {}
    if not path.exists():
        return sections, None
    current, title = None, None
    for line in path.read_text().splitlines():
        if line.startswith("# ") and current is None:
            title = line
        if line.startswith("## "):
            current = line[3:].split(" ", 1)[0]
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return sections, title


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--weights", default="int4,int3", help="weight formats, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"rounding variants, comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaround.md")
    parser.add_argument("--note", default="", help="a remark written under each section's settings")
    args = parser.parse_args()
    weights_list = [w for w in args.weights.split(",") if w]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    command = _command()
    sections, old_title = _sections(args.out)
    if old_title and old_title != TITLE:
        # Older files put the settings in the title; keep them with the sections they describe.
        for body in sections.values():
            if not any(line.startswith("Settings") for line in body):
                body[1:1] = ["", f"Settings (from the earlier file title): {old_title[2:]}."]

    def write(name: str, body: list[str]) -> None:
        sections[name] = body
        for b in sections.values():  # exactly one blank line between sections
            while b and not b[-1].strip():
                b.pop()
            b.append("")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([TITLE, ""] + [line for b in sections.values() for line in b]) + "\n")

    for name, (model, calib, evaluation) in model_sets(args.models.split(",")).items():
        table = Table(title=f"{name}: {model.name}")
        cols = ("weights", "rounding", "top-1 %", "top-1 agreement %", "KL", "calibrate s", "wall s", "peak RSS MB",
                "slowest layer s")
        for col in cols:
            table.add_column(col, justify="left" if col in ("weights", "rounding") else "right")
        rows, details, float_acc = [], [], None
        total = len(weights_list) * len(variants)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for weights in weights_list:
            for variant in variants:
                rounding, corrected = VARIANTS[variant]
                r = run_child(model, calib, evaluation, weights, rounding, corrected, args)
                slowest = max((l["seconds"] for l in r["layers"]), default=None)
                label = LABELS[variant] + (f" ({r['chosen']})" if variant == "default" and "chosen" in r else "")
                row = (f"{weights}/A8", label,
                       f"{100 * r['accuracy']['quantized']:.2f}" if r["accuracy"] else "-",
                       f"{100 * r['agreement']:.2f}", f"{r['kl']:.4f}", f"{r['seconds']:.1f}", f"{r['wall']:.1f}",
                       f"{r['peak_mb']:.0f}", "-" if slowest is None else f"{slowest:.1f}")
                rows.append(row)
                table.add_row(*row)
                Console().print(f"{name} {row}")
                if r["accuracy"] and r["accuracy"].get("float") is not None:
                    float_acc = r["accuracy"]["float"]
                if r["layers"]:
                    details += _layer_lines(f"{weights}/A8 {label}", r["layers"])
                caption = f"float top-1 {100 * float_acc:.2f}%" if float_acc is not None else ""
                done = len(rows)
                state = "" if done == total else f" **Incomplete: {done} of {total} configurations finished.**"
                body = [f"## {name} ({model.name}) {caption}", "",
                        f"Settings: {args.samples} calibration samples (also used for the rounding), "
                        f"{args.iters} steps per layer, fidelity on {args.eval_samples} held-out samples; "
                        f"started {started}.{state}", "", f"Command: `{command}`", ""]
                body += [args.note, ""] if args.note else []
                body += [
                        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                body += ["| " + " | ".join(row) + " |" for row in rows] + [""]
                write(name, body + details)
        table.caption = caption or None
        Console().print(table)


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
