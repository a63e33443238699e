"""Packed weight formats of the native operators and their numpy references.

The references follow the kernels' arithmetic step by step (exact int32 sums, then the float
epilogue in the same order, float32 throughout), so a kernel and its reference agree bit for bit.

Formats (K the reduction length, N the output channels):
- 4-bit codes (Int4*, Shift*): [N, Kp/2] uint8, Kp = K rounded up to 32 (and to the group size);
  in each 16-byte block, byte j holds the code of k = 32b + j (low nibble) and k = 32b + 16 + j (high
  nibble); padding codes are the zero point. Int4: code = q + zero (8 for signed int4). Shift: bit 3
  the sign, bits 0-2 the exponent e, value 2^e for e < 7 and 0 for e = 7.
- sign bits (Binary*): [N, ceil(K/64)] uint64, bit k % 64 of word k // 64 set where w < 0.
"""

from __future__ import annotations

import numpy as np

NIBBLE_BLOCK = 32
BINARY_WORD = 64
INT4_ZERO = 8
SHIFT_ZERO_CODE = 7
SHIFT_MAX_EXPONENT = 6


def padded_k(k: int, group_size: int = 0) -> int:
    step = group_size if group_size > 0 else NIBBLE_BLOCK
    return -(-k // step) * step


def shift_values() -> np.ndarray:
    """The integer value of each of the 16 shift codes."""
    mags = np.array([2 ** e for e in range(SHIFT_MAX_EXPONENT + 1)] + [0], dtype=np.int32)
    return np.concatenate([mags, -mags])


# --------------------------------------------------------------------------- packing

def pack_nibbles(codes: np.ndarray, kp: int, pad_code: int | np.ndarray) -> np.ndarray:
    """[N, K] codes 0..15 -> [N, kp/2] bytes in the block layout; padding gets pad_code (per row allowed)."""
    n, k = codes.shape
    full = np.empty((n, kp), dtype=np.uint8)
    full[:, :k] = codes
    full[:, k:] = np.asarray(pad_code, dtype=np.uint8).reshape(-1, 1) if np.ndim(pad_code) else pad_code
    blocks = full.reshape(n, kp // NIBBLE_BLOCK, 2, NIBBLE_BLOCK // 2)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, kp // 2).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    n, half = packed.shape
    blocks = packed.reshape(n, half // (NIBBLE_BLOCK // 2), NIBBLE_BLOCK // 2)
    return np.stack([blocks & 0x0F, blocks >> 4], axis=2).reshape(n, half * 2)


def int4_codes(q: np.ndarray, zero: int = INT4_ZERO) -> np.ndarray:
    """Integer weights q (zero-point form q in [-zero, 15 - zero]) as 4-bit codes."""
    codes = q.astype(np.int64) + zero
    if codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
        raise ValueError("int4 weights out of range for their zero point")
    return codes.astype(np.uint8)


def shift_codes(values: np.ndarray) -> np.ndarray:
    """Integer weights in {0, +-2^e, e <= 6} as shift codes."""
    v = values.astype(np.int64)
    mag = np.abs(v)
    if np.any((mag != 0) & ((mag & (mag - 1)) != 0)) or mag.max(initial=0) > 2 ** SHIFT_MAX_EXPONENT:
        raise ValueError("shift weights must be 0 or +-2^e with e <= 6")
    exponent = np.where(mag == 0, SHIFT_ZERO_CODE, np.log2(np.maximum(mag, 1)).round().astype(np.int64))
    return (exponent | np.where(v < 0, 8, 0)).astype(np.uint8)


def pack_signs(w: np.ndarray) -> np.ndarray:
    """[N, K] float -> [N, ceil(K/64)] uint64 sign words (1 = negative)."""
    n, k = w.shape
    words = -(-k // BINARY_WORD)
    bits = np.zeros((n, words * BINARY_WORD), dtype=np.uint8)
    bits[:, :k] = w < 0
    return np.packbits(bits.reshape(n, words, 8, 8)[:, :, ::-1, ::-1].reshape(n, words, 64), axis=2,
                       bitorder="big").view(">u8").astype(np.uint64).reshape(n, words)


# --------------------------------------------------------------------------- activation quantization

def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row as the kernels do it: scale = max|x| / 127, q = round-half-even(x / scale)."""
    x = x.astype(np.float32)
    amax = np.abs(x).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int32)
    return q, scale


def _int8_view(q: np.ndarray, zero: int, dtype) -> tuple[np.ndarray, int]:
    """uint8 values and zero point shifted into int8, as the kernels see them."""
    if np.dtype(dtype) == np.uint8:
        return q.astype(np.int32) - 128, int(zero) - 128
    return q.astype(np.int32), int(zero)


# --------------------------------------------------------------------------- references

def nibble_gemm_reference(q: np.ndarray, x_scale: np.ndarray, x_zero: np.ndarray, codes: np.ndarray,
                          decoded_zero: np.ndarray, w_scale: np.ndarray, group: int, lut: np.ndarray | None,
                          bias: np.ndarray | None) -> np.ndarray:
    """q [M, K] int (int8 range), codes [N, K]; decoded_zero, w_scale [N, G]. Returns float32 [M, N]."""
    m, k = q.shape
    decoded = codes.astype(np.int64) if lut is None else lut.astype(np.int64)[codes]
    groups = w_scale.shape[1]
    acc = np.zeros((m, codes.shape[0]), dtype=np.float32)
    for g in range(groups):
        sl = slice(g * group, min(k, (g + 1) * group))
        xq = q[:, sl].astype(np.int64) - x_zero.astype(np.int64)[:, None]
        wq = decoded[:, sl] - decoded_zero[:, g : g + 1].astype(np.int64)
        exact = (xq @ wq.T).astype(np.int32)
        acc = acc + exact.astype(np.float32) * w_scale[:, g].astype(np.float32)[None, :]
    y = acc * x_scale.astype(np.float32)[:, None]
    return (y + bias.astype(np.float32)[None, :]) if bias is not None else y


def int4_matmul_reference(x: np.ndarray, q_weights: np.ndarray, w_scale: np.ndarray, group_size: int = 0,
                          w_zero: np.ndarray | None = None, bias: np.ndarray | None = None,
                          x_scale: float | None = None, x_zero: int = 0) -> np.ndarray:
    """Int4MatMul: x float [M, K] (quantized per row) or int8/uint8 with x_scale/x_zero; q_weights [N, K]
    integer weights in code form (codes = q + zero)."""
    return _nibble_reference(x, q_weights, w_scale, group_size, w_zero, bias, x_scale, x_zero, lut=None)


def shift_matmul_reference(x: np.ndarray, codes: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None = None,
                           x_scale: float | None = None, x_zero: int = 0) -> np.ndarray:
    lut = (shift_values() + 64).astype(np.int64)
    zero = np.full((codes.shape[0], 1), 64)
    return _nibble_reference(x, codes, w_scale, 0, zero, bias, x_scale, x_zero, lut=lut)


def _nibble_reference(x, codes, w_scale, group_size, w_zero, bias, x_scale, x_zero, lut):
    n, k = codes.shape
    kp = padded_k(k, group_size)
    group = group_size if group_size > 0 else kp
    w_scale = np.asarray(w_scale, dtype=np.float32).reshape(n, -1)
    decoded_zero = (np.full(w_scale.shape, INT4_ZERO) if w_zero is None else np.asarray(w_zero).reshape(n, -1))
    if x.dtype == np.float32:
        q, scale = quantize_rows(x)
        zero = np.zeros(x.shape[0], dtype=np.int64)
    else:
        q, z = _int8_view(x, x_zero, x.dtype)
        scale = np.full(x.shape[0], x_scale, dtype=np.float32)
        zero = np.full(x.shape[0], z, dtype=np.int64)
    return nibble_gemm_reference(q, scale, zero, codes, decoded_zero, w_scale, group, lut, bias)


def binary_rows(x: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signs (+1/-1, 0 where padded), real-element counts and mean |x|: |x| summed in 8 lanes
    (element i into lane i % 8, each lane in order), then the lanes in order, all in float32."""
    valid = np.ones(x.shape, dtype=bool) if valid is None else valid.astype(bool)
    signs = np.where(x < 0, -1, 1) * valid
    count = valid.sum(axis=1).astype(np.int32)
    rows, k = x.shape
    padded = np.zeros((rows, -(-k // 8) * 8), dtype=np.float32)
    padded[:, :k] = np.where(valid, np.abs(x), 0)
    lanes = np.cumsum(padded.reshape(rows, -1, 8), axis=1, dtype=np.float32)[:, -1, :]
    total = np.cumsum(lanes, axis=1, dtype=np.float32)[:, -1]
    scale = np.where(count > 0, total / np.maximum(count, 1).astype(np.float32), np.float32(0)).astype(np.float32)
    return signs, count, scale


def binary_gemm_reference(x: np.ndarray, w: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None = None,
                          valid: np.ndarray | None = None) -> np.ndarray:
    """BinaryGemm: x float [M, K] binarized per row (mean |x| scale), w [N, K] float whose signs are used."""
    signs, _, scale = binary_rows(x.astype(np.float32), valid)
    w_signs = np.where(w < 0, -1, 1)
    dot = (signs.astype(np.int64) @ w_signs.T.astype(np.int64)).astype(np.float32)
    y = (dot * scale[:, None]) * np.asarray(w_scale, dtype=np.float32)[None, :]
    return (y + bias.astype(np.float32)[None, :]) if bias is not None else y


def im2col(x: np.ndarray, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
           pad_value=0) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One image [C, H, W] -> rows [OH*OW, C*kh*kw] ordered (c, kh, kw), a validity mask, and (OH, OW)."""
    c, h, w = x.shape
    kh, kw = kernel
    top, left, bottom, right = pads
    oh = (h + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    padded = np.full((c, h + top + bottom, w + left + right), pad_value, dtype=x.dtype)
    padded[:, top : top + h, left : left + w] = x
    mask = np.zeros(padded.shape[1:], dtype=bool)
    mask[top : top + h, left : left + w] = True
    rows, valid = [], []
    for i in range(kh):
        for j in range(kw):
            ys = i * dilations[0] + strides[0] * np.arange(oh)
            xs = j * dilations[1] + strides[1] * np.arange(ow)
            rows.append(padded[:, ys][:, :, xs].reshape(c, -1))
            valid.append(np.broadcast_to(mask[ys][:, xs].reshape(1, -1), (c, oh * ow)))
    cols = np.stack(rows, axis=1).reshape(c * kh * kw, oh * ow).T
    ok = np.stack(valid, axis=1).reshape(c * kh * kw, oh * ow).T
    return np.ascontiguousarray(cols), np.ascontiguousarray(ok), (oh, ow)


def conv_reference(x: np.ndarray, gemm, n: int, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                   group: int = 1, pad_value=0, masked: bool = False) -> np.ndarray:
    """A conv as per-image, per-group GEMMs over im2col rows: gemm(rows, valid, out_slice) -> [P, n/group]."""
    b, c = x.shape[:2]
    cg, ng = c // group, n // group
    outs = []
    for image in x:
        per_group = []
        for g in range(group):
            rows, valid, (oh, ow) = im2col(image[g * cg : (g + 1) * cg], kernel, strides, pads, dilations, pad_value)
            per_group.append(gemm(rows, valid if masked else None, slice(g * ng, (g + 1) * ng)).T.reshape(ng, oh, ow))
        outs.append(np.concatenate(per_group, axis=0))
    return np.stack(outs).astype(np.float32)


# --------------------------------------------------------------------------- one-operator models

NIBBLE_INPUTS = ("X", "W", "W_scale", "W_zero_point", "X_scale", "X_zero_point", "Bias")
BINARY_INPUTS = ("X", "W", "W_scale", "Bias")


def single_op_model(op_type: str, x_shape, x_dtype, constants: dict[str, np.ndarray], **attributes):
    """A model of one ptqcli operator: input X, the named constants as initializers, output Y."""
    from onnx import TensorProto, helper, numpy_helper

    names = BINARY_INPUTS if op_type.startswith("Binary") else NIBBLE_INPUTS
    unknown = set(constants) - set(names[1:])
    if unknown:
        raise ValueError(f"{op_type} has no inputs {sorted(unknown)}")
    inputs = [n if n == "X" or n in constants else "" for n in names]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(op_type, inputs, ["Y"], domain="ptqcli", **attributes)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    graph = helper.make_graph(
        [node], op_type, [helper.make_tensor_value_info("X", elem, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ptqcli", 1)])
