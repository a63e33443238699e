"""Transposable N:M masks on a random normal float32 matrix: the vectorised exact solver beside a
per-block networkx min-cost-flow reference, plus the greedy approximation and plain N:M.

    python bench/masks.py [--size 4096] [--ref-blocks 2000]

The reference solves one networkx min-cost flow per m x m block in a Python loop. It is timed on
``--ref-blocks`` random blocks and extrapolated linearly to the whole matrix; its kept magnitude
is compared with ours on those same blocks.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import networkx as nx
import numpy as np
from rich.console import Console
from rich.table import Table

from ptqcli.masks import nm_mask, transposable_block_count, transposable_mask
from ptqcli.masks.transposable import MAX_PATTERNS, to_blocks

PATTERNS = ((2, 4), (4, 8))
COLUMNS = ("N:M", "solver", "time s", "speed-up", "kept |W| matrix", "kept |W| ref. blocks", "vs exact")
SOLVERS = {
    "reference": "networkx min-cost flow, one per block (reference)",
    "patterns": "exact: every valid block pattern scored by one matrix product",
    "cycles": "exact: greedy start, then batched Bellman-Ford negative-cycle cancelling",
    "approx": "the paper's greedy, short rows/columns completed along augmenting paths",
    "plain": "plain N:M along rows (not transposable)",
}


def reference_block(w: np.ndarray, n: int) -> np.ndarray:
    """Transposable mask of one block as a networkx min-cost flow: rows supply n, columns
    demand n, unit-capacity edges cost -|w|. Costs are scaled to integers because network
    simplex is not guaranteed to terminate on float weights."""
    m = len(w)
    scale = 2.0**40 / float(w.max()) if w.max() > 0 else 1.0
    g = nx.DiGraph()
    for i in range(m):
        g.add_node(("r", i), demand=-n)
        g.add_node(("c", i), demand=n)
    for i in range(m):
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(round(float(w[i, j]) * scale)))
    flow = nx.min_cost_flow(g)
    return np.array([[flow[("r", i)][("c", j)] for j in range(m)] for i in range(m)], dtype=bool)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def kept(w: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(w)[mask].sum(dtype=np.float64))


def compare(w: np.ndarray, n: int, m: int, ref_blocks: int, rng: np.random.Generator) -> tuple[list[tuple], str]:
    """Rows of the table for one N:M pattern, and a note on the reference's agreement."""
    blocks = np.abs(to_blocks(w, m)).astype(np.float64)
    pick = np.sort(rng.choice(len(blocks), size=min(ref_blocks, len(blocks)), replace=False))
    ref, ref_s = timed(lambda: np.array([reference_block(b, n) for b in blocks[pick]]))
    ref_total = ref_s * len(blocks) / len(pick)

    exact, exact_s = timed(transposable_mask, w, n, m, "exact")
    approx, approx_s = timed(transposable_mask, w, n, m, "approx")
    plain, plain_s = timed(nm_mask, w, n, m)

    def on_pick(mask: np.ndarray) -> np.ndarray:
        return (blocks[pick] * to_blocks(mask, m)[pick]).sum(axis=(1, 2))

    ours_sub, ref_sub = on_pick(exact), (blocks[pick] * ref).sum(axis=(1, 2))
    # networkx optimises integer-rounded costs: its kept sum may differ from the float optimum
    # by rounding (n*m*2**-41 of a block's largest entry), never more
    same = np.abs(ours_sub - ref_sub) <= 1e-9 * blocks[pick].max(axis=(1, 2))
    exact_kept = kept(w, exact)
    label = f"{n}:{m}"
    solver = "patterns" if transposable_block_count(n, m) <= MAX_PATTERNS else "cycles"
    rows = [
        (label, "reference", f"{ref_total:.1f}*", "1x", "", f"{ref_sub.sum():.4f}", ""),
        (label, solver, f"{exact_s:.2f}", f"{ref_total / exact_s:.0f}x", f"{exact_kept:.1f}",
         f"{ours_sub.sum():.4f}", "1"),
        (label, "approx", f"{approx_s:.2f}", f"{ref_total / approx_s:.0f}x", f"{kept(w, approx):.1f}",
         f"{on_pick(approx).sum():.4f}", f"{kept(w, approx) / exact_kept:.5f}"),
        (label, "plain", f"{plain_s:.2f}", "", f"{kept(w, plain):.1f}", "",
         f"{kept(w, plain) / exact_kept:.5f}"),
    ]
    note = (f"{label}: reference timed on {len(pick):,} of {len(blocks):,} blocks ({ref_s:.2f} s), "
            f"extrapolated linearly (*); exact and reference keep the same magnitude on {same.sum():,} "
            f"of those {len(pick):,} blocks (largest difference {np.abs(ours_sub - ref_sub).max():.2e})")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--ref-blocks", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "masks.md")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal((args.size, args.size)).astype(np.float32)

    title = f"transposable N:M masks of a {args.size}x{args.size} random normal float32 matrix"
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("N:M", "solver") else "right")
    rows, notes = [], []
    for n, m in PATTERNS:
        pattern_rows, note = compare(w, n, m, args.ref_blocks, rng)
        rows += pattern_rows
        notes.append(note)
        for row in pattern_rows:
            table.add_row(*row)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)
    for key, text in SOLVERS.items():
        console.print(f"{key}: {text}")

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    env = (f"numpy {np.__version__}, networkx {nx.__version__}, Python {platform.python_version()}, "
           f"{platform.machine()}, {os.cpu_count()} CPUs; single process, wall-clock time; load average "
           f"at the end of the run {load} (other processes share the CPUs, so times are noisy).")
    lines = [f"# {title}", "", env, "",
             "`kept |W| ref. blocks` sums the kept magnitude over the blocks the reference solved; "
             "`vs exact` is the kept magnitude of the whole matrix relative to the exact mask.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {note}" for note in notes]
    lines += [""] + [f"- `{key}`: {text}" for key, text in SOLVERS.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
