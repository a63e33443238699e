"""Weight formats side by side: accuracy or fidelity against weight size, on the embedded model
(labelled Fashion-MNIST test slice) and EfficientNet-Lite0 (held-out ImageNet crops).

Activations stay uint8 (A8); binary and ternary keep their first and last layers at int8.

    python bench/schemes.py [--models embedded,efficientnet] [--eval-samples 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))

from ptqcli import stages  # noqa: E402
from ptqcli.config import DataConfig, QuantConfig  # noqa: E402

FORMATS = ["int8", "int4", "int3", "pow2:4", "exp:3", "ternary", "binary"]


def model_sets(names):
    from models import model_sets as shared

    return shared(names, "calib_256")


# Rounding variants: label -> QuantConfig fields.
VARIANTS = {
    "nearest": {"bias_correction": False},
    "bc": {"bias_correction": True},
    "adaround": {"bias_correction": True, "rounding": "adaround"},
}
LABELS = {"nearest": "nearest", "bc": "nearest + bias corr.", "adaround": "AdaRound + bias corr."}


def run(model: Path, calib: Path, evaluation: Path, weights: str, samples: int, eval_samples: int,
        variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stages.calibrate(model, QuantConfig(weights=weights, **VARIANTS[variant]),
                         DataConfig(path=str(calib), num_samples=samples), Path(tmp) / "run")
        _, fidelity = stages.export(Path(tmp) / "run", Path(tmp) / "q.onnx", str(evaluation), eval_samples)
        elapsed = time.perf_counter() - start
        import json

        card = json.loads((Path(tmp) / "q.card.json").read_text())
    out = next(iter(fidelity.outputs.values()))
    return {"acc": fidelity.accuracy.get("quantized"), "float": fidelity.accuracy.get("float"),
            "agree": out.get("top1_agreement"), "kl": out.get("kl"), "bytes": card["results"]["size"]["quantized_bytes"],
            "kernels": ", ".join(fidelity.integer_kernels) or "DequantizeLinear + float", "s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="embedded,efficientnet")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--variants", default="nearest,bc",
                        help=f"rounding variants, comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "schemes.md")
    args = parser.parse_args()
    variants = args.variants.split(",")
    sections = _sections(args.out)
    for name, (model, calib, evaluation) in model_sets(args.models.split(",")).items():
        table = Table(title=f"{name}: {model.name}")
        cols = ("weights", "rounding", "top-1 %", "top-1 agreement %", "KL", "weight bytes", "ORT integer kernels")
        for col in cols:
            table.add_column(col, justify="left" if col in ("weights", "rounding", "ORT integer kernels") else "right")
        rows = []
        for weights in FORMATS:
            for variant in variants:
                r = run(model, calib, evaluation, weights, args.samples, args.eval_samples, variant)
                row = (weights, LABELS[variant],
                       f"{100 * r['acc']:.2f}" if r["acc"] is not None else "-", f"{100 * r['agree']:.2f}",
                       f"{r['kl']:.4f}", f"{r['bytes']:,}", r["kernels"])
                rows.append(row)
                table.add_row(*row)
        table.caption = f"float top-1 {100 * r['float']:.2f}%" if r["float"] is not None else None
        Console().print(table)
        body = [f"## {name} ({model.name}); {table.caption or ''}", "", "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols)]
        sections[name] = body + ["| " + " | ".join(row) + " |" for row in rows] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = ["# Weight formats (A8 activations): rounding variants (nearest, bias correction, AdaRound)", ""]
    args.out.write_text("\n".join(title + [line for body in sections.values() for line in body]))


def _sections(path: Path) -> dict[str, list[str]]:
    """The per-model sections of an earlier results file, so a run of some models keeps the others."""
    sections: dict[str, list[str]] = {}
    if not path.exists():
        return sections
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].split(" ", 1)[0]
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    return sections


if __name__ == "__main__":
    main()
