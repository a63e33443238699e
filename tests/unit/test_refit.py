"""The mask re-fit: exact least squares where data is plenty, and never worse than the plain mask
on held-out samples where a row keeps more weights than there are samples to fit."""

import numpy as np
import pytest

from ptqcli.masks import nm_mask
from ptqcli.masks.refit import HOLD_OUT, Moments, kept_indices, refit_layer, solve_rows


def _layer(rng, rows: int, k: int, samples: int, correlated: bool = True):
    """Columns with correlated inputs (as real activations are), so a re-fit has something to win."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k) if correlated else np.eye(k)
    base = rng.normal(size=(k, samples))
    x = (mix @ base + 0.3 * base)[None]
    w = rng.normal(size=(1, rows, k))
    keep = nm_mask(np.abs(w[0]), 2, 4)[None]
    return w, keep, x


def _moments(x, sample_ids, chunk=100):
    """Streamed the way the mask stage streams batches."""
    m = Moments.empty(x.shape[0], x.shape[1])
    columns = np.moveaxis(x, 2, 0)
    for start in range(0, len(columns), chunk):
        m.add(columns[start:start + chunk], sample_ids[start:start + chunk])
    return m


def _mse(rows, dense, x):
    return float(np.mean((rows @ x - dense @ x) ** 2))


def test_solve_rows_matches_lstsq_at_tiny_strength():
    rng = np.random.default_rng(0)
    w, keep, x = _layer(rng, rows=8, k=32, samples=400)
    g = x[0] @ x[0].T / x.shape[2]
    fitted = solve_rows(g, w[0], kept_indices(keep[0]), strength=1e-10)
    for r in range(8):
        kept = np.flatnonzero(keep[0, r])
        ref, *_ = np.linalg.lstsq(x[0][kept].T, (w[0, r] @ x[0]), rcond=None)
        np.testing.assert_allclose(fitted[r, kept], ref, rtol=1e-5, atol=1e-6)
        assert np.all(fitted[r, ~keep[0, r]] == 0)


def test_plenty_of_data_refit_beats_the_plain_mask_on_unseen_samples():
    rng = np.random.default_rng(1)
    k = 64
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    draw = lambda n: (mix @ rng.normal(size=(k, n)))[None]  # noqa: E731
    w = rng.normal(size=(1, 16, k))
    keep = nm_mask(np.abs(w[0]), 2, 4)[None]
    x, unseen = draw(2000), draw(2000)
    result = refit_layer(w, keep, _moments(x, np.arange(x.shape[2])))
    assert result.strength is not None and np.all(result.rows[~keep] == 0)
    assert result.heldout_mse_refit < result.heldout_mse_masked
    assert _mse(result.rows, w, unseen) < 0.7 * _mse(w * keep, w, unseen)


@pytest.mark.slow
def test_more_kept_weights_than_samples_is_never_worse_than_the_plain_mask():
    """512 inputs, 2:4 keeps 256 per row, 128 samples: plain least squares interpolates the fit
    samples (error ~0 there) and is far worse than the plain mask on new ones."""
    rng = np.random.default_rng(2)
    k, samples = 512, 128
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    draw = lambda n: (mix @ rng.normal(size=(k, n)))[None]  # noqa: E731
    w = rng.normal(size=(1, 32, k))
    keep = nm_mask(np.abs(w[0]), 2, 4)[None]
    x, unseen = draw(samples), draw(4000)
    plain = _mse(w * keep, w, unseen)

    interpolated = solve_rows(x[0] @ x[0].T / samples, w[0], kept_indices(keep[0]), strength=1e-10)[None]
    assert _mse(interpolated, w, x) < 1e-3 * _mse(w * keep, w, x)      # fits its own samples ...
    assert _mse(interpolated, w, unseen) > plain                       # ... and is worse on new ones

    result = refit_layer(w, keep, _moments(x, np.arange(samples)))
    assert np.all(result.rows[~keep] == 0)
    assert _mse(result.rows, w, unseen) <= plain * 1.0001
    assert result.fit_samples == samples - samples // HOLD_OUT  # one column per sample here


def test_uncorrelated_inputs_keep_the_plain_mask():
    """With independent inputs a kept weight cannot stand in for a dropped one: nothing to win."""
    rng = np.random.default_rng(3)
    w, keep, x = _layer(rng, rows=8, k=64, samples=48, correlated=False)
    result = refit_layer(w, keep, _moments(x, np.arange(48)))
    unseen = _layer(np.random.default_rng(30), rows=8, k=64, samples=3000, correlated=False)[2]
    assert _mse(result.rows, w, unseen) <= _mse(w * keep, w, unseen) * 1.05


def test_columns_of_one_sample_stay_on_one_side_of_the_split():
    rng = np.random.default_rng(4)
    w, keep, x = _layer(rng, rows=4, k=16, samples=64 * 8)
    owners = np.repeat(np.arange(64), 8)
    moments = _moments(x, owners, chunk=64)  # batches of whole samples, as the stage streams them
    assert moments.held_columns == 16 * 8 and moments.fit_columns == 48 * 8
    result = refit_layer(w, keep, moments)
    assert result.heldout_samples == 16 and result.fit_samples == 48
