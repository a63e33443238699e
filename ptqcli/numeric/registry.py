"""The one table of numpy operators, and calls of a single op by name."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..errors import PtqError
from . import conv, layout, linear, pointwise, pool
from .core import OpImpl

REGISTRY: dict[str, OpImpl] = {**conv.OPS, **linear.OPS, **pointwise.OPS, **pool.OPS, **layout.OPS}


def op_impl(op_type: str, domain: str = "") -> OpImpl | None:
    """The implementation of a standard-domain op, or None when there is none."""
    if domain not in ("", "ai.onnx"):
        return None
    return REGISTRY.get(op_type)


def _plain(value: Any) -> Any:
    """An attribute value as numpy/Python data: strings decoded, tensors as arrays."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def node_attrs(node: NodeProto) -> dict[str, Any]:
    return {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}


def _impl(op_type: str) -> OpImpl:
    impl = REGISTRY.get(op_type)
    if impl is None:
        raise PtqError(f"no numpy implementation of {op_type}")
    return impl


def forward(op_type: str, inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any] | None = None
            ) -> tuple[np.ndarray, ...]:
    """Run one op on arrays: ``forward("Conv", [x, w, b], {"pads": [1, 1, 1, 1]})``."""
    outputs, _ = _impl(op_type).forward(list(inputs), dict(attrs or {}), (False,) * len(inputs))
    return outputs


def vjp(op_type: str, inputs: Sequence[np.ndarray | None], attrs: Mapping[str, Any] | None,
        cotangent: np.ndarray, wants: Sequence[bool] | None = None
        ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
    """Outputs of one op and the cotangent of each input given the cotangent of output 0.

    ``wants`` (default: every input that can take one) limits which cotangents are computed;
    the others come back as None.
    """
    impl = _impl(op_type)
    if wants is None:
        wants = [x is not None and impl.can_grad(i) for i, x in enumerate(inputs)]
    wants = tuple(bool(w) and impl.can_grad(i) for i, w in enumerate(wants))
    outputs, ctx = impl.forward(list(inputs), dict(attrs or {}), wants)
    if not any(wants):
        return outputs, (None,) * len(inputs)
    grads = tuple(impl.vjp(ctx, np.asarray(cotangent), wants))
    return outputs, grads + (None,) * (len(inputs) - len(grads))
