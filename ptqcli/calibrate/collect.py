"""One ONNX Runtime pass over the calibration data that feeds every activation observer at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import DataConfig
from ..errors import PtqError
from ..graph import Graph, load_model
from ..parallel import Workers, run_all
from ..runtime import feeds_for, run_session, session
from .data import Batch, InputSpec, bounded_runs, iter_batches, rows_within
from .observers import Histogram

Stats = dict[str, Histogram]


def collect(g: Graph, tensors: list[str], batches: Iterable[Batch], bins: int,
            advance: Callable[[int], None] = lambda n: None, histograms: bool = True,
            channel_axes: dict[str, int] | None = None, partials: bool = False) -> tuple[Stats, int]:
    """Histograms for `tensors` over all batches; returns them and the number of samples seen.

    The augmented session emits every requested tensor per run; each is folded into its
    histogram and dropped, so memory holds the activations of two runs at most, each within
    RUN_BYTES (a batch is cut into runs of fewer samples where its activations would take more).
    `histograms=False` keeps only min/max, for methods that need nothing more.
    `channel_axes` asks for per-channel means too ({tensor: channel axis}); such tensors are
    observed even when they are not in `tensors`; `partials` keeps each run's channel sums (a shard's,
    see collect_shards).
    """
    channel_axes = channel_axes or {}
    tensors = list(tensors) + [t for t in channel_axes if t not in tensors]
    stats = {name: Histogram.empty(bins, partials) for name in tensors}
    sess = session(g.model, outputs=tensors) if tensors else None
    seen = 0
    for batch, values in stream(sess, tensors, batches):
        for name, value in zip(tensors, values):
            stats[name].update(value, counts=histograms)
            if name in channel_axes:
                stats[name].update_channels(value, channel_axes[name])
        del values
        seen += batch.size
        advance(batch.size)
    if seen == 0:
        raise PtqError("the calibration data holds no samples")
    return stats, seen


def stream(sess, tensors: list[str], batches: Iterable[Batch], overlap: bool = True
           ) -> Iterator[tuple[Batch, list[np.ndarray]]]:
    """(run, the session's values of `tensors`) over the batches, cut into runs whose outputs stay
    within RUN_BYTES. With `overlap`, ORT computes run i+1 in a worker thread (it releases the GIL)
    while the caller folds run i into its statistics: the two costs overlap instead of adding up,
    for the memory of two runs' outputs. A None session yields every run with no values."""

    def run(batch: Batch) -> list[np.ndarray]:
        return [] if sess is None else run_session(sess, tensors, feeds_for(sess, batch.feeds))

    rows = None  # samples per run, once the first run's outputs tell
    source = bounded_runs(batches, lambda: rows)
    with ThreadPoolExecutor(max_workers=1) as pool:
        batch = next(source, None)
        future = pool.submit(run, batch) if batch is not None else None
        while future is not None:
            values = future.result()
            if rows is None:
                rows = rows_within(values, batch.size)
            following = next(source, None)
            if overlap:
                future = pool.submit(run, following) if following is not None else None
            yield batch, values
            del values
            if not overlap:
                future = pool.submit(run, following) if following is not None else None
            batch = following


@dataclass(frozen=True)
class Shard:
    """Samples [start, start + count) of the calibration data, observed by one task."""

    model: str  # the prepared float model, as the run directory holds it
    tensors: list[str]
    data: DataConfig
    inputs: list[InputSpec]
    bins: int
    histograms: bool
    channel_axes: dict[str, int]
    start: int
    count: int


def collect_shards(shards: list[Shard], workers: Workers, advance: Callable[[int], None] = lambda n: None
                   ) -> tuple[Stats, int]:
    """collect() over each shard as a task (parallel.run_all), merged in shard order: with shards
    that cut the data at batch boundaries, the statistics of one pass, bit for bit (histograms merge
    exactly; channel sums are re-added run by run)."""
    parts = run_all(_collect_shard, shards, workers, lambda n: advance(0))
    stats, seen = parts[0]
    for part, count in parts[1:]:
        stats = {name: h.merged(part[name]) for name, h in stats.items()}
        seen += count
    advance(seen)
    return {name: replace(h, partials=None) for name, h in stats.items()}, seen


def _collect_shard(shard: Shard) -> tuple[Stats, int]:
    g = Graph(load_model(shard.model))
    batches = iter_batches(shard.data.path, shard.inputs, shard.data, limit=shard.count, skip=shard.start, model=g.model)
    return collect(g, shard.tensors, batches, shard.bins, histograms=shard.histograms,
                   channel_axes=shard.channel_axes, partials=True)


def shard_bounds(total: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """(start, count) of up to `shards` runs of whole batches over `total` samples."""
    batches = -(-total // batch_size)
    shards = max(1, min(shards, batches))
    cuts = [i * batches // shards * batch_size for i in range(shards + 1)]
    return [(lo, min(hi, total) - lo) for lo, hi in zip(cuts, cuts[1:]) if min(hi, total) > lo]


def save_stats(stats: Stats) -> dict[str, np.ndarray]:
    """Arrays for an .npz: one counts and one meta array per tensor, keyed by position."""
    arrays: dict[str, np.ndarray] = {"names": np.array(list(stats), dtype=object).astype(str)}
    for i, h in enumerate(stats.values()):
        for key, value in h.to_arrays().items():
            arrays[f"{i}_{key}"] = value
    return arrays


def load_stats(arrays) -> Stats:
    names = [str(n) for n in arrays["names"]]
    files = set(arrays.files) if hasattr(arrays, "files") else set(arrays)
    return {name: Histogram.from_arrays(arrays[f"{i}_counts"], arrays[f"{i}_meta"],
                                        arrays[f"{i}_chsum"] if f"{i}_chsum" in files else None)
            for i, name in enumerate(names)}
