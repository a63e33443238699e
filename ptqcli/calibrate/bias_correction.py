"""Empirical bias correction (Nagel et al., "Data-free quantization through weight equalization
and bias correction", 2019): quantizing W shifts each output channel's mean by (W - Q(W)) E[x];
adding that shift to the bias removes it. E[x] is each input channel's mean over the
calibration data, gathered in the calibration pass.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from ..ops import groups, op_info


def output_shift(node: NodeProto, w: np.ndarray, w_quantized: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """(W - Q(W)) E[x] per output channel, or None when the op or shapes do not allow it.

    Zero padding makes border outputs see fewer inputs; the shift is exact away from borders.
    """
    return output_mean(node, w.astype(np.float64) - w_quantized.astype(np.float64), input_mean)


def prefix_shift(node: NodeProto, w: np.ndarray, w_quantized: np.ndarray, float_mean: np.ndarray,
                 quantized_mean: np.ndarray) -> np.ndarray | None:
    """W E[x] - Q(W) E[x_q] per output channel: the mean shift of a layer whose input comes from the
    already-quantized prefix (mean E[x_q]) rather than the float model (E[x]), so the correction
    also removes the mean error the layers before it left."""
    want, got = output_mean(node, w, float_mean), output_mean(node, w_quantized, quantized_mean)
    return None if want is None or got is None else want - got


def output_mean(node: NodeProto, w: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """W E[x] per output channel (a convolution's kernel taps summed), or None when the op or
    shapes do not allow it."""
    info = op_info(node.op_type, node.domain)
    if info is None or info.weight_in_axis is None:
        return None
    out_axis, in_axis = info.channel_axis(node) % w.ndim, info.weight_in_axis(node) % w.ndim
    taps = np.moveaxis(w.astype(np.float64), (out_axis, in_axis), (0, 1))
    taps = taps.reshape(taps.shape[0], taps.shape[1], -1).sum(axis=2)  # [Cout, Cin per group]
    n_groups, (c_out, c_in) = groups(node), taps.shape
    if input_mean.size != n_groups * c_in or c_out % n_groups:
        return None
    means = input_mean.reshape(n_groups, c_in)[np.arange(c_out) // (c_out // n_groups)]
    return (taps * means).sum(axis=1)
