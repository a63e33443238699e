"""Transposable N:M masks: every m x m block keeps exactly n weights in each row and each column.

Such a mask stays N:M when the matrix is transposed, so the backward pass (which multiplies by
W^T) runs on sparse tensor cores as well (Hubara et al., "Accelerated sparse neural training: a
provable and efficient method to find N:M transposable masks", NeurIPS 2021). Choosing the mask
that keeps the most magnitude is, per block, a maximum-weight b-matching of the complete
bipartite graph rows x columns with every degree n, i.e. a min-cost flow.

All blocks are solved together in vectorised numpy:

- ``exact`` with few valid block patterns (at most ``MAX_PATTERNS``: 90 for 2:4, every m <= 5):
  every pattern is scored on every block with one matrix product and the best one is taken.
- ``exact`` otherwise (e.g. 4:8): the ``approx`` mask, then negative-cycle cancelling on each
  block's residual graph until Bellman-Ford certifies that none is left (see
  :func:`exact_blocks_by_flow`).
- ``approx``: the greedy of the paper, then short rows and columns completed along augmenting
  paths.

Scores are float64. The flow solver cancels a cycle only when it gains more than ``1e-12`` of
the block's largest magnitude, so float rounding cannot make it loop.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from .nm import _check_nm, nm_mask, transposable_block_count

METHODS = ("exact", "approx")
# Above this many valid block patterns, scoring them all costs more than the flow solver.
MAX_PATTERNS = 4096
PATTERN_SCORES = 1 << 21
# Blocks solved per batch: bounds memory (a few [batch, m, m] float64 arrays) and stays in cache.
BATCH = 16384
REL_TOL = 1e-12


def to_blocks(a: np.ndarray, m: int) -> np.ndarray:
    """``[R, C]`` (multiples of m) -> ``[R/m * C/m, m, m]`` blocks in row-major block order."""
    r, c = a.shape
    return a.reshape(r // m, m, c // m, m).swapaxes(1, 2).reshape(-1, m, m)


def from_blocks(blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`to_blocks`."""
    r, c = shape
    m = blocks.shape[-1]
    return blocks.reshape(r // m, c // m, m, m).swapaxes(1, 2).reshape(r, c)


def transposable_mask(w: np.ndarray, n: int, m: int, method: str = "exact") -> np.ndarray:
    """Transposable N:M mask of a 2-D matrix ``[R, C]`` maximising the kept sum of |w|.

    Every full m x m block keeps exactly n entries per row and per column. When R or C is not
    a multiple of m, the ragged border (the last ``R % m`` rows and the last ``C % m`` columns)
    is not transposable: it takes the plain N:M mask of :func:`~ptqcli.masks.nm.nm_mask` along
    rows, tail groups included. ``method`` is ``"exact"`` (optimal per block) or ``"approx"``.
    Returns a boolean array of w's shape.
    """
    _check_nm(n, m)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"transposable_mask takes a 2-D [R, C] matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("transposable_mask needs finite scores")
    r0, c0 = w.shape[0] - w.shape[0] % m, w.shape[1] - w.shape[1] % m
    if (r0, c0) == w.shape:
        mask = np.empty(w.shape, dtype=bool)
    else:
        mask = nm_mask(w, n, m)
    if r0 and c0:
        blocks = np.abs(to_blocks(w[:r0, :c0], m)).astype(np.float64)
        solve = exact_blocks if method == "exact" else approx_blocks
        mask[:r0, :c0] = from_blocks(_batched(solve, blocks, n), (r0, c0))
    return mask


def _batched(solve, blocks: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(blocks.shape, dtype=bool)
    for start in range(0, len(blocks), BATCH):
        out[start:start + BATCH] = solve(blocks[start:start + BATCH], n)
    return out


def exact_blocks(blocks: np.ndarray, n: int) -> np.ndarray:
    """Optimal transposable masks of ``[B, m, m]`` non-negative scores (patterns or flow)."""
    m = blocks.shape[-1]
    if n in (0, m):
        return np.full(blocks.shape, n == m)
    if transposable_block_count(n, m) <= MAX_PATTERNS:
        return exact_blocks_by_patterns(blocks, n)
    return exact_blocks_by_flow(blocks, n)


# --- exact, by enumeration -------------------------------------------------------------------

@cache
def block_patterns(n: int, m: int) -> np.ndarray:
    """All valid m x m masks (n ones per row and per column), ``[P, m, m]`` bool, in a fixed
    order: row by row, each row's columns in ``itertools.combinations`` order."""
    rows = [np.isin(np.arange(m), c) for c in itertools.combinations(range(m), n)]
    found: list[tuple[np.ndarray, ...]] = []

    def extend(chosen: list[np.ndarray], col_sums: np.ndarray) -> None:
        if len(chosen) == m:
            found.append(tuple(chosen))
            return
        left = m - len(chosen)
        for row in rows:
            sums = col_sums + row
            # Each remaining row adds at most one per column, so a column can still reach n only
            # if it is short by no more than the rows left after this one.
            if sums.max() <= n and (n - sums).max() <= left - 1:
                extend(chosen + [row], sums)

    extend([], np.zeros(m, dtype=int))
    patterns = np.array(found, dtype=bool).reshape(-1, m, m)
    patterns.setflags(write=False)
    return patterns


def exact_blocks_by_patterns(blocks: np.ndarray, n: int) -> np.ndarray:
    """Score every valid pattern on every block with one matrix product; keep the best.

    Ties go to the first pattern of :func:`block_patterns`, so the result is deterministic.
    """
    b, m, _ = blocks.shape
    patterns = block_patterns(n, m)
    table = patterns.reshape(len(patterns), m * m).T.astype(np.float64)
    flat = blocks.reshape(b, m * m).astype(np.float64)
    best = np.empty(b, dtype=np.intp)
    step = max(1, PATTERN_SCORES // len(patterns))  # bounds the [blocks, patterns] score matrix
    for start in range(0, b, step):
        best[start:start + step] = np.argmax(flat[start:start + step] @ table, axis=1)
    return patterns[best]


# --- approximate: greedy, then completion ------------------------------------------------------

def approx_blocks(blocks: np.ndarray, n: int) -> np.ndarray:
    """The paper's greedy: visit entries by decreasing magnitude (lower index first on ties) and
    keep one when its row and column both have fewer than n; then complete rows and columns left
    short along augmenting paths (:func:`_complete`). Vectorised across blocks."""
    m = blocks.shape[-1]
    if n in (0, m):
        return np.full(blocks.shape, n == m)
    mask = _greedy(blocks, n)
    short = np.flatnonzero((mask.sum(axis=2) < n).any(axis=1))
    if short.size:
        mask[short] = _complete(blocks[short], mask[short], n)
    return mask


def _greedy(blocks: np.ndarray, n: int) -> np.ndarray:
    b, m, _ = blocks.shape
    order = np.argsort(-blocks.reshape(b, m * m), axis=1, kind="stable").T  # [step, block]
    # Flat indices into per-block counters: one gather and one scatter per step for all blocks.
    rows = order // m + np.arange(b) * m
    cols = order % m + np.arange(b) * m
    cells = order + np.arange(b) * (m * m)
    row_sum = np.zeros(b * m, dtype=np.int16)
    col_sum = np.zeros(b * m, dtype=np.int16)
    keep = np.zeros(b * m * m, dtype=bool)
    for step in range(m * m):
        r, c = rows[step], cols[step]
        ok = (row_sum[r] < n) & (col_sum[c] < n)
        keep[cells[step]] = ok
        row_sum[r] += ok
        col_sum[c] += ok
    return keep.reshape(b, m, m)


def _complete(w: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Grow partial masks (row and column sums <= n) to exactly n per row and column.

    Each pass flips one augmenting path per block (:func:`_augmenting_paths`): the path's ends,
    a short row and a short column, gain one and every inner row and column keeps its sum. A
    full mask exists (a circulant one), so by max-flow/min-cut such a path exists while a row is
    short.
    """
    x = x.copy()
    todo = np.arange(len(x))
    while todo.size:
        xs = _augmenting_paths(w[todo], x[todo], n)
        x[todo] = xs
        todo = todo[(xs.sum(axis=2) < n).any(axis=1)]
    return x


def _augmenting_paths(w: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Breadth-first search, in every block at once, for an alternating path from a short row
    to a short column (add an entry, remove one in the same column, add one in the removed
    entry's row, ...), then flip it. Among equally short paths the search prefers adding large
    and removing small entries."""
    b, m, _ = x.shape
    ar = np.arange(b)
    row_seen = x.sum(axis=2) < n
    col_short = x.sum(axis=1) < n
    col_seen = np.zeros((b, m), dtype=bool)
    row_pred, col_pred = np.full((b, m), -1), np.full((b, m), -1)
    frontier = row_seen.copy()
    end = np.full(b, -1)
    for _ in range(m):
        gain = np.where(frontier[:, :, None] & ~x & ~col_seen[:, None, :], w, -1.0)
        best = np.argmax(gain, axis=1)
        new_cols = np.take_along_axis(gain, best[:, None, :], axis=1)[:, 0] >= 0
        col_pred[new_cols] = best[new_cols]
        col_seen |= new_cols
        hit = new_cols & col_short & (end < 0)[:, None]
        end = np.where(hit.any(axis=1), np.argmax(hit, axis=1), end)
        if (end >= 0).all():
            break
        loss = np.where(new_cols[:, None, :] & x & ~row_seen[:, :, None], w, np.inf)
        best = np.argmin(loss, axis=2)
        frontier = np.take_along_axis(loss, best[:, :, None], axis=2)[:, :, 0] < np.inf
        row_pred[frontier] = best[frontier]
        row_seen |= frontier
    if (end < 0).any():
        raise AssertionError("no augmenting path in a block with a short row")
    x = x.copy()
    j, on = end, np.ones(b, dtype=bool)
    while on.any():
        i = col_pred[ar, j]
        x[ar[on], i[on], j[on]] = True
        prev = row_pred[ar, i]
        on &= prev >= 0
        x[ar[on], i[on], prev[on]] = False
        j = np.where(on, prev, j)
    return x


# --- exact, by negative-cycle cancelling -------------------------------------------------------

def exact_blocks_by_flow(blocks: np.ndarray, n: int, start: np.ndarray | None = None) -> np.ndarray:
    """Optimal transposable masks of ``[B, m, m]`` non-negative scores for any m.

    A full mask is a flow of value n*m in the network rows -> columns (unit capacities, cost
    -|w| per kept entry); it has maximum kept magnitude iff its residual graph has no negative
    cycle (Klein's optimality condition). Residual edges run row i -> column j for a dropped
    entry (cost -w_ij: keep it) and column j -> row i for a kept one (cost +w_ij: drop it), so a
    negative cycle is an alternating swap that keeps every row and column sum and gains magnitude.

    Starting from ``start`` (default: the ``approx`` mask), each round runs Bellman-Ford in all
    unfinished blocks at once, from zero distances on every node. A block whose distances stop
    changing is certified optimal: the distances are potentials that make every residual edge
    cost non-negative (up to the tolerance). Otherwise a cycle appears in its predecessor graph
    within m + 1 sweeps. Such a cycle is negative: along every predecessor edge u -> v,
    ``d(v) - d(u) >= cost(u, v)``, and the edge that closed the cycle lowered d(v) by more than
    the tolerance, so the cycle costs less than minus the tolerance. It is found by walking
    predecessors and flipped. Each flip gains more than the tolerance, so the rounds end, and
    the result is optimal to within 2m times the tolerance (``1e-12`` of the block's largest
    magnitude): exact at float64 precision.
    """
    b, m, _ = blocks.shape
    x = approx_blocks(blocks, n) if start is None else start.copy()
    tol = REL_TOL * blocks.reshape(b, -1).max(axis=1, initial=0.0)
    todo = np.arange(b)
    while todo.size:
        w = blocks[todo]
        found, pred = _find_negative_cycles(w, x[todo], tol[todo])
        todo = todo[found >= 0]
        if todo.size:
            x[todo] = _flip_cycles(x[todo], pred[found >= 0], found[found >= 0])
    return x


def _find_negative_cycles(w: np.ndarray, x: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bellman-Ford on the residual graphs of all blocks at once.

    Nodes are rows 0..m-1 and columns m..2m-1. Returns, per block, a node on a negative cycle
    of the predecessor graph (-1 when the block is optimal) and the predecessor array ``[B, 2m]``.
    """
    b, m, _ = w.shape
    # Both edge sets are laid out with the minimised axis last: reductions over a short
    # contiguous axis are several times faster in numpy than over a strided one.
    add = np.where(x, np.inf, -w).swapaxes(1, 2).copy()  # [B, j, i]: row i -> column j
    drop = np.where(x, w, np.inf)                        # [B, i, j]: column j -> row i
    dist_r, dist_c = np.zeros((b, m)), np.zeros((b, m))
    pred = np.full((b, 2 * m), -1)
    tol = tol[:, None]
    ids = np.arange(b)  # block of each local row, while blocks drop out
    found, found_pred = np.full(b, -1), np.full((b, 2 * m), -1)
    live = np.ones(b, dtype=bool)  # neither certified nor holding a found cycle
    # A column relaxed in sweep k has a predecessor chain of >= 2k - 1 edges unless it holds a
    # cycle, so by sweep m + 1 every block either stopped changing or shows its cycle.
    for _ in range(m + 1):
        cand = dist_r[:, None, :] + add
        src = np.argmin(cand, axis=2)
        val = np.take_along_axis(cand, src[:, :, None], axis=2)[:, :, 0]
        upd_c = val < dist_c - tol
        np.copyto(dist_c, val, where=upd_c)
        np.copyto(pred[:, m:], src, where=upd_c)
        cand = dist_c[:, None, :] + drop
        src = np.argmin(cand, axis=2)
        val = np.take_along_axis(cand, src[:, :, None], axis=2)[:, :, 0]
        upd_r = val < dist_r - tol
        np.copyto(dist_r, val, where=upd_r)
        np.copyto(pred[:, :m], src + m, where=upd_r)
        col_moved, row_moved = upd_c.any(axis=1), upd_r.any(axis=1)
        # A predecessor cycle that appeared in this sweep runs through a node updated in it.
        start = np.where(col_moved, np.argmax(upd_c, axis=1) + m, np.where(row_moved, np.argmax(upd_r, axis=1), -1))
        on_cycle = _walk(pred, start, 2 * m)
        hit = live & (on_cycle >= 0)
        found[ids[hit]] = on_cycle[hit]
        found_pred[ids[hit]] = pred[hit]
        live &= (col_moved | row_moved) & ~hit
        if not live.any():
            return found, found_pred
        # Settled blocks are cheaper to carry along for a while than to copy out every sweep.
        if live.mean() < 0.75:
            ids, add, drop, dist_r, dist_c, pred, tol, live = (
                a[live] for a in (ids, add, drop, dist_r, dist_c, pred, tol, live))
    raise AssertionError("Bellman-Ford kept relaxing without a predecessor cycle")


def _walk(pred: np.ndarray, node: np.ndarray, steps: int) -> np.ndarray:
    """Follow predecessors ``steps`` times; a node that is still not -1 lies on a cycle."""
    ar = np.arange(len(pred))
    for _ in range(steps):
        node = np.where(node >= 0, pred[ar, np.maximum(node, 0)], -1)
    return node


def _flip_cycles(x: np.ndarray, pred: np.ndarray, node: np.ndarray) -> np.ndarray:
    """Flip every entry along the predecessor cycle through ``node`` (one cycle per block)."""
    x = x.copy()
    b, m, _ = x.shape
    ar = np.arange(b)
    cur, on = node.copy(), np.ones(b, dtype=bool)
    while on.any():
        prv = pred[ar, cur]
        is_col = cur >= m
        i = np.where(is_col, prv, cur)            # the row end of edge prv -> cur
        j = np.where(is_col, cur, prv) - m        # the column end
        # row -> column edges add the entry, column -> row edges drop it
        x[ar[on], i[on], j[on]] = is_col[on]
        cur = np.where(on, prv, cur)
        on &= cur != node
    return x
