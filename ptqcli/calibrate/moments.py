"""Per-channel extremes and second moments of activations, from one pass over the calibration data.

Smoothing needs each normalized activation's per-channel extremes, and (for weight-only plans) the
Gram matrix X^T X that turns a GEMM's output error into a quadratic form in its weight error.

The pass runs the model truncated to the tensors asked for (a language model's logits are never
computed), in runs within RUN_BYTES; Gram matrices are float32 sums of float32 products, which
is as exact as GPTQ's dampening needs and half the memory of float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import PtqError
from ..graph import Graph, shell
from ..runtime import session_with_weights, truncated
from .collect import stream
from .data import Batch


@dataclass(frozen=True)
class ChannelMoments:
    """What the pass saw of one activation, per channel (its last axis unless channel_moments was
    told otherwise)."""

    absmax: np.ndarray  # per channel, over every sample
    lo: np.ndarray  # per-channel minimum and maximum
    hi: np.ndarray
    gram: np.ndarray | None = None  # [K, K] X^T X over every row seen, when asked for
    rows: np.ndarray | None = None  # [R, K] the rows of the first samples, when asked for



# Sample rows kept per sample and tensor, at most (evenly strided beyond): a sentence has a few
# hundred, a CNN's feature map (channels not last) 10^5 pixels, of which a sample of a few hundred
# describes the channels' spread well enough.
ROWS_PER_SAMPLE = 1024
PIXELS_PER_SAMPLE = 256


def channel_moments(g: Graph, tensors: list[str], batches: Iterable[Batch], grams: set[str] = frozenset(),
                    rows_of: set[str] = frozenset(), row_samples: int = 0,
                    advance: Callable[[int], None] = lambda n: None,
                    channel_axes: dict[str, int] | None = None) -> tuple[dict[str, ChannelMoments], int]:
    """Per-channel extremes of `tensors` over all batches, Gram matrices of those in `grams` (which
    need not be in `tensors`), the rows of the first `row_samples` samples of those in `rows_of`
    (evenly strided beyond ROWS_PER_SAMPLE, or PIXELS_PER_SAMPLE, a sample); and the samples seen.
    Channels are each tensor's last axis, or the one `channel_axes` names."""
    channel_axes = channel_axes or {}
    outputs = list(dict.fromkeys([*tensors, *rows_of, *grams]))
    sess = session_with_weights(truncated(shell(g.model), outputs), g.model, spinning=False)
    absmax: dict[str, np.ndarray] = {}
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {t: [] for t in rows_of}
    seen = 0
    # Gram outputs are as large for one sample as for many, and folding them in is quick next to
    # computing them: runs do not overlap, so only one run's outputs are ever held.
    for batch, values in stream(sess, outputs, batches, overlap=False):
        for name, value in zip(outputs, values):
            if name in channel_axes:
                value = np.moveaxis(value, channel_axes[name], -1)
            if name in grams:
                _accumulate(sums, name, gram(value))
            if name not in tensors and name not in rows_of:
                continue
            flat = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            absmax[name] = np.maximum(absmax.get(name, 0.0), np.abs(flat).max(axis=0))
            lo[name] = np.minimum(lo.get(name, np.inf), flat.min(axis=0))
            hi[name] = np.maximum(hi.get(name, -np.inf), flat.max(axis=0))
            if name in rows and seen < row_samples:
                keep = min(batch.size, row_samples - seen)
                kept = value[:keep].reshape(-1, value.shape[-1])
                cap = PIXELS_PER_SAMPLE if name in channel_axes else ROWS_PER_SAMPLE
                step = max(1, -(-len(kept) // (cap * keep)))
                rows[name].append(kept[::step].astype(np.float32))
        del values  # before the next run is computed
        seen += batch.size
        advance(batch.size)
    if seen == 0:
        raise PtqError("the calibration data holds no samples")
    empty = np.zeros(0, np.float32)
    return {t: ChannelMoments(absmax.get(t, empty), lo.get(t, empty), hi.get(t, empty), sums.get(t),
                              np.concatenate(rows[t]) if rows.get(t) else None)
            for t in outputs}, seen


def gram(value: np.ndarray) -> np.ndarray:
    """X^T X of a tensor's rows along its last axis, in float32. Written as rows.T @ rows, which
    numpy hands to BLAS's symmetric rank-k update: half the work of a general product (and 2.7x
    faster than ORT's Gemm on a [4096, 1536] input, with the session's threads not spinning)."""
    rows = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
    return rows.T @ rows


def _accumulate(sums: dict[str, np.ndarray], name: str, update: np.ndarray) -> None:
    if name in sums:
        np.add(sums[name], update, out=sums[name])
    else:
        sums[name] = np.array(update, dtype=np.float32)
