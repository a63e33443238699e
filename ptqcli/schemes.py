"""Non-uniform weight grids: binary, ternary, power-of-two (shift) and exponential levels.

Each grid is sign x scale x magnitude, with the magnitudes a fixed set per scheme:
- binary (BinaryConnect / XNOR-Net): {1}; the scale that minimises the L2 error is mean|w|.
- ternary (threshold + scale): {0, 1}.
- pow2:B (power-of-two / shift weights): {0} and 2^k for k = 0 .. 2^(B-1) - 2, so sign,
  zero and the exponents fill B bits.
- exp:B (exponential discretisation, levels a * b^k): {0} and b^k for k = 0 .. 2^(B-1) - 2,
  with the base b fitted per layer.

In a QDQ model the levels become integer codes behind a per-channel DequantizeLinear: codes are
the magnitudes themselves for binary/ternary/pow2 (exact), and magnitudes x (32767 / largest)
rounded into int16 for exp (relative error below 2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .spec import QuantSpec

INT16_MAX = 32767


def magnitudes(spec: QuantSpec) -> np.ndarray:
    """The non-negative levels of a scheme, in units of the scale."""
    if spec.scheme == "binary":
        return np.array([1.0])
    if spec.scheme == "ternary":
        return np.array([0.0, 1.0])
    count = 2 ** (spec.bits - 1) - 1  # exponents; one code of the B bits is zero
    if spec.scheme == "pow2":
        return np.concatenate([[0.0], 2.0 ** np.arange(count)])
    if spec.scheme == "exp":
        return np.concatenate([[0.0], float(spec.base) ** np.arange(count)])
    raise ValueError(f"no level set for scheme {spec.scheme}")


def code_multiplier(spec: QuantSpec) -> float:
    """Integer codes = magnitudes x this: 1 where the magnitudes are integers already."""
    mags = magnitudes(spec)
    if np.all(mags == np.round(mags)) and mags.max() <= INT16_MAX:
        return 1.0
    return INT16_MAX / mags.max()


def max_code(spec: QuantSpec) -> int:
    return int(round(magnitudes(spec).max() * code_multiplier(spec)))


def code_levels(spec: QuantSpec) -> np.ndarray:
    """Every integer code the grid can take, sorted (uniform integers: qmin..qmax)."""
    if spec.scheme == "int":
        return np.arange(spec.qmin, spec.qmax + 1, dtype=np.float64)
    codes = np.round(magnitudes(spec) * code_multiplier(spec))
    return np.unique(np.concatenate([-codes, codes])).astype(np.float64)


def snap(w: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """w on the grid, in float: sign x scale x nearest magnitude."""
    s = _per_channel(scale, w.ndim, spec.axis)
    mags = magnitudes(spec)
    signs = np.where(w < 0, -1.0, 1.0)
    index = np.searchsorted((mags[1:] + mags[:-1]) / 2, np.abs(w / s), side="left")
    return (signs * mags[index] * s).astype(np.float32)


def encode(w: np.ndarray, dq_scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Integer codes whose DequantizeLinear with `dq_scale` (= scale / multiplier) is the grid value."""
    mult = code_multiplier(spec)
    s = _per_channel(np.asarray(dq_scale, dtype=np.float64) * mult, w.ndim, spec.axis)
    mags = magnitudes(spec)
    signs = np.where(w < 0, -1, 1)
    index = np.searchsorted((mags[1:] + mags[:-1]) / 2, np.abs(w / s), side="left")
    return (signs * np.round(mags[index] * mult)).astype(np.int64)


def _per_channel(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return w.reshape(1, -1).astype(np.float64)
    return np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis % w.ndim], -1).astype(np.float64)


