"""Layer-wise rounding optimisation: AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", 2020) and AdaQuant (Hubara et al., "Improving post training neural
quantization: layer-wise calibration and integer programming", 2021), in numpy.

Layers are visited in graph order. Each layer's inputs come from the already-quantized prefix
of the model and its target from the float model, both at the same sampled output positions:
    minimise  || W x_float - W~ x_quantized ||^2
The quantized inputs come from one walk of the probe model (weights are graph inputs, see
calibrate/probe.py) in pieces, each layer's rounded weight fed to the pieces after it.
Only sampled patch columns are kept, so memory does not grow with the feature-map size.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .collect import Stats
from .probe import act_gate, gate_feeds, probe_model
from .data import Batch, bounded_runs, rows_within
from ..config import QuantConfig
from ..geometry import per_row, rows_to_weight, sampled_columns, supported, weight_rows
from ..graph import Graph
from ..numeric.optim import adam_init, adam_step
from ..parallel import Workers, run_all
from ..plan import Plan, TensorQuant
from ..runtime import feeds_for, session
from ..formats import code_levels

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound, eq. 23)


@dataclass(frozen=True)
class RoundingConfig:
    method: str = "adaround"  # adaround | adaquant
    iters: int = 1000
    positions: int = 32  # sampled output positions per sample
    batch_columns: int = 2048
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    seed: int = 0


def _minibatches(x_q: np.ndarray, target: np.ndarray, cfg: RoundingConfig, rng: np.random.Generator):
    """(inputs, targets) of `cfg.batch_columns` random columns, one pair per iteration, in float32.

    Columns are gathered from sample-major copies: a random gather along the last axis of a
    (G, K, S) array reads one scattered element at a time, which dominated depthwise layers (G in
    the hundreds). When the caller's arrays are already views of sample-major storage nothing is
    copied.
    """
    xs = np.ascontiguousarray(np.moveaxis(x_q, 2, 0), dtype=np.float32)
    ts = np.ascontiguousarray(np.moveaxis(target, 2, 0), dtype=np.float32)
    columns = xs.shape[0]
    for _ in range(cfg.iters):
        pick = rng.choice(columns, min(cfg.batch_columns, columns), replace=False)
        yield np.moveaxis(xs[pick], 0, 2), np.moveaxis(ts[pick], 0, 2)


# ---- AdaRound -------------------------------------------------------------------------------


def _h(v: np.ndarray) -> np.ndarray:
    return _soft(v)[0]


def _soft(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rectified sigmoid h(V) and its derivative, from one exponential."""
    s = 1 / (1 + np.exp(-v))
    raw = s * (ZETA - GAMMA) + GAMMA
    return np.clip(raw, 0.0, 1.0), s * (1 - s) * (ZETA - GAMMA) * ((raw > 0) & (raw < 1))


def _init_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) equal to the fractional part, so optimisation starts from the float weight."""
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def bracket(r: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid level at or below r (the lowest two levels' lower one below the grid) and the gap to
    the next level up: AdaRound chooses between lo and lo + gap."""
    index = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, len(levels) - 2)
    lo = levels[index]
    return lo, levels[index + 1] - lo


def nearest_level(r: np.ndarray, levels: np.ndarray) -> np.ndarray:
    index = np.clip(np.searchsorted((levels[1:] + levels[:-1]) / 2, r, side="left"), 0, len(levels) - 1)
    return levels[index]


