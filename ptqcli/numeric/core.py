"""The contract every numpy reference operator follows, and the small helpers they share.

An operator is a pair of functions held in an :class:`OpImpl`:

``forward(inputs, attrs, wants) -> (outputs, ctx)``
    ``inputs`` follows the node's input slots (None for an omitted optional input) and ``attrs``
    its attributes as plain Python values. ``wants[i]`` says whether the cotangent of input ``i``
    will be asked for later: ``ctx`` keeps only what those cotangents need, so a pass that wants
    no gradient keeps nothing, and one that wants only the data gradient of a Conv keeps its weight
    but not its input activation.
``vjp(ctx, g, wants) -> cotangents``
    ``g`` is the cotangent of output 0 (the only output that carries one); the result has one
    entry per input slot, the cotangent where ``wants`` asks for it and None elsewhere.

Operators never modify their inputs in place: the executor hands the same array to several
consumers, and views (Reshape, Identity) share memory with their input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import PtqError

Inputs = Sequence["np.ndarray | None"]
Wants = Sequence[bool]
Attrs = Mapping[str, Any]
ForwardFn = Callable[[Inputs, Attrs, Wants], "tuple[tuple[np.ndarray, ...], Any]"]
VjpFn = Callable[[Any, np.ndarray, Wants], "tuple[np.ndarray | None, ...]"]


@dataclass(frozen=True)
class OpImpl:
    """One op type: its forward, its vector-Jacobian product and which inputs can take a cotangent.

    ``grad_inputs`` lists the slots that can carry a cotangent (None: every slot, for variadic
    ops); integer inputs such as shapes or pads never do. ``n_outputs`` is how many outputs the
    forward produces; a node asking for more (MaxPool's Indices) is refused.
    """

    forward: ForwardFn
    vjp: VjpFn | None = None
    grad_inputs: tuple[int, ...] | None = (0,)
    n_outputs: int = 1

    def can_grad(self, slot: int) -> bool:
        return self.vjp is not None and (self.grad_inputs is None or slot in self.grad_inputs)


def unsupported(op_type: str, what: str) -> PtqError:
    """The one-line error for an attribute value or input the numpy operators do not implement."""
    return PtqError(f"numpy {op_type}: {what} is not supported")


def wanted(wants: Wants, slot: int) -> bool:
    """``wants[slot]``, False for slots past the end (omitted optional inputs)."""
    return slot < len(wants) and bool(wants[slot])


def slot(inputs: Inputs, index: int) -> np.ndarray | None:
    """Input ``index``, or None when the node omits it (absent or empty name)."""
    return inputs[index] if index < len(inputs) else None


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a broadcast result's cotangent back down to the shape of the operand that was broadcast."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, (n, m) in enumerate(zip(shape, g.shape)) if n == 1 and m != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g.reshape(shape)


def channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast against an (N, C, ...) tensor of rank ``ndim``."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


def non_channel_axes(ndim: int) -> tuple[int, ...]:
    """Every axis of an (N, C, ...) tensor except the channel axis."""
    return (0,) + tuple(range(2, ndim))


def normalize_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis
