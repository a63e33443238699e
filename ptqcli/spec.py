"""Frozen descriptions of a quantization format: what a tensor is turned into, not how."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PtqError

SCHEMES = ("int",)


@dataclass(frozen=True)
class QuantSpec:
    """A uniform integer grid for one tensor.

    ``axis`` is the channel axis for per-channel scales, ``None`` for one scale per tensor.
    ``reduce_range`` drops one bit of the grid, which keeps ORT's u8s8 kernels on CPUs without
    VNNI from saturating their 16-bit pair sums.
    """

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    reduce_range: bool = False
    scheme: str = "int"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise PtqError(f"unknown quantization scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        if not 2 <= self.bits <= 8 and self.bits != 32:
            raise PtqError(f"unsupported bit-width {self.bits} (2..8, or 32 for biases)")

    @property
    def qmin(self) -> int:
        return quant_range(self)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self)[1]

    @property
    def storage_bits(self) -> int:
        """Bits of the ONNX integer type that carries the values (int4/uint4, int8/uint8, int32)."""
        if self.bits <= 4:
            return 4
        if self.bits <= 8:
            return 8
        return 32

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "axis": self.axis,
            "reduce_range": self.reduce_range,
            "scheme": self.scheme,
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
        )


def quant_range(spec: QuantSpec) -> tuple[int, int]:
    """Integer grid limits. Symmetric signed grids are narrow (-127..127) so that zero is centred."""
    bits = spec.bits - 1 if spec.reduce_range else spec.bits
    if spec.signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi if spec.symmetric else -hi - 1
        return lo, hi
    return 0, 2**bits - 1
