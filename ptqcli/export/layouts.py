"""Weighted ops as [N, K] weight rows: how each op's weight is laid out, which variants the
low-bit kernels (and binary inputs) take, and the attributes a kernel needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import NodeProto

from ..numeric.registry import node_attrs


def get_attr(node: NodeProto, name: str, default):
    return node_attrs(node).get(name, default)


@dataclass(frozen=True)
class Layout:
    """How a float op's weight becomes [N, K] and which custom-op suffix runs it."""

    suffix: str
    to_rows: Callable[[np.ndarray, NodeProto], np.ndarray]
    supported: Callable[[NodeProto, np.ndarray], str | None]  # None when supported, else why not
    attributes: Callable[[NodeProto, np.ndarray], dict]


def _conv_rows(w: np.ndarray, node: NodeProto) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def _conv_supported(node: NodeProto, w: np.ndarray) -> str | None:
    if w.ndim != 4:
        return "only 2-D convolutions have native kernels"
    if get_attr(node, "auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad is not supported natively"
    return None


def _conv_attributes(node: NodeProto, w: np.ndarray) -> dict:
    return {
        "kernel_shape": list(w.shape[2:]),
        "strides": list(get_attr(node, "strides", [1, 1])),
        "pads": list(get_attr(node, "pads", [0, 0, 0, 0])),
        "dilations": list(get_attr(node, "dilations", [1, 1])),
        "group": int(get_attr(node, "group", 1)),
    }


def _gemm_rows(w: np.ndarray, node: NodeProto) -> np.ndarray:
    return w if get_attr(node, "transB", 0) else w.T


def _gemm_supported(node: NodeProto, w: np.ndarray) -> str | None:
    plain = (get_attr(node, "transA", 0) == 0 and get_attr(node, "alpha", 1.0) == 1.0
             and get_attr(node, "beta", 1.0) == 1.0)
    return None if plain and w.ndim == 2 else "only Gemm with transA=0, alpha=beta=1 has a native kernel"


def _matmul_supported(node: NodeProto, w: np.ndarray) -> str | None:
    return None if w.ndim == 2 else "only MatMul by a 2-D weight has a native kernel"


LAYOUTS: dict[str, Layout] = {
    "Conv": Layout("Conv", _conv_rows, _conv_supported, _conv_attributes),
    "Gemm": Layout("Gemm", _gemm_rows, _gemm_supported, lambda node, w: {}),
    "MatMul": Layout("MatMul", lambda w, node: w.T, _matmul_supported, lambda node, w: {}),
}
