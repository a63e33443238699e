"""Block-wise weights as ONNX Runtime's MatMulNBits (com.microsoft), the kernel stock ORT runs for
weight-only 2/4/8-bit language-model layers.

MatMulNBits computes A @ W for W [K, N] stored transposed and packed: B [N, k_blocks, blob] uint8
with `block_size` codes per block along K, packed low bits first; scales [N, k_blocks]; zero points
packed the same way ([N, ceil(k_blocks * bits / 8)] uint8; without them the zero point is
2^(bits-1)). Codes are unsigned, so a signed code q is stored as q + 2^(bits-1). `accuracy_level`
picks the kernel's compute type (0: as the input, 4: int8 activations quantized per block at run
time, ORT's fastest CPU path).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..formats import NBITS_WIDTHS, QuantSpec
from ..plan import Layer, TensorQuant
from ..quant import codes

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


# A layer's MatMulNBits node is named after it, with this suffix.
NBITS_SUFFIX = "_MatMulNBits"


def takes(layer: Layer, tq: TensorQuant, w: np.ndarray) -> bool:
    """A MatMul with a [K, N] weight on a block-wise integer grid MatMulNBits stores."""
    spec = tq.spec
    return (layer.op_type == "MatMul" and w.ndim == 2 and spec.scheme == "int" and spec.block_size is not None
            and spec.axis % 2 == 0 and spec.bits in NBITS_WIDTHS)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [..., L] (L * bits a multiple of 8) packed low bits first into uint8 [..., L * bits / 8]."""
    per_byte = 8 // bits
    shaped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(shaped << shifts, axis=-1).astype(np.uint8)


def packed_weight(q: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Signed codes of W [K, N] as B [N, k_blocks, blob]; a short last block is padded with the zero code."""
    k, n = q.shape
    bs = spec.block_size
    blocks = -(-k // bs)
    offset = 1 << (spec.bits - 1)
    unsigned = np.full((n, blocks * bs), offset, dtype=np.uint8)
    unsigned[:, :k] = (q.T.astype(np.int16) + offset).astype(np.uint8)
    return pack_rows(unsigned.reshape(n, blocks, bs), spec.bits)


def packed_zero_points(zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Zero points [k_blocks, N] (as the plan holds them) as uint8 [N, ceil(k_blocks * bits / 8)]."""
    zp = zero_point.T.astype(np.int64) + (1 << (spec.bits - 1))
    per_byte = 8 // spec.bits
    pad = (-zp.shape[1]) % per_byte
    zp = np.pad(zp, ((0, 0), (0, pad)), constant_values=1 << (spec.bits - 1))
    return pack_rows(zp, spec.bits)


def matmul_nbits(node: NodeProto, layer: Layer, tq: TensorQuant, w: np.ndarray,
                 accuracy_level: int) -> tuple[list[TensorProto], NodeProto]:
    """The initializers and the MatMulNBits node that replace `node` (A @ W, W [K, N])."""
    spec = tq.spec
    source = w if tq.value is None else tq.value.reshape(w.shape)
    q = codes(source, tq.scale, tq.zero_point, spec, np.int16)
    k, n = w.shape
    prefix = f"{layer.weight}_nbits"
    scales = np.ascontiguousarray(np.asarray(tq.scale, dtype=np.float32).T)  # [N, k_blocks]
    inits = [numpy_helper.from_array(packed_weight(q, spec), f"{prefix}_B"),
             numpy_helper.from_array(scales, f"{prefix}_scales")]
    inputs = [layer.activation, f"{prefix}_B", f"{prefix}_scales"]
    if spec.float_zero:  # unpacked, in the scales' type and layout, on the unsigned code scale
        zero = np.asarray(tq.zero_point, dtype=np.float32).T + np.float32(1 << (spec.bits - 1))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(zero, dtype=np.float32), f"{prefix}_zero_points"))
        inputs.append(f"{prefix}_zero_points")
    elif not spec.symmetric:
        inits.append(numpy_helper.from_array(packed_zero_points(np.asarray(tq.zero_point), spec), f"{prefix}_zero_points"))
        inputs.append(f"{prefix}_zero_points")
    out = helper.make_node("MatMulNBits", inputs, [node.output[0]], name=node.name + NBITS_SUFFIX,
                           domain="com.microsoft", K=k, N=n, bits=spec.bits, block_size=spec.block_size,
                           accuracy_level=accuracy_level)
    return inits, out
