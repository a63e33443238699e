"""The one table of numpy operators, and calls of a single op by name."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import PtqError
from ..ops import node_attrs  # noqa: F401  (re-exported: numeric callers read attributes here)
from . import conv, layout, linear, pointwise, pool
from .core import OpImpl

REGISTRY: dict[str, OpImpl] = {**conv.OPS, **linear.OPS, **pointwise.OPS, **pool.OPS, **layout.OPS}


def op_impl(op_type: str, domain: str = "") -> OpImpl | None:
    """The implementation of a standard-domain op, or None when there is none."""
    if domain not in ("", "ai.onnx"):
        return None
    return REGISTRY.get(op_type)


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
