"""Solve time of the bit-allocation integer program on a synthetic 200-layer x 6-candidate instance,
side by side with the greedy baseline (objective and time).

    python bench/allocate.py [--layers 200] [--candidates 6] [--seeds 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ptqcli.allocate.ilp import greedy, min_damage, smallest_cost

BITS = (8, 6, 5, 4, 3, 2)


def instance(layers: int, candidates: int, seed: int):
    """Damage falls ~4x per extra bit (uniform quantization noise), scaled by a per-layer sensitivity."""
    rng = np.random.default_rng(seed)
    bits = BITS[:candidates]
    params = rng.integers(1_000, 2_000_000, layers)
    sensitivity = rng.lognormal(0.0, 1.5, layers)
    damage = {f"layer{i}": {f"W{b}": float(sensitivity[i] * 4.0 ** -b * rng.uniform(0.8, 1.2)) for b in bits}
              for i in range(layers)}
    cost = {f"layer{i}": {f"W{b}": float(params[i] * b / 8) for b in bits} for i in range(layers)}
    return damage, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "allocate.md")
    args = parser.parse_args()
    table = Table(title=f"bit allocation: {args.layers} layers x {args.candidates} candidates, budget = uniform 4-bit size")
    rows = []
    for col in ("seed", "ILP s", "ILP status", "ILP damage", "greedy s", "greedy damage", "greedy / ILP"):
        table.add_column(col, justify="right")
    for seed in range(args.seeds):
        damage, cost = instance(args.layers, args.candidates, seed)
        budget = sum(c["W4"] for c in cost.values())
        assert budget >= smallest_cost(cost)
        start = time.perf_counter()
        ilp = min_damage(damage, cost, budget)
        ilp_s = time.perf_counter() - start
        start = time.perf_counter()
        base = greedy(damage, cost, budget)
        greedy_s = time.perf_counter() - start
        row = (str(seed), f"{ilp_s:.3f}", ilp.status, f"{ilp.damage:.6g}", f"{greedy_s:.3f}", f"{base.damage:.6g}",
               f"{base.damage / ilp.damage:.4f}")
        rows.append(row)
        table.add_row(*row)
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = "| " + " | ".join(c.header for c in table.columns) + " |"
    lines = [f"# {table.title}", "", header, "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    args.out.write_text("\n".join(lines + [""] + _later_sections(args.out)) + "\n")


def _later_sections(path: Path) -> list[str]:
    """What follows the solver table in an earlier results file (the EfficientNet-Lite0 Pareto
    section, written from bench/allocate_effnet.py and ptq allocate --pareto), kept as it was."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# ")]
    return lines[starts[1]:] if len(starts) > 1 else []


if __name__ == "__main__":
    main()
