"""Re-fitting the weights a mask keeps, validated on samples the fit did not see.

A masked row keeps some of its weights; moving them can win back part of what the dropped ones
contributed (AdaPrune, Hubara et al. 2021): per output row, with X the layer's input columns,
    min_v  || v . X_kept - w . X ||^2 + lambda * || v - w_kept ||^2
The penalty pulls towards the plain masked weights, so lambda -> infinity is the plain mask and
lambda -> 0 least squares. Least squares alone interpolates the calibration set as soon as a row
keeps more weights than there are samples (a classifier with 1,280 inputs and 512 samples): its
error on those samples falls to ~0 while held-out accuracy collapses. So the samples are split,
lambda is chosen on the held-out part, and a layer whose best re-fit is not better there than the
plain mask keeps the plain mask.

Everything runs on Gram matrices G = X X^T / S, accumulated while the calibration data streams
past (`Moments`): a row's error for weights v is (v - w)^T G (v - w), so memory is one K x K matrix
per group whatever the number of samples, and the columns are never kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ridge strengths, relative to the mean diagonal of each row's kept Gram block.
STRENGTHS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
# Every HOLD_OUT-th sample is held out of the fit.
HOLD_OUT = 4
# Rows scored per strength while choosing it (all rows are fitted once it is chosen).
SELECTION_ROWS = 96
# Rows solved at once: bounds the gathered [rows, kept, kept] Gram blocks.
CHUNK = 64


@dataclass(frozen=True)
class Refit:
    """One layer's re-fit: the rows to use and how they were chosen."""

    rows: np.ndarray              # (G, M, K): re-fitted, or the plain masked rows
    strength: float | None        # the chosen relative ridge strength; None: the plain mask was kept
    heldout_mse_masked: float     # output MSE against the dense layer on held-out samples
    heldout_mse_refit: float      # the same for the chosen rows (equal to masked when the mask is kept)
    fit_samples: int
    heldout_samples: int


def held_out(sample_ids: np.ndarray) -> np.ndarray:
    """Which columns are held out of the fit: whole samples, every HOLD_OUT-th one, so positions of
    one image never straddle the split."""
    return np.asarray(sample_ids) % HOLD_OUT == HOLD_OUT - 1


