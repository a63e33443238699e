"""Sliding-window geometry shared by convolutions and pooling, for any number of spatial axes.

Spatial axes are always the trailing ones. A window of ``kernel`` taps with ``dilations`` spans
``(k - 1) * d + 1`` input positions; windows start every ``strides`` positions of the padded
input.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class Window:
    """Where the windows of one conv or pool node fall on its (padded) input."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]  # padding before each spatial axis
    end: tuple[int, ...]  # padding after each spatial axis
    out: tuple[int, ...]  # number of windows along each spatial axis

    @property
    def span(self) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def padded(self, sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple(n + b + e for n, b, e in zip(sizes, self.begin, self.end))


def spatial_attrs(attrs, nd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations, defaulting to ones."""
    strides = tuple(attrs.get("strides") or (1,) * nd)
    dilations = tuple(attrs.get("dilations") or (1,) * nd)
    return strides, dilations


def same_pads(sizes, kernel, strides, dilations, auto_pad: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """SAME_UPPER/SAME_LOWER padding: ceil(size / stride) windows, the odd pad at the end or start."""
    begin, end = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return tuple(begin), tuple(end)


def explicit_pads(attrs, sizes, kernel, strides, dilations) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(begin, end) padding per spatial axis from ``auto_pad`` and ``pads``, as ONNX Conv defines it."""
    nd = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(sizes, kernel, strides, dilations, auto_pad)
    if auto_pad == "VALID":
        return (0,) * nd, (0,) * nd
    pads = tuple(attrs.get("pads") or (0,) * (2 * nd))
    return pads[:nd], pads[nd:]


def count_windows(padded: int, span: int, stride: int, ceil_mode: bool = False) -> int:
    """Windows along one axis; with ``ceil_mode`` a last partial window counts when it starts
    inside the input or its leading padding (it may overhang the end)."""
    if ceil_mode:
        return math.ceil((padded - span) / stride) + 1
    return (padded - span) // stride + 1


def conv_window(attrs, sizes: Sequence[int], kernel: Sequence[int]) -> Window:
    """The window layout of a Conv node over spatial ``sizes``."""
    kernel = tuple(kernel)
    strides, dilations = spatial_attrs(attrs, len(sizes))
    begin, end = explicit_pads(attrs, sizes, kernel, strides, dilations)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    out = tuple(count_windows(n + b + e, sp, s) for n, b, e, sp, s in zip(sizes, begin, end, spans, strides))
    return Window(kernel, strides, dilations, begin, end, out)


def pad_spatial(x: np.ndarray, begin: Sequence[int], end: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Pad the trailing ``len(begin)`` axes; returns ``x`` itself when there is nothing to pad."""
    if not any(begin) and not any(end):
        return x
    lead = [(0, 0)] * (x.ndim - len(begin))
    return np.pad(x, lead + list(zip(begin, end)), constant_values=value)


def crop_spatial(x: np.ndarray, begin: Sequence[int], end: Sequence[int]) -> np.ndarray:
    """Undo :func:`pad_spatial` (a view)."""
    if not any(begin) and not any(end):
        return x
    nd = len(begin)
    sizes = x.shape[-nd:]
    return x[(Ellipsis,) + tuple(slice(b, n - e) for b, e, n in zip(begin, end, sizes))]


def im2col(xp: np.ndarray, win: Window) -> np.ndarray:
    """Every window of the padded input, as a view shaped (..., *win.out, *win.kernel): no copy."""
    nd = len(win.kernel)
    views = sliding_window_view(xp, win.span, axis=tuple(range(xp.ndim - nd, xp.ndim)))
    # Windows start every stride; taps within a window are every dilation apart.
    picks = tuple(slice(0, o * s, s) for o, s in zip(win.out, win.strides))
    taps = tuple(slice(None, None, d) for d in win.dilations)
    return views[(Ellipsis,) + picks + taps]


def tap_slices(win: Window) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """For each kernel tap, the slice of the padded input that the tap reads across all windows.

    Looping over taps (a handful) instead of over windows keeps every step vectorised.
    """
    for offsets in itertools.product(*(range(k) for k in win.kernel)):
        index = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, s, n in zip(offsets, win.dilations, win.strides, win.out)
        )
        yield offsets, (Ellipsis,) + index


def col2im(cols: np.ndarray, padded: Sequence[int], win: Window) -> np.ndarray:
    """Adjoint of :func:`im2col`: add each window's values back where they were read from.

    ``cols`` is shaped (..., *win.out, *win.kernel) and may be any strided or broadcast view.
    """
    nd = len(win.kernel)
    lead = cols.shape[: cols.ndim - 2 * nd]
    out = np.zeros(lead + tuple(padded), dtype=cols.dtype)
    for offsets, index in tap_slices(win):
        out[index] += cols[(Ellipsis,) + offsets]
    return out
