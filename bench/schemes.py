"""Weight formats side by side: accuracy or fidelity against weight size, on the embedded model
(labelled Fashion-MNIST test slice) and EfficientNet-Lite0 (held-out ImageNet crops).

Activations stay uint8 (A8); binary and ternary keep their first and last layers at int8.

    python bench/schemes.py [--models embedded,efficientnet] [--eval-samples 500]
                            [--variants nearest,bc,adaround] [--formats int4,binary,...]
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

# Row label -> QuantConfig fields. "binary + binary inputs" also binarizes the inputs of the
# binary layers (--binary-acts all): fully binary middle layers.
FORMATS = {f: {"weights": f} for f in ("int8", "int4", "int3", "pow2:4", "exp:3", "ternary", "binary")}
FORMATS["binary + binary inputs"] = {"weights": "binary", "binary_acts": ("all",)}


def model_sets(names):
    from models import model_sets as shared

    return shared(names, "calib_256")


# Rounding variants: label -> QuantConfig fields.
# AdaRound runs without bias correction, as `ptq calibrate` does by default.
# "default": every rounding option left to ptqcli (--rounding auto).
VARIANTS = {
    "nearest": {"rounding": "nearest", "bias_correction": False},
    "bc": {"rounding": "nearest", "bias_correction": True},
    "adaround": {"rounding": "adaround"},
    "default": {},
}
LABELS = {"nearest": "nearest", "bc": "nearest + bias corr.", "adaround": "AdaRound", "default": "ptqcli default"}


def run(model: Path, calib: Path, evaluation: Path, fmt: str, samples: int, eval_samples: int,
        variant: str, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        steps = {} if variant == "default" else {"rounding_iters": iters}
        stages.calibrate(model, QuantConfig(**FORMATS[fmt], **VARIANTS[variant], **steps),
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
    parser.add_argument("--iters", type=int, default=1000, help="AdaRound steps per layer")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="rows to (re)measure, comma-separated; the section's other rows are kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "schemes.md")
    args = parser.parse_args()
    variants = args.variants.split(",")
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown formats/variants {unknown}")
    sections = _sections(args.out)
    for name, (model, calib, evaluation) in model_sets(args.models.split(",")).items():
        table = Table(title=f"{name}: {model.name}")
        cols = ("weights", "rounding", "top-1 %", "top-1 agreement %", "KL", "weight bytes", "ORT integer kernels")
        for col in cols:
            table.add_column(col, justify="left" if col in ("weights", "rounding", "ORT integer kernels") else "right")
        kept = {key: row for key, row in _rows(sections.get(name, [])).items() if key[1] in LABELS.values()}
        heading = next((line for line in sections.get(name, []) if line.startswith("## ")), None)
        for fmt in formats:
            for variant in variants:
                r = run(model, calib, evaluation, fmt, args.samples, args.eval_samples, variant, args.iters)
                row = (fmt, LABELS[variant],
                       f"{100 * r['acc']:.2f}" if r["acc"] is not None else "-", f"{100 * r['agree']:.2f}",
                       f"{r['kl']:.4f}", f"{r['bytes']:,}", r["kernels"])
                kept[(fmt, LABELS[variant])] = row
                table.add_row(*row)
                if r["float"] is not None:
                    heading = f"## {name} ({model.name}); float top-1 {100 * r['float']:.2f}%"
        Console().print(table)
        order = {(f, label): (i, j) for i, f in enumerate(FORMATS) for j, label in enumerate(LABELS.values())}
        rows = sorted(kept.values(), key=lambda row: order.get((row[0], row[1]), (len(order), 0)))
        settings = next((line for line in sections.get(name, []) if line.startswith("Settings")), None)
        if "adaround" in variants:
            settings = (f"Settings: {args.samples} calibration samples; AdaRound {args.iters} steps per layer, "
                        "without bias correction; "
                        f"fidelity on {args.eval_samples} held-out samples.")
        if "default" in variants and "default rows" not in (settings or ""):
            settings = ((settings + " ") if settings else "") + (
                "The ptqcli default rows leave every rounding option to ptqcli (`--rounding auto`: AdaRound "
                f"below 8 bits, {QuantConfig().rounding_iters} steps per layer).")
        body = [heading or f"## {name} ({model.name})", ""] + ([settings, ""] if settings else [])
        body += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        sections[name] = body + ["| " + " | ".join(row) + " |" for row in rows] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = ["# Weight formats (A8 activations): rounding variants (nearest, bias correction, AdaRound)", ""]
    old = args.out.read_text().splitlines() if args.out.exists() else []
    preamble = old[2:next((i for i, line in enumerate(old) if line.startswith("## ")), len(old))]  # how rows were run
    args.out.write_text("\n".join(title + preamble + [line for body in sections.values() for line in body]))


def _rows(section: list[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """The table rows of an earlier section, keyed by (format, rounding); rows measured with bias
    correction after AdaRound carry their old label, so they stay distinguishable."""
    rows = {}
    for line in section:
        cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
        if line.startswith("| ") and len(cells) == 7 and cells[0] not in ("weights",) and not cells[0].startswith("-"):
            rows[(cells[0], cells[1])] = cells
    return rows


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
