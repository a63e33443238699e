"""Per-channel extremes and second moments of activations, from one pass over the calibration data.

Smoothing needs each normalized activation's per-channel extremes, and (for weight-only plans) the
Gram matrix X^T X that turns a GEMM's output error into a quadratic form in its weight error; GPTQ
needs the same Gram matrix of every layer input. One pass serves both: a language model's forward
pass is the expensive part, and smoothing changes the Gram matrices only by its own per-channel
factors (`ChannelMoments.divided`), so nothing is measured twice.

The pass runs the model truncated to the tensors asked for (a language model's logits are never
computed), in runs within RUN_BYTES; Gram matrices are float32 sums of float32 products, which
is as exact as GPTQ's dampening needs and half the memory of float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from onnx import ModelProto, TensorProto, helper

from ..errors import PtqError
from ..graph import Graph, shell
from ..runtime import session_with_weights, truncated
from .collect import stream
from .data import Batch


@dataclass(frozen=True)
class ChannelMoments:
    """What the pass saw of one activation, channels on its last axis."""

    absmax: np.ndarray  # per channel, over every sample
    lo: np.ndarray  # per-channel minimum and maximum
    hi: np.ndarray
    gram: np.ndarray | None = None  # [K, K] X^T X over every row seen, when asked for
    rows: np.ndarray | None = None  # [R, K] the rows of the first samples, when asked for

    def divided(self, s: np.ndarray) -> ChannelMoments:
        """The moments of X / s (s > 0 per channel): what a smoothed activation would have shown."""
        s64 = s.astype(np.float64)
        gram = None if self.gram is None else (self.gram / np.outer(s64, s64)).astype(self.gram.dtype)
        rows = None if self.rows is None else self.rows / s
        return ChannelMoments(self.absmax / s, self.lo / s, self.hi / s, gram, rows)


def channel_moments(g: Graph, tensors: list[str], batches: Iterable[Batch], grams: set[str] = frozenset(),
                    rows_of: set[str] = frozenset(), row_samples: int = 0,
                    advance: Callable[[int], None] = lambda n: None) -> tuple[dict[str, ChannelMoments], int]:
    """Per-channel extremes of `tensors` over all batches, Gram matrices of those in `grams` (which
    need not be in `tensors`), the rows of the first `row_samples` samples of those in `rows_of`;
    and the samples seen. Gram matrices are computed inside the session (`_gram_model`): ORT's GEMM
    beats numpy's running next to ORT's own threads, and a tensor wanted for its Gram matrix alone
    never leaves the session. Only a tensor of unknown rank is reduced here."""
    shapes = g.value_shapes
    in_session = [t for t in dict.fromkeys(grams) if len(shapes.get(t) or ()) >= 2]
    raw = list(dict.fromkeys([*tensors, *rows_of, *(t for t in grams if t not in in_session)]))
    model, outputs = _gram_model(g, raw, {t: len(shapes[t]) for t in in_session})
    sess = session_with_weights(model, g.model)
    absmax: dict[str, np.ndarray] = {}
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    gram: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {t: [] for t in rows_of}
    seen = 0
    # Gram outputs are as large for one sample as for many, and folding them in is quick next to
    # computing them: runs do not overlap, so only one run's outputs are ever held.
    for batch, values in stream(sess, outputs, batches, overlap=False):
        for name, value in zip(outputs, values):
            if name.endswith(GRAM_SUFFIX):
                _accumulate(gram, name[: -len(GRAM_SUFFIX)], value)
                continue
            flat = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            absmax[name] = np.maximum(absmax.get(name, 0.0), np.abs(flat).max(axis=0))
            lo[name] = np.minimum(lo.get(name, np.inf), flat.min(axis=0))
            hi[name] = np.maximum(hi.get(name, -np.inf), flat.max(axis=0))
            if name in grams and name not in in_session:
                _accumulate(gram, name, flat.T @ flat)
            if name in rows and seen < row_samples:
                keep = min(batch.size, row_samples - seen)
                rows[name].append(value[:keep].reshape(-1, value.shape[-1]).astype(np.float32))
        del values  # before the next run is computed
        seen += batch.size
        advance(batch.size)
    if seen == 0:
        raise PtqError("the calibration data holds no samples")
    empty = np.zeros(0, np.float32)
    return {t: ChannelMoments(absmax.get(t, empty), lo.get(t, empty), hi.get(t, empty), gram.get(t),
                              np.concatenate(rows[t]) if rows.get(t) else None)
            for t in dict.fromkeys([*raw, *in_session])}, seen


GRAM_SUFFIX = "__gram"


def _accumulate(sums: dict[str, np.ndarray], name: str, update: np.ndarray) -> None:
    if name in sums:
        np.add(sums[name], update, out=sums[name])
    else:
        sums[name] = np.array(update, dtype=np.float32)


def _gram_model(g: Graph, raw: list[str], ranks: dict[str, int]) -> tuple[ModelProto, list[str]]:
    """The model's weightless shell truncated to what is asked: `raw` tensors as outputs, and for each tensor in
    `ranks` its Gram matrix X^T X ([K, K], X flattened to rows of its last axis) as `<name>__gram`."""
    model = truncated(shell(g.model), list(dict.fromkeys([*raw, *ranks])))
    del model.graph.output[:]
    outputs = list(raw)
    for name, rank in ranks.items():
        flat, gram = f"{name}__rows", f"{name}{GRAM_SUFFIX}"
        model.graph.node.extend([
            helper.make_node("Flatten", [name], [flat], name=flat, axis=rank - 1),
            helper.make_node("Gemm", [flat, flat], [gram], name=gram, transA=1),
        ])
        outputs.append(gram)
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs)
    return model, outputs
