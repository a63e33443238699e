"""Streaming activation statistics and the range choosers that read them.

One ``Histogram`` per tensor: exact min/max plus a histogram over [-R, R] on a fixed number of
bins, R a power of two. When a value beyond R arrives, R doubles and adjacent bins merge in pairs,
which is exact (bin edges stay aligned; values equal to R, kept in the last bin, are counted apart
so that they move to the bin 2R gives them), so memory is constant in the number of samples and the
counts are those binning at the final R would give: they do not depend on how the samples were
batched or in which order, and histograms of disjoint shards merge (`merged`) into exactly the
histogram of one pass over all of them.

Range choosers (minmax, percentile, mse, entropy) are pure functions of a histogram and a grid size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Histogram:
    bins: int
    counts: np.ndarray  # int64 [bins] over [-bound, bound]
    bound: float
    lo: float
    hi: float
    # Exact zeros (ReLU, padding) are tracked apart: zero is always exactly representable, so
    # their spike must not sway range choices that compare distributions.
    zeros: int = 0
    # Per-channel sums of the values (bias correction needs each layer input's channel means).
    channel_sum: np.ndarray | None = None
    channel_n: int = 0
    # Values exactly equal to +bound: in the last bin now, in the bin above the middle once R doubles.
    at_bound: int = 0
    # Each run's channel sums, in order, when kept (a shard's: `merged` then adds them one by one
    # onto the shards before it, exactly as one pass would have).
    partials: list | None = None

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None or self.channel_n == 0 else self.channel_sum / self.channel_n

    def update_channels(self, x: np.ndarray, axis: int) -> None:
        x = np.asarray(x)
        axis = axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != axis)
        sums = x.sum(axis=others, dtype=np.float64)
        self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
        if self.partials is not None:
            self.partials.append(sums)
        self.channel_n += x.size // x.shape[axis]

    @staticmethod
    def empty(bins: int, partials: bool = False) -> "Histogram":
        return Histogram(bins, np.zeros(bins, dtype=np.int64), 0.0, np.inf, -np.inf,
                         partials=[] if partials else None)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.bound, self.bound, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, x: np.ndarray, counts: bool = True) -> None:
        """Fold values in. `counts=False` tracks min/max only (all that minmax needs)."""
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf somewhere: drop those values
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if not counts:
            return
        peak = max(abs(lo), abs(hi))
        if self.bound == 0.0:
            self.bound = _initial_bound(peak)
        while peak > self.bound:
            self._double()
        x = _subsample(x)
        self.zeros += x.size - int(np.count_nonzero(x))
        half = self.bins // 2
        # floor(x * half / bound), exactly (a float32 times a power of two is exact in float64, and
        # so is its floor), so that floor(floor(2y) / 2) = floor(y) makes doubling exact; x == bound
        # lands in an extra bin that is folded into the last one.
        index = np.floor(x.astype(np.float64) * (half / self.bound)).astype(np.intp)
        index += half
        binned = np.bincount(index, minlength=self.bins + 1)
        binned[self.bins - 1] += binned[self.bins]
        self.at_bound += int(binned[self.bins])
        self.counts += binned[: self.bins]

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        counts = np.zeros_like(self.counts)
        counts[quarter : quarter + merged.size] = merged
        # x == R is binned where 2R puts it, one bin above its pair's
        top = quarter + merged.size - 1
        counts[top] -= self.at_bound
        counts[top + 1] += self.at_bound
        self.at_bound = 0
        self.counts = counts
        self.bound *= 2.0

    def merged(self, other: "Histogram") -> "Histogram":
        """This histogram and one of the samples after them (the same bin count) as one: both at the
        larger bound, counts added, extremes and zeros combined; channel sums are other's runs added
        one by one when it kept them (the one-pass sum, bit for bit), else the two sums added."""
        if other.bins != self.bins:
            raise ValueError("histograms of different bin counts do not merge")
        a, b = (Histogram(h.bins, h.counts.copy(), h.bound, h.lo, h.hi, h.zeros, h.channel_sum, h.channel_n,
                          h.at_bound, h.partials) for h in (self, other))
        bound = max(a.bound, b.bound)
        for h in (a, b):
            while 0.0 < h.bound < bound:
                h._double()
            if h.bound == 0.0:
                h.bound = bound
        sums = a.channel_sum
        for part in (b.partials if b.partials is not None else [b.channel_sum]):
            if part is not None:
                sums = part if sums is None else sums + part
        partials = None if a.partials is None or b.partials is None else a.partials + b.partials
        return Histogram(a.bins, a.counts + b.counts, bound, min(a.lo, b.lo), max(a.hi, b.hi), a.zeros + b.zeros,
                         sums, a.channel_n + b.channel_n, a.at_bound + b.at_bound, partials)

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = np.array([self.bound, self.lo, self.hi, self.zeros, self.channel_n, self.at_bound], dtype=np.float64)
        arrays = {"counts": self.counts, "meta": meta}
        if self.channel_sum is not None:
            arrays["chsum"] = self.channel_sum
        return arrays

    @staticmethod
    def from_arrays(counts: np.ndarray, meta: np.ndarray, chsum: np.ndarray | None = None) -> "Histogram":
        channel_n = int(meta[4]) if len(meta) > 4 else 0
        at_bound = int(meta[5]) if len(meta) > 5 else 0
        return Histogram(len(counts), counts.astype(np.int64), float(meta[0]), float(meta[1]), float(meta[2]),
                         int(meta[3]), chsum, channel_n, at_bound)

    def nonzero_counts(self) -> np.ndarray:
        """Counts with the exact zeros taken out of the bin that holds zero."""
        counts = self.counts.copy()
        counts[self.bins // 2] -= self.zeros
        return counts


# Binning costs several passes per value; past this many values per tensor per batch, a strided
# subset gives the same distribution (min and max stay exact: they are taken over everything).
MAX_BINNED = 1 << 18


def _subsample(x: np.ndarray) -> np.ndarray:
    if x.size <= MAX_BINNED:
        return x
    stride = _next_prime(-(-x.size // MAX_BINNED))
    return np.ascontiguousarray(x[::stride])  # one strided copy; the passes after it run contiguous


def _next_prime(n: int) -> int:
    """A prime stride cannot alias with the channel or spatial periods of an NCHW tensor."""
    n = max(n, 2)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def _initial_bound(peak: float) -> float:
    """A power of two at or above the first batch's peak: later doublings then stay on round numbers."""
    if peak <= 0.0:
        return 2.0**-20
    return float(2.0 ** np.ceil(np.log2(peak)))


