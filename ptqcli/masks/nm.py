"""Plain N:M masks, the matrix layout they are taken in, and mask diversity.

An N:M mask keeps ``n`` of every ``m`` consecutive weights along the reduction axis, which is
what sparse tensor cores accelerate (2:4 on current GPUs). Mask diversity, the number of masks a
sparsity family allows, follows Hubara et al., "Accelerated sparse neural training: a provable
and efficient method to find N:M transposable masks" (NeurIPS 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 0 <= n <= m and m >= 1):
        raise ValueError(f"N:M sparsity needs integers 0 <= n <= m, m >= 1; got {n}:{m}")


def tail_keep(n: int, m: int, r: int) -> int:
    """Entries kept in a tail group of ``r < m`` entries: ``ceil(n * r / m)``.

    This keeps the tail's density at least n/m, so a row whose length is not a multiple of m is
    never pruned harder than the rest of the matrix.
    """
    _check_nm(n, m)
    if not 0 <= r <= m:
        raise ValueError(f"a tail group holds 0..{m} entries, got {r}")
    return -(-n * r // m)


def _top_n_along_last(scores: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the n largest |scores| along the last axis; the lower index wins ties."""
    mask = np.zeros(scores.shape, dtype=bool)
    if n == 0 or scores.shape[-1] == 0:
        return mask
    # A stable sort of -|s| puts equal magnitudes in index order, which makes ties deterministic;
    # argpartition would be cheaper but gives no such guarantee.
    order = np.argsort(-np.abs(scores), axis=-1, kind="stable")[..., :n]
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M mask of a 2-D array ``[rows, K]``: the n largest |scores| of every m consecutive
    entries along K (axis 1) are kept.

    Ties go to the lower index. When K is not a multiple of m, the last ``r = K % m`` entries of
    each row form a tail group that keeps :func:`tail_keep` ``(n, m, r) = ceil(n * r / m)`` of them.
    Returns a boolean array of the same shape (True = kept).
    """
    _check_nm(n, m)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"nm_mask takes a 2-D [rows, K] array, got shape {scores.shape}")
    rows, k = scores.shape
    full = k - k % m
    mask = np.empty(scores.shape, dtype=bool)
    mask[:, :full] = _top_n_along_last(scores[:, :full].reshape(rows, full // m, m), n).reshape(rows, full)
    mask[:, full:] = _top_n_along_last(scores[:, full:], tail_keep(n, m, k - full))
    return mask


@cache
def transposable_block_count(n: int, m: int) -> int:
    """Number of m x m 0/1 matrices whose every row and column sums to n (exact).

    Dynamic programming over rows. Columns are interchangeable, so the state is not the vector
    of column sums but how many columns currently hold each sum 0..n; a row picks ``k_s`` columns
    among the ``c_s`` columns at sum s, in ``prod C(c_s, k_s)`` ways.
    """
    _check_nm(n, m)
    states = {(m,) + (0,) * n: 1}
    for _ in range(m):
        nxt: dict[tuple[int, ...], int] = {}
        for state, ways in states.items():
            for picks, mult in _row_picks(state, n):
                new = list(state)
                for s, k in enumerate(picks):
                    new[s] -= k
                    new[s + 1] += k
                key = tuple(new)
                nxt[key] = nxt.get(key, 0) + ways * mult
        states = nxt
    return states.get((0,) * n + (m,), 0)


def _row_picks(state: tuple[int, ...], n: int):
    """Ways to pick n columns among those not yet full: (picks per sum class, multiplicity)."""
    def rec(s: int, left: int):
        if s == n:
            if left == 0:
                yield (), 1
            return
        for k in range(min(left, state[s]) + 1):
            for rest, mult in rec(s + 1, left - k):
                yield (k, *rest), math.comb(state[s], k) * mult
    yield from rec(0, n)


@dataclass(frozen=True)
class Diversity:
    """Mask diversity of N:M sparsity on ``k`` weights: how many masks each family allows.

    ``plain`` counts N:M masks (``C(m, n)`` per group of m, so ``C(m, n) ** (k / m)``);
    ``transposable`` counts masks whose every m x m block has n ones per row and per column
    (``T(m, n) ** (k / m**2)``, T from :func:`transposable_block_count`), or None when m*m does
    not divide k. The ``*_log10_per_weight`` fields compare families independently of k.
    """

    n: int
    m: int
    k: int

    @property
    def plain_log10_per_weight(self) -> float:
        return math.log10(math.comb(self.m, self.n)) / self.m

    @property
    def transposable_log10_per_weight(self) -> float:
        return math.log10(transposable_block_count(self.n, self.m)) / self.m**2

    @property
    def plain_log10(self) -> float:
        return self.plain_log10_per_weight * self.k

    @property
    def transposable_log10(self) -> float | None:
        return self.transposable_log10_per_weight * self.k if self.k % self.m**2 == 0 else None

    @property
    def plain(self) -> int:
        """Exact count; a big integer for large k (prefer the log10 fields there)."""
        return math.comb(self.m, self.n) ** (self.k // self.m)

    @property
    def transposable(self) -> int | None:
        if self.k % self.m**2:
            return None
        return transposable_block_count(self.n, self.m) ** (self.k // self.m**2)


def mask_diversity(n: int, m: int, k: int) -> Diversity:
    """Mask diversity of plain and transposable N:M sparsity on a block of ``k`` weights.

    For 2:4 on a 4x4 block (k = 16): plain 6**4 = 1296 masks, transposable 90.
    """
    _check_nm(n, m)
    if k <= 0 or k % m:
        raise ValueError(f"k must be a positive multiple of m={m}, got {k}")
    return Diversity(int(n), int(m), int(k))


# Patterns recognised in weights that arrive already pruned (a masked model calibrated afresh).
KNOWN_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))


def nm_pattern(nonzero: np.ndarray) -> tuple[int, int] | None:
    """The sparsest known N:M pattern that a ``[rows, K]`` nonzero map obeys along K (tail groups
    keep ``tail_keep`` of theirs), or None."""
    rows, k = nonzero.shape
    best = None
    for n, m in KNOWN_PATTERNS:
        if k < m:
            continue
        full = k - k % m
        groups = nonzero[:, :full].reshape(rows, -1, m).sum(axis=2)
        tail = nonzero[:, full:].sum(axis=1)
        if (groups <= n).all() and (tail <= tail_keep(n, m, k - full)).all():
            if best is None or n / m < best[0] / best[1]:
                best = (n, m)
    return best