@dataclass
class Moments:
    """Running sums of x x^T over a layer's input columns, (G, K, K), for fit and held-out samples."""

    fit: np.ndarray
    held: np.ndarray
    fit_columns: int = 0
    held_columns: int = 0
    fit_samples: int = 0
    held_samples: int = 0

    @staticmethod
    def empty(groups: int, k: int) -> "Moments":
        return Moments(np.zeros((groups, k, k)), np.zeros((groups, k, k)))

    def add(self, columns: np.ndarray, sample_ids: np.ndarray) -> None:
        """Sample-major columns (S, G, K) and the sample each came from (S,)."""
        held = held_out(sample_ids)
        for side, pick in (("fit", ~held), ("held", held)):
            x = np.moveaxis(np.asarray(columns[pick], dtype=np.float64), 0, 2)  # (G, K, s)
            getattr(self, side)[...] += x @ x.transpose(0, 2, 1)
            setattr(self, f"{side}_columns", getattr(self, f"{side}_columns") + int(pick.sum()))
            setattr(self, f"{side}_samples", getattr(self, f"{side}_samples") + len(np.unique(sample_ids[pick])))

    def grams(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fit, held-out, all) second moments, each divided by its number of columns."""
        total = self.fit + self.held
        return (self.fit / max(self.fit_columns, 1), self.held / max(self.held_columns, 1),
                total / max(self.fit_columns + self.held_columns, 1))


def output_mse(g: np.ndarray, rows: np.ndarray, dense: np.ndarray) -> float:
    """Mean squared output difference of `rows` against `dense` over the columns behind Gram `g`
    (G, K, K), per output: mean over rows of d^T G d."""
    d = rows - dense
    return float(np.mean(np.sum((d @ g) * d, axis=2)))


def kept_indices(keep: np.ndarray) -> np.ndarray:
    """(R, K) boolean -> (R, kept) indices; every row of an N:M mask keeps the same count."""
    counts = keep.sum(axis=1)
    if counts.size and (counts != counts[0]).any():
        raise ValueError("re-fit needs the same number of kept weights in every row")
    order = np.argsort(~keep, axis=1, kind="stable")
    return order[:, :int(counts[0]) if counts.size else 0]


def solve_rows(g: np.ndarray, dense: np.ndarray, kept: np.ndarray, strength: float) -> np.ndarray:
    """Ridge re-fit of rows `dense` (R, K) restricted to `kept` (R, k) under one group's Gram g (K, K):
    (G_kk + lam I) v = G_k: w + lam w_k, lam = strength x mean diagonal of G_kk; returns (R, K)."""
    out = np.zeros_like(dense)
    k = kept.shape[1]
    if k == 0:
        return out
    eye = np.eye(k)
    for start in range(0, len(dense), CHUNK):
        idx = kept[start:start + CHUNK]
        w = dense[start:start + CHUNK]
        block = g[idx[:, :, None], idx[:, None, :]]                    # (r, k, k)
        lam = strength * np.trace(block, axis1=1, axis2=2) / k
        lam = np.maximum(lam, 1e-12 * np.abs(g).max(initial=1.0))[:, None, None]
        rhs = np.einsum("rkj,rj->rk", g[idx], w) + lam[:, :, 0] * np.take_along_axis(w, idx, axis=1)
        v = np.linalg.solve(block + lam * eye, rhs[:, :, None])[:, :, 0]
        np.put_along_axis(out[start:start + CHUNK], idx, v, axis=1)
    return out


def refit_layer(rows: np.ndarray, keep: np.ndarray, moments: Moments, seed: int = 0) -> Refit:
    """Re-fit the kept weights of `rows` (G, M, K) under mask `keep` with the input moments of the
    layer; see the module docstring for how the strength is chosen."""
    rows = np.asarray(rows, dtype=np.float64)
    masked = rows * keep
    counts = moments.fit_samples, moments.held_samples
    if not moments.fit_columns or not moments.held_columns:
        return Refit(masked, None, float("nan"), float("nan"), *counts)
    g_fit, g_held, g_all = moments.grams()
    kept = [kept_indices(keep[i]) for i in range(len(rows))]
    baseline = output_mse(g_held, masked, rows)
    rng = np.random.default_rng(seed)
    scored = [np.sort(rng.choice(rows.shape[1], min(SELECTION_ROWS, rows.shape[1]), replace=False))
              for _ in range(len(rows))]

    def trial(strength: float, picks: list[np.ndarray] | None) -> float:
        pick = (lambda i, a: a) if picks is None else (lambda i, a: a[picks[i]])  # noqa: E731
        fitted = np.stack([solve_rows(g_fit[i], pick(i, rows[i]), pick(i, kept[i]), strength)
                           for i in range(len(rows))])
        return output_mse(g_held, fitted, np.stack([pick(i, rows[i]) for i in range(len(rows))]))

    sub_baseline = output_mse(g_held, np.stack([masked[i][scored[i]] for i in range(len(rows))]),
                              np.stack([rows[i][scored[i]] for i in range(len(rows))]))
    errors = [trial(s, scored) for s in STRENGTHS]
    best = int(np.argmin(errors))
    if not errors[best] < sub_baseline:
        return Refit(masked, None, baseline, baseline, *counts)
    error = trial(STRENGTHS[best], None)
    if not error < baseline:  # the sampled rows misled the choice: never worse than the plain mask
        return Refit(masked, None, baseline, baseline, *counts)
    # Validated: the final rows use every sample at the chosen strength.
    fitted = np.stack([solve_rows(g_all[i], rows[i], kept[i], STRENGTHS[best]) for i in range(len(rows))])
    return Refit(fitted, STRENGTHS[best], baseline, error, *counts)
