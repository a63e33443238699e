"""Streaming histograms and range choosers against brute-force numpy on the raw values."""

import numpy as np
import pytest

from ptqcli.calibrate.observers import (
    Histogram, choose_range, entropy_range, minmax_range, mse_range, percentile_range,
)


def _stream(chunks, bins=2048):
    h = Histogram.empty(bins)
    for c in chunks:
        h.update(c)
    return h


def _data(seed=0):
    rng = np.random.default_rng(seed)
    # Growing scale across batches forces several range doublings mid-stream.
    return [rng.standard_normal(5000).astype(np.float32) * s for s in (0.3, 1.0, 2.5, 7.0)]


def test_counts_match_numpy_histogram_on_the_final_edges():
    chunks = _data()
    h = _stream(chunks)
    everything = np.concatenate(chunks)
    reference, _ = np.histogram(everything, bins=h.edges)
    # Values on an edge may fall either side in float32 vs float64 arithmetic: allow a handful.
    assert h.total == everything.size
    assert np.abs(h.counts - reference).sum() <= 10
    assert h.lo == everything.min() and h.hi == everything.max()


def test_doubling_merges_exactly():
    rng = np.random.default_rng(3)
    small = rng.uniform(-0.9, 0.9, 10000).astype(np.float32)
    big = rng.uniform(-3.5, 3.5, 10000).astype(np.float32)
    streamed = _stream([small, big], bins=1024)
    # The same values, but the range known from the start: the histograms must be identical.
    upfront = Histogram.empty(1024)
    upfront.bound = streamed.bound
    upfront.update(small)
    upfront.update(big)
    np.testing.assert_array_equal(streamed.counts, upfront.counts)


def test_batching_does_not_change_the_result():
    x = np.concatenate(_data(1))
    a = _stream([x[:1000], x[1000:]])
    b = _stream([x[:1000], x[1000:7000], x[7000:]])
    np.testing.assert_array_equal(a.counts, b.counts)


def test_non_finite_values_are_ignored():
    h = _stream([np.array([1.0, np.nan, -np.inf, 2.0], np.float32)])
    assert h.total == 2 and h.hi == 2.0


def test_minmax_is_exact():
    chunks = _data()
    lo, hi = minmax_range(_stream(chunks))
    everything = np.concatenate(chunks)
    assert (lo, hi) == (everything.min(), everything.max())


@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
def test_percentile_clips_the_stated_mass_to_within_one_bin(pct):
    chunks = _data()
    h = _stream(chunks, bins=4096)
    x = np.concatenate(chunks).astype(np.float64)
    width = 2 * h.bound / h.bins
    tail = (100 - pct) / 100
    lo, hi = percentile_range(h, pct, symmetric=False)
    # The CDF definition: at most `tail` of the mass lies beyond each end, and one bin
    # further in, at least that much does.
    assert np.mean(x < lo) <= tail + 1e-9 and np.mean(x < lo + width) >= tail - 1e-9
    assert np.mean(x > hi) <= tail + 1e-9 and np.mean(x > hi - width) >= tail - 1e-9
    _, t = percentile_range(h, pct, symmetric=True)
    assert np.mean(np.abs(x) > t) <= tail + 1e-9 and np.mean(np.abs(x) > t - width) >= tail - 1e-9


def _brute_force_mse(x, lo, hi, levels):
    step = (hi - lo) / (levels - 1)
    q = np.clip(np.round((x - lo) / step), 0, levels - 1) * step + lo
    return float(np.sum((x - q) ** 2))


def test_mse_choice_is_near_optimal_on_raw_values():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(50000), rng.standard_normal(20) * 40]).astype(np.float32)
    h = _stream([x], bins=4096)
    levels = 16  # a coarse grid makes clipping clearly worthwhile
    lo, hi = mse_range(h, levels, symmetric=True)
    chosen = _brute_force_mse(x, lo, hi, levels)
    m = np.abs(x).max()
    brute = min(_brute_force_mse(x, -t, t, levels) for t in np.linspace(m / 40, m, 400))
    full = _brute_force_mse(x, -m, m, levels)
    assert hi < m / 2  # the outliers are clipped
    assert chosen <= brute * 1.05
    assert chosen < full / 5


def test_entropy_clips_outliers_of_a_heavy_tailed_tensor():
    rng = np.random.default_rng(6)
    x = np.abs(np.concatenate([rng.standard_normal(100000), rng.standard_normal(10) * 60])).astype(np.float32)
    h = _stream([x], bins=4096)
    lo, hi = entropy_range(h, 256, symmetric=False)
    assert lo == 0.0
    assert np.percentile(x, 99.9) < hi < x.max() / 2


