"""N:M and transposable N:M masks: constraints, optimality against brute force and networkx,
weight layouts and mask diversity."""

import itertools
import math

import networkx as nx
import numpy as np
import pytest

from ptqcli.masks import (
    mask_diversity,
    matrix_to_weight,
    nm_mask,
    tail_keep,
    transposable_block_count,
    transposable_mask,
    weight_to_matrix,
)
from ptqcli.masks.transposable import (
    approx_blocks,
    block_patterns,
    exact_blocks,
    exact_blocks_by_flow,
    exact_blocks_by_patterns,
    from_blocks,
    to_blocks,
)


def _blocks(seed: int, count: int, m: int, kind: str = "normal") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: many equal-cost optima
        return rng.integers(0, 3, (count, m, m)).astype(np.float64)
    if kind == "sparse":
        return np.abs(rng.standard_normal((count, m, m))) * (rng.random((count, m, m)) < 0.3)
    return np.abs(rng.standard_normal((count, m, m)))


def _kept(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (w * x).sum(axis=(-2, -1))


def _assert_transposable(x: np.ndarray, n: int) -> None:
    assert (x.sum(axis=-1) == n).all() and (x.sum(axis=-2) == n).all()


def _brute_force(w: np.ndarray, n: int) -> float:
    """Best kept sum over every m x m mask with n ones per row and column (small m)."""
    m = len(w)
    rows = [np.isin(np.arange(m), c) for c in itertools.combinations(range(m), n)]
    best = -np.inf
    for choice in itertools.product(rows, repeat=m):
        x = np.array(choice)
        if (x.sum(axis=0) == n).all():
            best = max(best, float((w * x).sum()))
    return best


def _dp_best(w: np.ndarray, n: int) -> float:
    """Exhaustive dynamic programming over rows for larger m: the state is the vector of column
    counts (base n+1 digits), each row adds one of the C(m, n) subsets to columns still short."""
    m = len(w)
    digits = np.stack(np.unravel_index(np.arange((n + 1) ** m), (n + 1,) * m), axis=1)
    place = (n + 1) ** np.arange(m - 1, -1, -1)
    best = np.full(len(digits), -np.inf)
    best[0] = 0.0
    subsets = list(itertools.combinations(range(m), n))
    level = digits.sum(axis=1)
    for r in range(m):
        nxt = np.full_like(best, -np.inf)
        at_level = digits[level == r * n]
        for s in subsets:
            src = np.flatnonzero(level == r * n)[(at_level[:, list(s)] < n).all(axis=1)]
            dst = src + place[list(s)].sum()
            # one subset shifts every state by the same amount: dst has no repeats
            nxt[dst] = np.maximum(nxt[dst], best[src] + w[r, list(s)].sum())
        best = nxt
    return float(best[-1])


def _networkx_block(w: np.ndarray, n: int) -> np.ndarray:
    """Min-cost flow with integer costs (network simplex may not terminate on floats)."""
    m = len(w)
    scale = 2.0**40 / w.max() if w.max() > 0 else 1.0
    g = nx.DiGraph()
    for i in range(m):
        g.add_node(("r", i), demand=-n)
        g.add_node(("c", i), demand=n)
    for i in range(m):
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(round(float(w[i, j]) * scale)))
    flow = nx.min_cost_flow(g)
    return np.array([[flow[("r", i)][("c", j)] for j in range(m)] for i in range(m)], dtype=bool)


# --- plain N:M -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,k", [(2, 4, 16), (2, 4, 18), (1, 4, 7), (4, 8, 20), (3, 8, 5), (2, 4, 3)])
def test_nm_keeps_n_largest_per_group_and_tail(n, m, k):
    scores = np.random.default_rng(k).standard_normal((6, k))
    mask = nm_mask(scores, n, m)
    assert mask.shape == scores.shape and mask.dtype == bool
    for start in range(0, k, m):
        group, kept = np.abs(scores[:, start:start + m]), mask[:, start:start + m]
        want = n if group.shape[1] == m else tail_keep(n, m, group.shape[1])
        assert (kept.sum(axis=1) == want).all()
        for g, x in zip(group, kept):
            if 0 < want < len(g):
                assert g[x].min() >= g[~x].max()


def test_tail_policy_and_ties():
    assert [tail_keep(2, 4, r) for r in range(5)] == [0, 1, 1, 2, 2]
    assert [tail_keep(1, 4, r) for r in range(5)] == [0, 1, 1, 1, 1]
    assert tail_keep(4, 8, 3) == 2
    # equal magnitudes: the lower index wins, whatever the sign
    mask = nm_mask(np.array([[1.0, -1.0, 1.0, 1.0, 0.5, -2.0, 2.0]]), 2, 4)
    assert mask.tolist() == [[True, True, False, False, False, True, True]]


def test_nm_rejects_bad_arguments():
    with pytest.raises(ValueError):
        nm_mask(np.ones((2, 4)), 5, 4)
    with pytest.raises(ValueError):
        nm_mask(np.ones(8), 2, 4)


# --- layouts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,shape,axis", [
    ("Conv", (8, 3, 3, 5), 0),
    ("Conv", (6, 4, 7), 0),
    ("Gemm", (12, 20), 0),
    ("Gemm", (20, 12), 1),
    ("MatMul", (20, 12), -1),
    ("MatMul", (3, 20, 12), -1),
])
def test_weight_matrix_round_trip(op, shape, axis):
    w = np.random.default_rng(0).standard_normal(shape)
    mat = weight_to_matrix(w, op, axis)
    assert mat.ndim == 2
    assert np.array_equal(matrix_to_weight(mat, shape, op, axis), w)


