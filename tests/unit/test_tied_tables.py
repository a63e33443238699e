"""When a MatMul weight is an embedding table's transpose (tied input and output embeddings), up to
per-row factors a folded normalization scale leaves in it."""

import numpy as np

from ptqcli.calibrate.select import twin_factors


def _table(seed=0):
    return np.random.default_rng(seed).normal(0, 1, (50, 12)).astype(np.float32)


def test_an_exact_transpose_has_unit_factors():
    table = _table()
    np.testing.assert_array_equal(twin_factors(table.T.copy(), table), np.ones(12, np.float32))


def test_rows_scaled_by_a_folded_normalization_give_those_factors():
    table = _table()
    factors = np.random.default_rng(1).uniform(0.3, 3.0, 12).astype(np.float32)
    got = twin_factors((factors[:, None] * table.T).astype(np.float32), table)
    np.testing.assert_allclose(got, factors, rtol=1e-6)


def test_other_weights_are_not_twins():
    table = _table()
    assert twin_factors(_table(seed=2).T.copy(), table) is None  # same shape, other values
    assert twin_factors(table.copy(), table) is None  # not transposed
    nudged = table.T.copy()
    nudged[3, 7] *= 1.001  # one value off by more than rounding
    assert twin_factors(nudged, table) is None
    zero_column = table.copy()
    zero_column[:, 4] = 0  # a factor cannot be read off zeros
    assert twin_factors(zero_column.T.copy(), zero_column) is None
