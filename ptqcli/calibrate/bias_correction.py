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
    info = op_info(node.op_type, node.domain)
    if info is None or info.weight_in_axis is None:
        return None
    out_axis, in_axis = info.channel_axis(node) % w.ndim, info.weight_in_axis(node) % w.ndim
    error = np.moveaxis((w.astype(np.float64) - w_quantized.astype(np.float64)), (out_axis, in_axis), (0, 1))
    error = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [Cout, Cin per group]
    n_groups, (c_out, c_in) = groups(node), error.shape
    if input_mean.size != n_groups * c_in or c_out % n_groups:
        return None
    means = input_mean.reshape(n_groups, c_in)[np.arange(c_out) // (c_out // n_groups)]
    return (error * means).sum(axis=1)