def test_layouts_put_the_reduction_axis_last():
    w = np.random.default_rng(1).standard_normal((8, 3, 3, 5))
    mat = weight_to_matrix(w, "Conv", 0)
    assert mat.shape == (8 * 3 * 5, 3)
    assert np.array_equal(mat[2 * 15 + 1 * 5 + 4], w[2, :, 1, 4])  # output 2, kernel position (1, 4)
    g = np.random.default_rng(2).standard_normal((20, 12))  # Gemm transB=0: [K, N]
    assert np.array_equal(weight_to_matrix(g, "Gemm", 1), g.T)
    assert np.array_equal(weight_to_matrix(g.T, "Gemm", 0), g.T)
    with pytest.raises(ValueError):
        weight_to_matrix(w, "ConvTranspose", 1)


# --- mask diversity -------------------------------------------------------------------------------

def test_diversity_counts():
    d = mask_diversity(2, 4, 16)
    assert d.plain == math.comb(4, 2) ** 4 == 1296
    assert d.transposable == 90
    assert transposable_block_count(4, 8) == 116963796250
    assert transposable_block_count(1, 8) == math.factorial(8)
    assert transposable_block_count(1, 4) == 24 == transposable_block_count(3, 4)
    assert d.plain_log10 == pytest.approx(math.log10(1296))
    assert d.transposable_log10_per_weight == pytest.approx(math.log10(90) / 16)
    assert mask_diversity(2, 4, 8).transposable is None


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 5), (1, 3)])
def test_enumerated_patterns_match_the_count(n, m):
    patterns = block_patterns(n, m)
    assert len(patterns) == transposable_block_count(n, m)
    _assert_transposable(patterns, n)
    assert len(np.unique(patterns.reshape(len(patterns), -1), axis=0)) == len(patterns)


# --- transposable: optimality ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
def test_exact_m4_equals_brute_force(n, kind):
    w = _blocks(n, 40, 4, kind)
    best = np.array([_brute_force(b, n) for b in w])
    for solve in (exact_blocks_by_patterns, exact_blocks_by_flow):
        x = solve(w, n)
        _assert_transposable(x, n)
        np.testing.assert_allclose(_kept(w, x), best, rtol=1e-12, atol=1e-12)
    approx = approx_blocks(w, n)
    _assert_transposable(approx, n)
    assert (_kept(w, approx) <= best + 1e-12).all()


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("kind", ["normal", "ties", "sparse"])
def test_exact_m8_equals_networkx(n, kind):
    w = _blocks(10 + n, 50, 8, kind)
    x = exact_blocks(w, n)
    _assert_transposable(x, n)
    ref = np.array([_networkx_block(b, n) for b in w])
    _assert_transposable(ref, n)
    # the integer rounding of networkx's costs moves its optimum by at most n*m*2**-41 of the max
    np.testing.assert_allclose(_kept(w, x), _kept(w, ref), rtol=0, atol=1e-9 * w.max())
    approx = approx_blocks(w, n)
    _assert_transposable(approx, n)
    assert (_kept(w, approx) <= _kept(w, x) + 1e-12).all()


def test_exact_m8_equals_exhaustive_dynamic_programming():
    w = _blocks(3, 3, 8)
    best = np.array([_dp_best(b, 4) for b in w])
    np.testing.assert_allclose(_kept(w, exact_blocks(w, 4)), best, rtol=1e-12)


def test_flow_solver_agrees_with_patterns_on_many_blocks():
    w = _blocks(7, 3000, 4)
    np.testing.assert_allclose(_kept(w, exact_blocks_by_flow(w, 2)), _kept(w, exact_blocks_by_patterns(w, 2)),
                               rtol=1e-12)


# --- transposable: whole matrices -----------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_matrix_blocks_are_transposable(n, m, method):
    w = np.random.default_rng(5).standard_normal((4 * m, 6 * m)).astype(np.float32)
    mask = transposable_mask(w, n, m, method)
    assert mask.shape == w.shape and mask.dtype == bool
    _assert_transposable(to_blocks(mask, m), n)
    assert np.array_equal(mask, transposable_mask(w, n, m, method))  # deterministic
    if method == "exact":  # the optimum does not depend on which side is called rows
        kept_t = np.abs(w.T)[transposable_mask(w.T, n, m)].sum(dtype=np.float64)
        assert kept_t == pytest.approx(np.abs(w)[mask].sum(dtype=np.float64), rel=1e-12)


def test_block_round_trip_and_exact_beats_approx_on_a_matrix():
    w = np.random.default_rng(6).standard_normal((64, 96))
    assert np.array_equal(from_blocks(to_blocks(w, 8), w.shape), w)
    exact = np.abs(w)[transposable_mask(w, 4, 8)].sum()
    approx = np.abs(w)[transposable_mask(w, 4, 8, "approx")].sum()
    assert approx <= exact


def test_ragged_border_takes_plain_nm():
    w = np.random.default_rng(8).standard_normal((10, 13))
    mask = transposable_mask(w, 2, 4)
    _assert_transposable(to_blocks(mask[:8, :12], 4), 2)
    plain = nm_mask(w, 2, 4)
    assert np.array_equal(mask[8:], plain[8:])
    assert np.array_equal(mask[:, 12:], plain[:, 12:])
    assert (mask[:, 12:].sum(axis=1) == tail_keep(2, 4, 1)).all()


def test_dense_and_empty_extremes_and_bad_method():
    w = np.random.default_rng(9).standard_normal((8, 8))
    assert transposable_mask(w, 4, 4).all() and not transposable_mask(w, 0, 4).any()
    with pytest.raises(ValueError):
        transposable_mask(w, 2, 4, method="greedy")
