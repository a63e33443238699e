"""Perplexity of bench/llm.py's quantized SmolLM2 models on text of another domain than their
calibration data: Python's reference documentation (the `pydoc_data.topics` module of the standard
library: technical English prose, code and grammar), where calibration and tuning used Wikipedia.

    python bench/llm_domain.py [--rows ...] [--out bench/results/llm-domain.md]

Reads the models `bench/llm.py` wrote under bench/.cache/smollm2/runs/ (run it first with the rows
named here). 16 windows of 256 tokens at seeded positions of the documentation, tokenized by the
model's own tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import lm_data  # noqa: E402

ROWS = ("ort-g128", "ort-hqq-g128", "ptq-gptq-g128", "ptq-gptq-g128-stream", "ort-hqq-g32", "ptq-gptq-g32",
        "ptq-gptq-fz-g32", "ptq-nodata-mse-fz-g128")
WINDOWS, SEQ = 16, 256


def documentation_windows(seed: int = 0) -> dict[str, np.ndarray]:
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    ids = np.array(lm_data.tokenizer().encode(text).ids, dtype=np.int64)
    starts = np.sort(np.random.default_rng(seed).choice(len(ids) // SEQ, WINDOWS, replace=False)) * SEQ
    x = np.stack([ids[s:s + SEQ] for s in starts])
    return {"input_ids": x, "attention_mask": np.ones_like(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "llm-domain.md")
    args = parser.parse_args()
    data = documentation_windows()
    runs = lm_data.SMOLLM2 / "runs"
    paths = {"fp32": lm_data.model_path(), **{row: runs / f"{row}.onnx" for row in args.rows.split(",")}}
    missing = [row for row, path in paths.items() if not path.exists()]
    if missing:
        sys.exit(f"no model for {', '.join(missing)}: run python bench/llm.py --rows {','.join(missing)} first")
    lines = ["# SmolLM2-135M quantized: perplexity on text of another domain", "",
             f"- CPU: {harness.cpu_description()}; ptqcli: {harness.ptq_source()}",
             f"- text: {WINDOWS} windows of {SEQ} tokens of Python's reference documentation (pydoc_data.topics); "
             "every ptq row was calibrated on Wikipedia windows (bench/llm.py)", "",
             "| row | perplexity | rise vs fp32 |", "|---|---:|---:|"]
    base = None
    for row, path in paths.items():
        ppl = lm_data.perplexity(path, data)
        base = base or ppl
        lines.append(f"| {row} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
