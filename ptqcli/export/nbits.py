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


def stored_names(weight: str) -> tuple[str, str]:
    """The initializers MatMulNBits reads a weight's codes B and scales from."""
    return f"{weight}_nbits_B", f"{weight}_nbits_scales"


def tied_lookup(node: NodeProto, weight: str, tq: TensorQuant, factors: np.ndarray
                ) -> tuple[list[TensorProto], list[NodeProto]]:
    """A Gather of rows of a table whose transpose, times per-row `factors` [K], is `weight` (on grid
    `tq`, [K, N], exported as MatMulNBits), read from that weight's stored codes: B [N, k_blocks,
    blob] is a table of rows of blocks, which GatherBlockQuantized looks up directly (quantize axis
    2); a row's blocks are then joined into its K values and divided by the factors. The scales are
    read through a Reshape of MatMulNBits' own (ORT folds it into a small copy at load); zero
    points, packed differently, are stored once more (N x k_blocks bytes)."""
    spec = tq.spec
    k_blocks, n = np.shape(tq.scale)
    k = len(factors)
    codes_name, scales_name = stored_names(weight)
    ids, y, at = node.input[1], node.output[0], f"{node.name}_tied"
    inits = [numpy_helper.from_array(np.array([n, k_blocks, 1], dtype=np.int64), f"{at}_scale_shape"),
             numpy_helper.from_array(np.array([k_blocks * spec.block_size], dtype=np.int64), f"{at}_row_width")]
    gathered = [codes_name, ids, f"{at}_scales"]
    if not spec.symmetric:  # without them GatherBlockQuantized takes the middle code, as MatMulNBits does
        zero = np.asarray(tq.zero_point).T.astype(np.int64) + (1 << (spec.bits - 1))
        inits.append(numpy_helper.from_array(zero.astype(np.uint8).reshape(n, k_blocks, 1), f"{at}_zero_points"))
        gathered.append(f"{at}_zero_points")
    make = helper.make_node
    nodes = [
        make("Reshape", [scales_name, f"{at}_scale_shape"], [f"{at}_scales"], name=f"{at}_scales"),
        make("GatherBlockQuantized", gathered, [f"{at}_blocks"], name=node.name, domain="com.microsoft",
             block_size=spec.block_size, gather_axis=0, quantize_axis=2, bits=spec.bits),
        make("Shape", [ids], [f"{at}_ids_shape"], name=f"{at}_ids_shape"),
        make("Concat", [f"{at}_ids_shape", f"{at}_row_width"], [f"{at}_shape"], name=f"{at}_shape", axis=0),
        make("Reshape", [f"{at}_blocks", f"{at}_shape"], [f"{at}_rows"], name=f"{at}_rows"),
    ]
    if k < k_blocks * spec.block_size:  # MatMulNBits pads a short last block; the lookup drops it
        inits += [numpy_helper.from_array(np.array([v], dtype=np.int64), f"{at}_{part}")
                  for part, v in (("start", 0), ("end", k), ("axis", -1))]
        nodes.append(make("Slice", [nodes[-1].output[0], f"{at}_start", f"{at}_end", f"{at}_axis"], [f"{at}_cut"],
                          name=f"{at}_cut"))
    if not np.all(factors == 1):
        inits.append(numpy_helper.from_array((1 / factors.astype(np.float64)).astype(np.float32), f"{at}_unscale"))
        nodes.append(make("Mul", [nodes[-1].output[0], f"{at}_unscale"], [f"{at}_unscaled"], name=f"{at}_unscaled"))
    nodes[-1].output[0] = y  # the last step writes the Gather's output
    return inits, nodes


def matmul_nbits(node: NodeProto, layer: Layer, tq: TensorQuant, w: np.ndarray,
                 accuracy_level: int) -> tuple[list[TensorProto], NodeProto]:
    """The initializers and the MatMulNBits node that replace `node` (A @ W, W [K, N])."""
    spec = tq.spec
    source = w if tq.value is None else tq.value.reshape(w.shape)
    q = codes(source, tq.scale, tq.zero_point, spec, np.int16)
    k, n = w.shape
    codes_name, scales_name = stored_names(layer.weight)
    prefix = f"{layer.weight}_nbits"
    scales = np.ascontiguousarray(np.asarray(tq.scale, dtype=np.float32).T)  # [N, k_blocks]
    inits = [numpy_helper.from_array(packed_weight(q, spec), codes_name),
             numpy_helper.from_array(scales, scales_name)]
    inputs = [layer.activation, codes_name, scales_name]
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