# ---- range choosers -------------------------------------------------------------------------


def minmax_range(h: Histogram) -> tuple[float, float]:
    return (0.0, 0.0) if h.lo > h.hi else (h.lo, h.hi)  # lo > hi: nothing was seen


def percentile_range(h: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    """Clip the given percentile of mass: both tails for a signed tensor, |x| when symmetric."""
    if h.total == 0:
        return 0.0, 0.0
    tail = (100.0 - percentile) / 100.0
    edges = h.edges
    if symmetric:
        mag = _folded(h)
        cdf = np.cumsum(mag) / mag.sum()
        k = int(np.searchsorted(cdf, 1.0 - tail))
        t = min(edges[h.bins // 2 + k + 1], max(abs(h.lo), abs(h.hi)))
        return -t, t
    cdf = np.cumsum(h.counts) / h.total
    lo_idx = int(np.searchsorted(cdf, tail, side="right"))
    hi_idx = int(np.searchsorted(cdf, 1.0 - tail))
    lo = max(h.lo, min(edges[lo_idx], 0.0)) if h.lo < 0 else h.lo
    hi = min(h.hi, edges[min(hi_idx + 1, h.bins)])
    return lo, hi


def _folded(h: Histogram) -> np.ndarray:
    """Histogram of |x| over [0, bound] on bins/2 bins."""
    half = h.bins // 2
    return h.counts[half:] + h.counts[:half][::-1]


def _candidates(h: Histogram, symmetric: bool, alphas: np.ndarray) -> list[tuple[float, float]]:
    """Shrunken ranges [a*lo, a*hi] (or [-a*m, a*m]) of the observed range, one per alpha."""
    lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        lo, hi = (-m, m) if h.lo < 0 else (0.0, m)
    return [(lo * a, hi * a) for a in alphas]


def _search(h: Histogram, symmetric: bool, score) -> tuple[float, float] | None:
    """Coarse-to-fine search of the clipping ratio in [1/16, 1] minimising score(lo, hi).

    A geometric grid of 32 ratios, then 32 more between the best one's neighbours: the
    resolution of a 1,000-point grid for a tenth of the evaluations.
    """
    coarse = np.geomspace(1.0, 1.0 / 16.0, 32)
    best = _best(h, symmetric, score, coarse)
    if best is None:
        return None
    i = int(np.argmin(np.abs(coarse - best)))
    fine = np.linspace(coarse[min(i + 1, len(coarse) - 1)], coarse[max(i - 1, 0)], 32)
    alpha = _best(h, symmetric, score, np.concatenate([fine, [best]]))
    return _candidates(h, symmetric, np.array([alpha]))[0]


def _best(h: Histogram, symmetric: bool, score, alphas: np.ndarray) -> float | None:
    scores = [score(lo, hi) for lo, hi in _candidates(h, symmetric, alphas)]
    finite = [s for s in scores if s is not None]
    if not finite:
        return None
    return float(alphas[int(np.argmin([np.inf if s is None else s for s in scores]))])


def _grid_error(h: Histogram, lo: float, hi: float, levels: int) -> float:
    """Expected squared error of quantizing the histogram's values onto `levels` points on [lo, hi]."""
    c = h.centers
    w = h.counts
    step = (hi - lo) / (levels - 1) if hi > lo else 1.0
    q = np.clip(np.round((c - lo) / step), 0, levels - 1) * step + lo
    return float(np.dot(w, (c - q) ** 2))


def mse_range(h: Histogram, levels: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range with the least expected squared quantization error."""
    if h.total == 0 or h.hi <= h.lo:
        return minmax_range(h)
    return _search(h, symmetric, lambda lo, hi: _grid_error(h, lo, hi, levels)) or minmax_range(h)


def entropy_range(h: Histogram, levels: int, symmetric: bool) -> tuple[float, float]:
    """The clipping range whose quantized distribution is closest in KL to the clipped original.

    Follows the TensorRT calibration idea: mass outside the range is folded into the edge bins,
    the in-range bins are merged into `levels` groups and spread back evenly over the non-empty bins.
    Ranges spanning fewer bins than levels are not scored: their quantized distribution equals
    the original and the KL says nothing.
    """
    if h.total == 0 or h.hi <= h.lo:
        return minmax_range(h)
    edges = h.edges
    counts = h.nonzero_counts()

    def kl(lo: float, hi: float) -> float | None:
        i0 = int(np.clip(np.searchsorted(edges, lo, side="right") - 1, 0, h.bins - 1))
        i1 = int(np.clip(np.searchsorted(edges, hi, side="left"), i0 + 1, h.bins))
        return None if i1 - i0 < levels else _clipped_kl(counts, i0, i1, levels)

    return _search(h, symmetric, kl) or minmax_range(h)


def _clipped_kl(counts: np.ndarray, i0: int, i1: int, levels: int) -> float:
    """KL(P || Q): P is the range with outliers folded into its edge bins, Q the quantized range.

    Q is built from the in-range counts *without* the folded outliers: that is what makes a
    range that clips much mass pay for it.
    """
    inside = counts[i0:i1].astype(np.float64)
    p = inside.copy()
    p[0] += counts[:i0].sum()
    p[-1] += counts[i1:].sum()
    nonzero = inside > 0
    groups = np.minimum((np.arange(p.size) * levels) // p.size, levels - 1)
    mass = np.bincount(groups, weights=inside, minlength=levels)
    support = np.bincount(groups, weights=nonzero, minlength=levels)
    q = np.where(nonzero, mass[groups] / np.maximum(support[groups], 1), 0.0)
    p /= p.sum()
    q /= max(q.sum(), 1e-300)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def choose_range(h: Histogram, method: str, levels: int, symmetric: bool, percentile: float) -> tuple[float, float]:
    """Dispatch on the method name: the one place observers are chosen by name."""
    choosers = {
        "minmax": lambda: minmax_range(h),
        "percentile": lambda: percentile_range(h, percentile, symmetric),
        "mse": lambda: mse_range(h, levels, symmetric),
        "entropy": lambda: entropy_range(h, levels, symmetric),
    }
    return choosers[method]()
