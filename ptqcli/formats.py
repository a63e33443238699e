"""Weight and activation formats: one table of what each scheme is, and the grids it puts tensors on.

Every scheme is sign x scale x magnitude (uniform integers: the integers themselves):
- int:B, uniform integers, B = 2..8 (32 for int32 biases).
- binary (BinaryConnect / XNOR-Net): {1}; the scale that minimises the L2 error is mean|w|.
- ternary (threshold + scale): {0, 1}.
- pow2:B (power-of-two / shift weights): {0} and 2^k for k = 0 .. 2^(B-1) - 2, so sign,
  zero and the exponents fill B bits.
- exp:B (exponential discretisation, levels a * b^k): {0} and b^k for k = 0 .. 2^(B-1) - 2,
  with the base b fitted per layer.

`FORMATS` holds, per scheme, the widths it takes, its level set, how its scales are fitted and
which native kernel family packs it. In a QDQ model the levels become integer codes behind a
per-channel DequantizeLinear: codes are the magnitudes themselves for binary/ternary/pow2 (exact),
and magnitudes x (32767 / largest) rounded into int16 for exp (relative error below 2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .errors import PtqError


@dataclass(frozen=True)
class QuantSpec:
    """The grid one tensor is put on: uniform integers (`int`) or a level set (see schemes.py).

    ``axis`` is the channel axis for per-channel scales, ``None`` for one scale per tensor.
    ``reduce_range`` drops one bit of the grid, which keeps ORT's u8s8 kernels on CPUs without
    VNNI from saturating their 16-bit pair sums. ``base`` is the fitted base of `exp` levels.
    ``block_size`` makes the scales block-wise: one per ``block_size`` consecutive values along
    ``axis`` (a weight's input channels, as MatMulNBits and opset-21 DequantizeLinear take them).
    """

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    reduce_range: bool = False
    scheme: str = "int"
    base: float | None = None
    block_size: int | None = None
    # A float zero point per block, unrounded (MatMulNBits takes them): q = round(x / s + z). The
    # grid then fits each block's range exactly, as HQQ's and GGUF's min-offset blocks do.
    float_zero: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in FORMATS:
            raise PtqError(f"unknown quantization scheme '{self.scheme}' (known: {', '.join(FORMATS)})")
        allowed = FORMATS[self.scheme].bits
        # 16-bit (activations for int16 runtimes) and 32-bit (biases) integers are grids, not weight formats.
        if self.bits not in allowed and not (self.scheme == "int" and self.bits in (16, 32)):
            raise PtqError(f"{self.scheme} weights take {min(allowed)}..{max(allowed)} bits (got {self.bits})")
        if self.scheme == "exp" and self.base is None:
            object.__setattr__(self, "base", 2.0)

    @property
    def qmin(self) -> int:
        return quant_range(self)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self)[1]

    @property
    def storage_bits(self) -> int:
        """Bits of the ONNX integer type that carries the codes (int4/uint4, int8/uint8, int16, int32)."""
        if self.scheme != "int":
            return 8 if self.qmax <= 127 else 16
        if self.bits <= 4:
            return 4
        if self.bits <= 8:
            return 8
        return 16 if self.bits <= 16 else 32

    @property
    def label(self) -> str:
        return format_label(self.scheme, self.bits)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "axis": self.axis,
            "reduce_range": self.reduce_range,
            "scheme": self.scheme,
            "base": self.base,
            "block_size": self.block_size,
            "float_zero": self.float_zero,
        }

    @staticmethod
    def from_dict(d: dict) -> "QuantSpec":
        return QuantSpec(
            bits=int(d["bits"]),
            signed=bool(d["signed"]),
            symmetric=bool(d["symmetric"]),
            axis=None if d.get("axis") is None else int(d["axis"]),
            reduce_range=bool(d.get("reduce_range", False)),
            scheme=str(d.get("scheme", "int")),
            base=None if d.get("base") is None else float(d["base"]),
            block_size=None if d.get("block_size") is None else int(d["block_size"]),
            float_zero=bool(d.get("float_zero", False)),
        )


def quant_range(spec: QuantSpec) -> tuple[int, int]:
    """Integer grid limits. Symmetric signed grids are narrow (-127..127) so that zero is centred."""
    if spec.scheme != "int":
        top = max_code(spec)
        return -top, top
    bits = spec.bits - 1 if spec.reduce_range else spec.bits
    if spec.signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi if spec.symmetric else -hi - 1
        return lo, hi
    return 0, 2**bits - 1


# ---- level sets and their codes ---------------------------------------------------------------

INT16_MAX = 32767


def magnitudes(spec: QuantSpec) -> np.ndarray:
    """The non-negative levels of a level-set scheme, in units of the scale."""
    levels = FORMATS[spec.scheme].magnitudes
    if levels is None:
        raise ValueError(f"no level set for scheme {spec.scheme}")
    return levels(spec)


def _exponent_levels(base: float, bits: int) -> np.ndarray:
    """{0} and base^k for k = 0 .. 2^(B-1) - 2: sign, zero and the exponents fill B bits."""
    return np.concatenate([[0.0], float(base) ** np.arange(2 ** (bits - 1) - 1)])


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


MAX_INDEXED_LEVELS = 16


def indexable(spec: QuantSpec) -> bool:
    """Level-set codes that 4-bit indices into the level table can store (export/container.py)."""
    return spec.scheme != "int" and not spec.block_size and len(code_levels(spec)) <= MAX_INDEXED_LEVELS


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




# ---- the format table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """What one scheme is: the widths it takes, its level set (None: uniform integers), how its
    per-channel scales are fitted (None: from ranges, see planner.quantize_weight) and the native
    kernel family whose 4-bit codes hold it exactly up to `native_bits`."""

    bits: tuple[int, ...]
    magnitudes: Callable[[QuantSpec], np.ndarray] | None
    fit: Callable[[np.ndarray, QuantSpec], tuple[QuantSpec, np.ndarray]] | None
    native: str | None = None
    native_bits: int = 0
    fixed_width: bool = False  # named without a width: "binary", not "binary:1"
    # `--rounding auto` learns this scheme's rounding below 8 bits. Binary and ternary weights are
    # nearly all sign: their networks are trained for it, and rounding them layer-wise is untested.
    learned_rounding: bool = True


FORMATS: dict[str, Format] = {
    "int": Format(tuple(range(2, 9)), None, None, native="Int4", native_bits=4),
    "binary": Format((1,), lambda spec: np.array([1.0]), _fit_binary, native="Int4", native_bits=1,
                     fixed_width=True, learned_rounding=False),
    "ternary": Format((2,), lambda spec: np.array([0.0, 1.0]), _fit_fixed_levels, native="Int4", native_bits=2,
                      fixed_width=True, learned_rounding=False),
    "pow2": Format(tuple(range(2, 6)), lambda spec: _exponent_levels(2.0, spec.bits), _fit_fixed_levels,
                   native="Shift", native_bits=4),
    "exp": Format(tuple(range(2, 6)), lambda spec: _exponent_levels(spec.base, spec.bits), _fit_exp),
}

WEIGHT_FORMATS = "int8, int4, int3, int2 (with gN: blocks of N), binary, ternary, pow2:B, exp:B (B = 2..5)"


def format_label(scheme: str, bits: int) -> str:
    """('int', 4) -> 'int4'; ('pow2', 4) -> 'pow2:4'; ('binary', 1) -> 'binary'."""
    if scheme == "int":
        return f"int{bits}"
    return scheme if FORMATS[scheme].fixed_width else f"{scheme}:{bits}"


# Code widths ORT's CPU MatMulNBits stores packed (export/nbits.py).
NBITS_WIDTHS = (2, 4, 8)


def format_block_size(text: str) -> int | None:
    """The block size an integer format names ('int4g128' -> 128: one scale per 128 input channels
    of a MatMul/Gemm weight), or None ('int4': the config's own)."""
    t = str(text).strip().lower()
    head, sep, block = t.rpartition("g")
    if not (t.startswith("int") and sep and head[3:].isdigit() and block.isdigit()):
        return None
    size = int(block)
    if size < 16 or size & (size - 1):
        raise PtqError(f"weight format {text!r}: block size must be a power of two of at least 16")
    return size


def parse_weight_format(text: str) -> tuple[str, int]:
    """'int4' -> ('int', 4); 'int4g32' -> ('int', 4) (blocks: format_block_size); 'pow2:4' ->
    ('pow2', 4); 'binary' -> ('binary', 1)."""
    t = str(text).strip().lower()
    if format_block_size(t) is not None:
        t = t.rpartition("g")[0]
    fixed = {name: f.bits[0] for name, f in FORMATS.items() if f.fixed_width}
    if t in fixed:
        return t, fixed[t]
    if t.startswith("int") and t[3:].isdigit() and int(t[3:]) in FORMATS["int"].bits:
        return "int", int(t[3:])
    scheme, _, bits = t.partition(":")
    if scheme in FORMATS and scheme != "int" and not FORMATS[scheme].fixed_width and bits.isdigit() \
            and int(bits) in FORMATS[scheme].bits:
        return scheme, int(bits)
    raise PtqError(f"unknown weight format {text!r} (known: {WEIGHT_FORMATS})")


def learns_rounding(text: str) -> bool:
    """Whether `--rounding auto` rounds weights of this format layer by layer: below 8 bits, where
    nearest rounding costs accuracy (EfficientNet-Lite0 W4A8: 67.8% top-1 with nearest and bias
    correction, 87.0% with AdaRound; bench/results/adaround-128.md)."""
    scheme, bits = parse_weight_format(text)
    return bits < 8 and FORMATS[scheme].learned_rounding


def native_family(spec: QuantSpec) -> str | None:
    """The native kernel family ("Int4", "Shift") that runs this grid exactly, or None."""
    fmt = FORMATS[spec.scheme]
    return fmt.native if fmt.native and spec.bits <= fmt.native_bits else None


def fit(w: np.ndarray, spec: QuantSpec) -> tuple[QuantSpec, np.ndarray]:
    """The fitted spec (exp: with its base) and the DequantizeLinear scale per channel."""
    fitted, scales = FORMATS[spec.scheme].fit(_rows(w, spec.axis), spec)
    dq = (scales / code_multiplier(fitted)).astype(np.float32)
    dq = np.maximum(dq, np.float32(1e-12))
    return fitted, (dq if spec.axis is not None else dq.reshape(()))
