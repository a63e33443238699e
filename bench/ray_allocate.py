"""The allocation's sensitivity sweep in one process and as Ray tasks on a local Ray of 1 and 2 workers:
wall time of `ptq allocate` and whether the plans are the same bytes.

    python bench/ray_allocate.py [--models embedded,efficientnet] [--samples 64]

Each model is calibrated once (W8A8 defaults); the run directory is copied per row, so every row
measures the sensitivity table from scratch (no cache) and solves the same integer program.
Rows run one after another as child processes (`ptq allocate ...`), wall time including Ray's start.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from models import model_sets  # noqa: E402

ROOT = harness.ROOT
WORK = ROOT / "bench" / ".cache" / "ray_allocate"
PTQ = ROOT / ".venv" / "bin" / "ptq"
ROWS = {"one process": [], "Ray, 1 worker": ["--ray", "auto", "--workers", "1"],
        "Ray, 2 workers": ["--ray", "auto", "--workers", "2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--candidates", default="8,4,3")
    parser.add_argument("--budget-bits", default="5")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_allocate.md")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    lines = ["# Allocation sensitivity on Ray: one process against a local Ray of 1 and 2 workers", "",
             f"- command: `python bench/ray_allocate.py --models {args.models} --samples {args.samples}`",
             f"- CPU: {harness.cpu_description()}", f"- ptqcli: {harness.ptq_source()}",
             f"- `ptq allocate RUN --budget-bits {args.budget_bits} --weight-candidates {args.candidates} "
             f"--samples {args.samples}` plus the row's options; wall time of the child process, Ray's start included",
             "", "| model | row | wall s | plan.json | sensitivity.json |", "|---|---|---:|---|---|"]
    for label, (model, calib, _) in model_sets(names, "calib_64").items():
        base = WORK / label / "calibrated"
        shutil.rmtree(WORK / label, ignore_errors=True)
        (WORK / label).mkdir(parents=True)
        proc, _, _ = harness.spawn([str(PTQ), "calibrate", str(model), "--data", str(calib), "-o", str(base)],
                                   WORK / f"{label}.calibrate.log", WORK, 2, 8.0, 3600)
        if proc.returncode != 0:
            raise SystemExit(f"{label}: calibrate failed: {proc.stderr.strip().splitlines()[-1]}")
        reference = None
        for row, extra in ROWS.items():
            run = WORK / label / row.replace(" ", "_").replace(",", "")
            shutil.copytree(base, run)
            cmd = [str(PTQ), "allocate", str(run), "--budget-bits", args.budget_bits, "--weight-candidates",
                   args.candidates, "--samples", str(args.samples), *extra]
            # Ray reserves far more address space than it uses (its object store): no tight limit here
            proc, seconds, _ = harness.spawn(cmd, WORK / f"{label}.{run.name}.log", WORK, 2, 256.0, 3600)
            if proc.returncode != 0:
                raise SystemExit(f"{label} {row}: allocate failed: {proc.stderr.strip().splitlines()[-1]}")
            files = {name: (run / name).read_bytes() for name in ("plan.json", "sensitivity.json")}
            reference = reference or files
            same = {name: "same bytes" if files[name] == reference[name] else "DIFFERENT" for name in files}
            lines.append(f"| {label} | {row} | {seconds:.1f} | {same['plan.json']} | {same['sensitivity.json']} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