def test_choose_range_dispatches_every_method():
    h = _stream(_data())
    for method in ("minmax", "percentile", "mse", "entropy"):
        lo, hi = choose_range(h, method, 256, False, 99.99)
        assert lo < 0 < hi


def test_round_trip_through_arrays():
    h = _stream(_data())
    back = Histogram.from_arrays(**h.to_arrays())
    np.testing.assert_array_equal(back.counts, h.counts)
    assert (back.bound, back.lo, back.hi) == (h.bound, h.lo, h.hi)


def test_large_tensors_are_binned_from_a_strided_subset_with_exact_extremes():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(3_000_000).astype(np.float32)
    x[1] = 50.0  # an extreme the stride skips
    h = _stream([x], bins=4096)
    assert h.hi == 50.0 and h.lo == x.min()
    assert h.total < x.size
    lo, hi = percentile_range(h, 99.0, symmetric=False)
    assert abs(hi - np.percentile(x, 99.0)) < 0.02 and abs(lo - np.percentile(x, 1.0)) < 0.02


def test_minmax_only_tracking_skips_the_histogram():
    h = Histogram.empty(1024)
    h.update(np.array([-2.0, 3.0], np.float32), counts=False)
    assert (h.lo, h.hi, h.total) == (-2.0, 3.0, 0)
    assert minmax_range(h) == (-2.0, 3.0)


def _shards_and_one_pass(batches, shards, order):
    one = Histogram.empty(2048)
    for b in batches:
        one.update(b)
    parts = [Histogram.empty(2048) for _ in range(shards)]
    for i in order:
        parts[i % shards].update(batches[i])
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merged(part)
    return one, merged


@pytest.mark.parametrize("shards", [2, 3, 4])
@pytest.mark.parametrize("backwards", [False, True])
def test_histograms_of_shards_merge_into_exactly_the_one_pass_histogram(shards, backwards):
    """Whatever the shards and the order: counts, bound, extremes and zeros are those of one pass,
    values exactly at a power of two (a saturated sigmoid's 1.0, a bound doubled later) included."""
    rng = np.random.default_rng(0)
    batches = [np.array([1.0, 0.5, 0.0, -1.0], np.float32),  # peak exactly 1: the first bound, hit
               *(rng.standard_t(3, 20_000).astype(np.float32) * s for s in (0.5, 1.0, 4.0, 0.25)),
               np.array([4.0, -4.0, 2.0, 1e-30, -1e-30], np.float32),
               rng.normal(0, 30, 5_000).astype(np.float32)]
    order = list(range(len(batches)))
    one, merged = _shards_and_one_pass(batches, shards, order[::-1] if backwards else order)
    np.testing.assert_array_equal(merged.counts, one.counts)
    assert (merged.bound, merged.lo, merged.hi, merged.zeros) == (one.bound, one.lo, one.hi, one.zeros)


def test_doubling_bins_a_value_at_the_bound_where_the_doubled_bound_puts_it():
    early, late = Histogram.empty(16), Histogram.empty(16)
    early.update(np.array([1.0], np.float32))  # bound 1: the last bin, counted at the bound
    early.update(np.array([3.0], np.float32))  # bound 4
    late.update(np.array([3.0], np.float32))
    late.update(np.array([1.0], np.float32))  # binned at bound 4 directly
    np.testing.assert_array_equal(early.counts, late.counts)


def test_shard_bounds_cut_at_whole_batches_and_cover_every_sample():
    from ptqcli.calibrate.collect import shard_bounds

    assert shard_bounds(100, 16, 4) == [(0, 16), (16, 32), (48, 32), (80, 20)]  # 7 batches
    assert shard_bounds(10, 16, 4) == [(0, 10)]
    for total, batch, shards in ((257, 16, 4), (64, 8, 3), (5, 1, 8)):
        bounds = shard_bounds(total, batch, shards)
        assert all(start % batch == 0 for start, _ in bounds)
        assert sum(count for _, count in bounds) == total and bounds[0][0] == 0


def test_merged_channel_sums_are_the_one_pass_sums_bit_for_bit():
    rng = np.random.default_rng(0)
    runs = [rng.normal(0, 10 ** rng.uniform(-3, 3), (8, 5)).astype(np.float32) for _ in range(9)]
    one = Histogram.empty(64)
    for x in runs:
        one.update(x)
        one.update_channels(x, 1)
    parts = [Histogram.empty(64, partials=True) for _ in range(3)]
    for i, x in enumerate(runs):
        parts[i // 3].update(x)
        parts[i // 3].update_channels(x, 1)
    merged = parts[0].merged(parts[1]).merged(parts[2])
    assert merged.channel_sum.tobytes() == one.channel_sum.tobytes() and merged.channel_n == one.channel_n