def _row_error(rows: np.ndarray, scale: np.ndarray, mags: np.ndarray) -> np.ndarray:
    units = rows / scale[:, None]
    index = np.searchsorted((mags[1:] + mags[:-1]) / 2, np.abs(units), side="left")
    approx = np.where(rows < 0, -1.0, 1.0) * mags[index] * scale[:, None]
    return np.square(rows - approx).sum(axis=1)


RATIOS = np.geomspace(0.05, 1.5, 96)
# The scale search scores each candidate on at most this many weights per row (a strided subset);
# the error surface of a level set needs the fine grid far more than it needs every weight.
FIT_COLUMNS = 256


def fit_scales(rows: np.ndarray, mags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the scale with the least squared error: a geometric grid of scales around
    max|w| / largest level, refined between the best one's neighbours. Returns (scales, errors)."""
    peak = np.maximum(np.abs(rows).max(axis=1), 1e-12) / mags.max()
    rows = rows[:, :: max(1, -(-rows.shape[1] // FIT_COLUMNS))]
    errors = np.stack([_row_error(rows, peak * r, mags) for r in RATIOS])
    best = np.argmin(errors, axis=0)
    lo = RATIOS[np.maximum(best - 1, 0)]
    hi = RATIOS[np.minimum(best + 1, len(RATIOS) - 1)]
    fine = [lo + (hi - lo) * t for t in np.linspace(0, 1, 25)]
    fine_errors = np.stack([_row_error(rows, peak * r, mags) for r in fine])
    pick = np.argmin(fine_errors, axis=0)
    ratio = np.take_along_axis(np.stack(fine), pick[None], axis=0)[0]
    return peak * ratio, fine_errors[pick, np.arange(rows.shape[0])]


def _fit_binary(rows: np.ndarray, spec: QuantSpec) -> tuple[QuantSpec, np.ndarray]:
    # sign(w) * a has least L2 error at a = mean|w| (XNOR-Net).
    return spec, np.abs(rows).mean(axis=1)


def _fit_fixed_levels(rows: np.ndarray, spec: QuantSpec) -> tuple[QuantSpec, np.ndarray]:
    return spec, fit_scales(rows, magnitudes(spec))[0]


EXP_BASES = np.geomspace(1.15, 4.0, 6)


def _fit_exp(rows: np.ndarray, spec: QuantSpec) -> tuple[QuantSpec, np.ndarray]:
    """One base per layer (the levels are shared), scales per channel, least total squared error:
    a coarse grid of bases, then a finer one between the best one's neighbours."""
    def trial(base: float):
        candidate = replace(spec, base=float(base))
        scales, errors = fit_scales(rows, magnitudes(candidate))
        return float(errors.sum()), candidate, scales

    coarse = [trial(b) for b in EXP_BASES]
    i = int(np.argmin([t[0] for t in coarse]))
    lo, hi = EXP_BASES[max(i - 1, 0)], EXP_BASES[min(i + 1, len(EXP_BASES) - 1)]
    fine = [trial(b) for b in np.geomspace(lo, hi, 5)]
    best = min(coarse + fine, key=lambda t: t[0])
    return best[1], best[2]


@dataclass(frozen=True)
class Scheme:
    fit: Callable[[np.ndarray, QuantSpec], tuple[QuantSpec, np.ndarray]]


SCHEMES: dict[str, Scheme] = {
    "binary": Scheme(_fit_binary),
    "ternary": Scheme(_fit_fixed_levels),
    "pow2": Scheme(_fit_fixed_levels),
    "exp": Scheme(_fit_exp),
}


def fit(w: np.ndarray, spec: QuantSpec) -> tuple[QuantSpec, np.ndarray]:
    """The fitted spec (exp: with its base) and the DequantizeLinear scale per channel."""
    fitted, scales = SCHEMES[spec.scheme].fit(_rows(w, spec.axis), spec)
    dq = (scales / code_multiplier(fitted)).astype(np.float32)
    dq = np.maximum(dq, np.float32(1e-12))
    return fitted, (dq if spec.axis is not None else dq.reshape(()))
