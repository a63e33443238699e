"""Frozen descriptions of a quantization format: what a tensor is turned into, not how."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PtqError

SCHEMES = ("int", "binary", "ternary", "pow2", "exp")
# Bits each scheme may take: binary and ternary have one width; pow2/exp spend one bit on the sign.
SCHEME_BITS = {"int": range(2, 9), "binary": (1,), "ternary": (2,), "pow2": range(2, 6), "exp": range(2, 6)}


@dataclass(frozen=True)
class QuantSpec:
    """The grid one tensor is put on: uniform integers (`int`) or a level set (see schemes.py).

    ``axis`` is the channel axis for per-channel scales, ``None`` for one scale per tensor.
    ``reduce_range`` drops one bit of the grid, which keeps ORT's u8s8 kernels on CPUs without
    VNNI from saturating their 16-bit pair sums. ``base`` is the fitted base of `exp` levels.
    """

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    reduce_range: bool = False
    scheme: str = "int"
    base: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PtqError(f"unknown quantization scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        allowed = SCHEME_BITS[self.scheme]
        if self.bits not in allowed and not (self.scheme == "int" and self.bits == 32):
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
        return 32

    @property
    def label(self) -> str:
        return {"int": f"int{self.bits}", "binary": "binary", "ternary": "ternary"}.get(
            self.scheme, f"{self.scheme}:{self.bits}")

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "axis": self.axis,
            "reduce_range": self.reduce_range,
            "scheme": self.scheme,
            "base": self.base,
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
        )


def quant_range(spec: QuantSpec) -> tuple[int, int]:
    """Integer grid limits. Symmetric signed grids are narrow (-127..127) so that zero is centred."""
    if spec.scheme != "int":
        from .schemes import max_code

        top = max_code(spec)
        return -top, top
    bits = spec.bits - 1 if spec.reduce_range else spec.bits
    if spec.signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi if spec.symmetric else -hi - 1
        return lo, hi
    return 0, 2**bits - 1