@dataclass(frozen=True)
class OutputMoments:
    """A linear layer's output error over its columns as a quadratic form in its weights: for
    each output row w (of group g), mean over columns of (w x - t)^2 = w H w^T - 2 w . C + T."""

    hess: np.ndarray  # (G, K, K): mean of x x^T over the columns
    cross: np.ndarray  # (G, M, K): mean of t x^T
    power: np.ndarray  # (G, M): mean of t^2

    def loss_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean squared output error of weights w (G, M, K) and its gradient in w."""
        wh = w @ self.hess
        per_row = (np.sum(w * wh, axis=2, dtype=np.float64) - 2 * np.sum(w * self.cross, axis=2, dtype=np.float64)
                   + self.power)
        return float(np.mean(per_row)), 2 * (wh - self.cross) / per_row.size


@dataclass(frozen=True)
class OutputColumns:
    """The same error from the columns themselves: cheaper than the quadratic form when a layer
    has fewer columns than inputs (a classifier's Gemm sees one column per sample)."""

    x: np.ndarray  # (G, K, S)
    target: np.ndarray  # (G, M, S)

    def loss_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        err = w @ self.x - self.target
        return float(np.mean(np.square(err, dtype=np.float64))), 2 * err @ self.x.transpose(0, 2, 1) / err.size


def as_quadratic_form(columns: int, inputs: int) -> bool:
    """Whether a layer's exact output error is cheaper as a quadratic form (a step costs M K^2)
    than from its columns (M K S): when its sampled columns outnumber its inputs."""
    return columns > inputs


def output_error(x_q: np.ndarray, target: np.ndarray, chunk: int = 1024, dtype=np.float32
                 ) -> OutputMoments | OutputColumns:
    """The exact output error over all columns of x_q (G, K, S) against target (G, M, S), in the
    cheaper form: a step costs M K^2 as a quadratic form and M K S from the columns. Sums are
    float64, taken over column chunks (a float64 copy of a depthwise layer's columns would take
    half a gigabyte); the steps run in `dtype`: in float32 the gradient 2 (w H - C) keeps all that
    matters to a rounding choice, at half the cost."""
    if not as_quadratic_form(x_q.shape[2], x_q.shape[1]):
        return OutputColumns(np.asarray(x_q, dtype=dtype), np.asarray(target, dtype=dtype))
    return output_moments(x_q, target, chunk, dtype)


class MomentSums:
    """OutputMoments summed over column chunks as they arrive (float64 sums), so that a layer whose
    columns outnumber its inputs never needs all its columns at once: a depthwise layer's (S, G, K)
    columns at 128 samples take 450 MB, its G (K, K) moments a few."""

    def __init__(self, groups: int, k: int, m: int):
        self.hess, self.cross = np.zeros((groups, k, k)), np.zeros((groups, m, k))
        self.power, self.columns = np.zeros((groups, m)), 0

    def add(self, x: np.ndarray, target: np.ndarray) -> None:
        """Columns x (G, K, s) and the float outputs they should give, target (G, M, s)."""
        x, t = x.astype(np.float64), target.astype(np.float64)
        self.hess += x @ x.transpose(0, 2, 1)
        self.cross += t @ x.transpose(0, 2, 1)
        self.power += np.sum(t * t, axis=2)
        self.columns += x.shape[2]

    def moments(self, dtype=np.float32) -> OutputMoments:
        n = self.columns
        return OutputMoments((self.hess / n).astype(dtype), (self.cross / n).astype(dtype), self.power / n)


def output_moments(x_q: np.ndarray, target: np.ndarray, chunk: int = 1024, dtype=np.float32) -> OutputMoments:
    sums = MomentSums(x_q.shape[0], x_q.shape[1], target.shape[1])
    for lo in range(0, x_q.shape[2], chunk):
        sums.add(x_q[..., lo:lo + chunk], target[..., lo:lo + chunk])
    return sums.moments(dtype)


def adaround_rows(rows: np.ndarray, scale: np.ndarray, levels: np.ndarray, error: OutputMoments | OutputColumns,
                  cfg: RoundingConfig, report: Callable[[int, float], None] = lambda i, loss: None,
                  frozen: np.ndarray | None = None) -> np.ndarray:
    """Grid values (in units of `scale`, same shape as `rows`) chosen by AdaRound.

    rows (G, M, K) float weights; scale (G, M, 1) per output row; levels the sorted grid (integers
    for int formats, the scheme's levels for binary/ternary/pow2/exp); `error` the layer's output
    error (output_error of its quantized-input columns x_q (G, K, S) against the float outputs
    (G, M, S), or MomentSums gathered chunk by chunk). Each weight chooses between the two levels
    around it.
    Loss: mean squared output error + lambda * sum of (1 - |2h(V) - 1|^beta), beta annealed from
    beta[0] to beta[1] after a warm-up without it. `frozen` weights (masked zeros) stay at lo = 0.

    The output error of a linear layer is a quadratic form in its weights, so every step uses the
    exact error over all columns (output_error: as a quadratic form computed once, or from the
    columns where there are fewer columns than inputs) instead of a sampled minibatch: a step costs
    M K^2 (or M K S) instead of M K B, and gathers nothing (a depthwise layer's minibatches of
    hundreds of tiny products, gathered anew each step, were the slowest part of rounding). The
    steps are deterministic.
    """
    lo, gap = (a.astype(np.float32) for a in bracket(rows / scale, levels))
    v = _init_v((rows / scale - lo) / gap).astype(np.float32)
    if frozen is not None:
        gap = np.where(frozen, np.float32(0), gap)  # lo is the zero level there: no choice left
    scale = scale.astype(np.float32)
    state = adam_init(v)
    warm = int(cfg.warmup * cfg.iters)
    for it in range(cfg.iters):
        beta = None
        if it >= warm:
            beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * (it - warm) / max(cfg.iters - warm, 1)
        loss, grad_v = adaround_loss_grad(v, lo, gap, scale, error, cfg.reg_weight, beta)
        v, state = adam_step(v, grad_v, state, cfg.lr)
        if it % 50 == 0 or it == cfg.iters - 1:
            report(it, loss)
    return (lo + gap * (_h(v) >= 0.5)).astype(rows.dtype)


def adaround_loss_grad(v, lo, gap, scale, error: OutputMoments | OutputColumns, reg_weight: float,
                       beta: float | None):
    """Reconstruction loss (+ the rounding regulariser when beta is given) and its gradient in V."""
    h, dh = _soft(v)
    loss, grad_w = error.loss_grad((lo + gap * h) * scale)  # d loss / d W~
    grad_v = grad_w * scale * gap * dh
    if beta is not None:
        d = 2 * h - 1
        size = np.abs(d)
        power = size ** (beta - 1)  # |d|^beta as power * |d|: one float power per step, not two
        loss += reg_weight * float(np.sum(1 - power * size))
        grad_v -= reg_weight * beta * power * np.sign(d) * 2 * dh
    return loss, grad_v


def adaquant_rows(rows, scale, levels, x_q, target, cfg: RoundingConfig, rng, report=lambda i, loss: None,
                  frozen: np.ndarray | None = None):
    """AdaQuant: the weights themselves (and their scales) move, through a straight-through
    estimator of rounding; the result is rounded onto the (moved) grid. Returns (grid values, scale).

    The straight-through gradient is not the gradient of the rounded loss, so the rounded loss can
    rise while the surrogate falls. Every output row's error depends on that row alone, so each row
    keeps the iterate whose rounded error on all the layer's columns was lowest.
    """
    w, sc = rows.astype(np.float32), scale.astype(np.float32)
    levels32 = levels.astype(np.float32)
    w_state, s_state = adam_init(w), adam_init(sc)
    low, high = levels[0], levels[-1]
    best_q = nearest_level(w / sc, levels32)
    best_sc, best_err = sc.copy(), _row_error(best_q * sc, x_q, target)
    for it, (xb, tb) in enumerate(_minibatches(x_q, target, cfg, rng)):
        q = nearest_level(w / sc, levels32)
        err = (q * sc) @ xb - tb
        loss = float(np.mean(err**2))
        grad_wq = 2 * err @ xb.transpose(0, 2, 1) / err.size
        inside = (w / sc >= low) & (w / sc <= high)
        grad_w = grad_wq * inside  # straight through the rounding
        if frozen is not None:
            grad_w = np.where(frozen, 0, grad_w)  # masked zeros never move
        # d(q * s)/ds with q held (straight-through): q; clipped entries move with the scale.
        grad_s = (grad_wq * np.where(inside, q - w / sc, q)).sum(axis=2, keepdims=True)
        step = cfg.lr * float(np.mean(np.abs(sc)))
        w, w_state = adam_step(w, grad_w, w_state, step)
        sc, s_state = adam_step(sc, grad_s, s_state, 0.1 * step)
        sc = np.maximum(sc, 1e-12)
        if (it + 1) % 25 == 0 or it == cfg.iters - 1:
            q = nearest_level(w / sc, levels32)
            row_err = _row_error(q * sc, x_q, target)
            better = row_err < best_err
            best_q, best_sc, best_err = (np.where(better, q, best_q), np.where(better, sc, best_sc),
                                         np.minimum(row_err, best_err))
        if it % 50 == 0 or it == cfg.iters - 1:
            report(it, loss)
    return best_q.astype(rows.dtype), best_sc.astype(scale.dtype)


def _row_error(weights: np.ndarray, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared output error of each row (G, M, 1) over all columns, in x's precision (float64
    weights would make numpy copy all of x to float64)."""
    return np.mean((weights.astype(x.dtype) @ x - target) ** 2, axis=2, keepdims=True)


def _mean_error(weights: np.ndarray, x: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(_row_error(weights, x, target), dtype=np.float64))


# ---- the sequential loop --------------------------------------------------------------------


def optimise(g: Graph, plan: Plan, stats: Stats, quant: QuantConfig, batches: list[Batch], cfg: RoundingConfig,
             progress: Callable[[dict], object] | None = None, only: set[str] | None = None,
             workers: Workers = Workers()) -> tuple[Plan, list[dict]]:
    """The plan with every supported layer's weights re-rounded (or those of the weights in `only`,
    the others then fed quantized as the plan has them); per-layer losses before/after (each
    layer's row also goes to `progress` as it is done).

    The quantized inputs come from one walk of the probe model (calibrate/segments.py), cut at the
    layers' inputs: each batch's tensors are carried from piece to piece, and a layer's rounded
    weight replaces its float one in every batch's state before the piece that reads it runs. The
    prefix is paid for once, not once per layer."""
    from .segments import BatchStates, advance, cut

    todo = rounded_layers(g, plan, only)
    gated = sorted({l.activation for l in plan.layers if l.activation})
    probe = Graph(probe_model(g, plan, gated))
    float_weights = {l.weight: g.constant(l.weight) for l in plan.layers}
    # Where the plan replaces a weight (masked or re-fitted), rounding starts from that; its exact
    # zeros stay zero, so N:M masks survive rounding.
    start = {name: np.asarray(v, dtype=np.float32) for name, v in plan.values().items() if name in float_weights}
    gates = {}
    for tensor in gated:
        gates.update(act_gate(tensor, plan.tensors[tensor].spec.bits, stats, quant) if tensor in plan.tensors
                     else gate_feeds(tensor, False))
    current = dict(float_weights)  # the prefix's weights become quantized as layers are done
    if only is not None:
        current.update({name: tq.on_grid(float_weights[name]) for name, tq in plan.of_role("weight").items()
                        if name in float_weights and name not in only})
    at: dict[str, list[int]] = {}  # each layer's quantized input (after its fake-quantizer) -> layers reading it
    for index, layer in enumerate(todo):
        at.setdefault(layer.activation + "__fq", []).append(index)
    report: list[dict] = []
    out_plan = plan
    with tempfile.TemporaryDirectory(prefix="ptq-columns-") as scratch:
        float_columns, runs = _float_columns(g, todo, float_weights, batches, cfg, Path(scratch))
        states = BatchStates([run.feeds for run in runs], shared={**current, **gates})
        for segment in cut(probe.graph, at):
            here = at[segment.target]
            gathered = {i: _gatherer(g.node_by_name[todo[i].node], float_weights[todo[i].weight], float_columns[i], cfg)
                        for i in here}
            for b, x in enumerate(advance(probe, segment, states, lambda name: None)):
                for i in here:
                    node, w_shape = g.node_by_name[todo[i].node], float_weights[todo[i].weight].shape
                    gathered[i].add(sampled_columns(node, x, w_shape, cfg.positions, _positions(cfg, i, b)))
            jobs = [_job(g, todo[i], i, plan, float_weights, start, gathered.pop(i), cfg) for i in here]
            # Layers reading the same input are independent: on Ray (`workers`) they round side by side.
            for job, (ints, new_scale, seconds) in zip(jobs, run_all(round_job, jobs, workers)):
                layer, w = todo[job.index], float_weights[todo[job.index].weight]
                node, wq = g.node_by_name[layer.node], plan.tensors[layer.weight]
                before = job.loss_of(job.nearest * job.scale)
                after = job.loss_of(ints * new_scale)
                if after > before:  # never worse than nearest on the data it was fitted to
                    ints, new_scale, after = job.nearest, job.scale, before
                values = rows_to_weight(node, ints * new_scale, w.shape).astype(np.float32)
                tq = _with_values(wq, values, new_scale, node, w.shape)
                out_plan = out_plan.with_tensor(layer.weight, tq)
                rounded = tq.on_grid(values)
                states.shared[layer.weight] = rounded  # the pieces that read it have not run yet
                report.append({"node": layer.node, "method": cfg.method, "loss_nearest": before, "loss_after": after,
                               "seconds": round(seconds, 3), "columns": int(job.columns),
                               "peak_rss_mb": _peak_rss_mb()})
                if progress is not None:
                    progress(report[-1])
    order = {layer.node: i for i, layer in enumerate(todo)}
    return out_plan, sorted(report, key=lambda row: order[row["node"]])


@dataclass(frozen=True)
class RoundingJob:
    """What one layer's rounding reads: its float weight rows (G, M, K) and their scales and grid,
    and its output error (the quadratic form, or the sampled input columns and float targets)."""

    index: int  # the layer's place among those rounded
    rows: np.ndarray
    scale: np.ndarray
    levels: np.ndarray
    frozen: np.ndarray  # masked zeros
    error: "OutputMoments | None"
    exact: "OutputMoments | None"  # the same in float64, for the losses reported
    xq: np.ndarray | None
    target: np.ndarray | None
    columns: int
    cfg: RoundingConfig

    @property
    def nearest(self) -> np.ndarray:
        return nearest_level(self.rows / self.scale, self.levels)

    def loss_of(self, weights: np.ndarray) -> float:
        if self.exact is not None:
            return self.exact.loss_grad(weights)[0]
        return _mean_error(weights, self.xq, self.target)


def _job(g: Graph, layer, index: int, plan: Plan, float_weights: dict, start: dict, got, cfg: RoundingConfig
         ) -> RoundingJob:
    node, wq, w = g.node_by_name[layer.node], plan.tensors[layer.weight], float_weights[layer.weight]
    if isinstance(got, _StreamedMoments):
        exact, error, xq, target, columns = got.sums.moments(np.float64), got.sums.moments(), None, None, got.sums.columns
    else:
        xq, target = got.finish()
        exact, columns = None, xq.shape[2]
        error = None if cfg.method == "adaquant" else output_error(xq, target)
    rows = weight_rows(node, start.get(layer.weight, w)).astype(np.float64)
    return RoundingJob(index, rows, per_row(node, wq.scale, w.shape).astype(np.float64), code_levels(wq.spec),
                       rows == 0, error, exact, xq, target, columns, cfg)


def round_job(job: RoundingJob) -> tuple[np.ndarray, np.ndarray, float]:
    """One layer rounded (AdaRound or AdaQuant): its grid values, scales and the seconds it took.
    A module-level function of its argument alone, so that it can run as a Ray task."""
    started = time.perf_counter()
    cfg = job.cfg
    if cfg.method == "adaquant":
        rng = np.random.default_rng([cfg.seed, job.index])
        ints, scale = adaquant_rows(job.rows, job.scale, job.levels, job.xq, job.target, cfg, rng, frozen=job.frozen)
    else:
        ints, scale = adaround_rows(job.rows, job.scale, job.levels, job.error, cfg, frozen=job.frozen), job.scale
    return ints, scale, time.perf_counter() - started


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (None where the OS does not report it)."""
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def rounded_layers(g: Graph, plan: Plan, only: set[str] | None = None) -> list:
    """The layers layer-wise rounding visits: quantized weights (in `only`, if given), a known input,
    a supported op and no binarized input."""
    return [l for l in plan.layers if l.weight in plan.tensors and l.activation is not None
            and supported(g.node_by_name[l.node]) and l.node not in plan.binary_inputs
            and (only is None or l.weight in only)]


def _positions(cfg: RoundingConfig, layer_index: int, batch_index: int) -> np.random.Generator:
    """The generator that picks a layer's sampled positions in one batch: the float pass and the
    quantized pass pick the same ones."""
    return np.random.default_rng([cfg.seed, layer_index, batch_index, 1])


def _float_columns(g: Graph, layers, weights, batches: list[Batch], cfg: RoundingConfig,
                   scratch: Path) -> tuple[list[ColumnFile], list[Batch]]:
    """Every layer's sampled float input columns, from one pass of the float model, written to
    disk sample-major (S, G, K); and the runs the batches were cut into so that
    one run's layer inputs stay within data.RUN_BYTES (the quantized pass samples the same runs)."""
    activations = sorted({l.activation for l in layers})
    sess = session(g.model, outputs=activations, only=True)
    files = [open(scratch / f"{i}.f32", "wb") for i in range(len(layers))]
    counts, inner = [0] * len(layers), [()] * len(layers)  # columns written; each column's (G, K)
    runs, rows = [], None
    try:
        for b, batch in enumerate(bounded_runs(batches, lambda: rows)):
            runs.append(batch)
            values = dict(zip(activations, sess.run(activations, feeds_for(sess, batch.feeds))))
            if rows is None:  # the first run (one sample) tells how many a run may hold
                rows = rows_within(values.values(), 1)
            for i, layer in enumerate(layers):
                node, shape = g.node_by_name[layer.node], weights[layer.weight].shape
                block = sampled_columns(node, values[layer.activation], shape, cfg.positions, _positions(cfg, i, b))
                files[i].write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
                counts[i], inner[i] = counts[i] + len(block), block.shape[1:]
    finally:
        for f in files:
            f.close()
    return [ColumnFile(scratch / f"{i}.f32", (counts[i],) + inner[i]) for i in range(len(layers))], runs


@dataclass(frozen=True)
class ColumnFile:
    """Float32 columns (S, G, K) on disk, read a slice of columns at a time. Read, not mapped: the
    pages a mapping has touched count as resident until it is dropped, and a depthwise layer's
    columns at 256 samples fill 900 MB."""

    path: Path
    shape: tuple[int, ...]

    def __getitem__(self, columns: slice) -> np.ndarray:
        lo, hi, _ = columns.indices(self.shape[0])
        per_column = int(np.prod(self.shape[1:]))
        values = np.fromfile(self.path, dtype=np.float32, count=max(hi - lo, 0) * per_column, offset=lo * per_column * 4)
        return values.reshape((-1,) + tuple(self.shape[1:]))


class _Columns:
    """A layer's quantized input columns, all kept (AdaQuant's minibatches, or an error computed
    from the columns where they are fewer than the layer's inputs)."""

    def __init__(self, rows: np.ndarray, float_columns: ColumnFile):
        self.rows, self.float_columns, self.filled = rows, float_columns, 0
        self.x = np.empty(float_columns.shape, dtype=np.float32)

    def add(self, block: np.ndarray) -> None:
        self.x[self.filled:self.filled + len(block)] = block
        self.filled += len(block)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Columns (G, K, S) and the float outputs they should give (G, M, S)."""
        return np.moveaxis(self.x, 0, 2), _targets(self.rows, self.float_columns)


class _StreamedMoments:
    """A layer's output error as a quadratic form, summed batch by batch during the walk against the
    float outputs of the same sampled columns (read from the float pass's file in step)."""

    def __init__(self, rows: np.ndarray, float_columns: ColumnFile):
        self.rows32, self.float_columns, self.filled = rows.astype(np.float32), float_columns, 0
        self.sums = MomentSums(rows.shape[0], rows.shape[2], rows.shape[1])

    def add(self, block: np.ndarray) -> None:
        fx = self.float_columns[self.filled:self.filled + len(block)]
        self.filled += len(block)
        self.sums.add(np.moveaxis(block, 0, 2), self.rows32 @ np.moveaxis(fx, 0, 2))


def _gatherer(node, w: np.ndarray, float_columns: ColumnFile, cfg: RoundingConfig) -> _Columns | _StreamedMoments:
    """How a layer's walk output is kept: AdaRound's quadratic form where output_error would choose
    it, else the columns."""
    rows = weight_rows(node, w).astype(np.float64)
    samples, _, k = float_columns.shape
    if cfg.method == "adaround" and as_quadratic_form(samples, k):
        return _StreamedMoments(rows, float_columns)
    return _Columns(rows, float_columns)


def _targets(rows: np.ndarray, float_columns: ColumnFile) -> np.ndarray:
    """The float layer's outputs rows @ x_float, (G, M, S) over sample-major float32 storage."""
    out = np.empty((float_columns.shape[0],) + rows.shape[:2], dtype=np.float32)
    rows32 = rows.astype(np.float32)  # float64 rows would make numpy copy each chunk to float64
    step = 1024  # bounded working memory however many columns there are
    for start in range(0, len(out), step):
        chunk = np.moveaxis(float_columns[start:start + step], 0, 2)
        out[start:start + step] = np.moveaxis(rows32 @ chunk, 2, 0)
    return np.moveaxis(out, 0, 2)


def _with_values(wq: TensorQuant, values: np.ndarray, row_scale: np.ndarray, node, w_shape) -> TensorQuant:
    """The weight quantizer carrying its learned grid values (and, for AdaQuant, moved scales)."""
    scale = wq.scale
    if np.asarray(wq.scale).ndim and row_scale is not None:
        full = rows_to_weight(node, np.broadcast_to(row_scale, row_scale.shape[:2] + (values.size // (
            row_scale.shape[0] * row_scale.shape[1]),)), w_shape)
        axis = wq.spec.axis % len(w_shape)
        scale = np.moveaxis(full, axis, 0).reshape(full.shape[axis], -1)[:, 0].astype(np.float32)
    return replace(wq, scale=np.asarray(scale, dtype=np.float32), value=values,
                   source={**wq.source, "rounding": "learned"})

