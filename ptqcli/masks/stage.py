"""`ptq mask`: N:M masks for a model's weighted layers, with an optional least-squares re-fit.

On a model file, the masked (and re-fitted) float model is written to the run directory as
`model.float.onnx`, ready for `ptq calibrate`. On a calibrated run directory, the plan's weights
are replaced by the masked ones (their scales re-fitted) and exported as such. Either way the
masks are kept in `masks.npz`. Symmetric weight grids map zero to zero, so masked weights stay
exactly zero after quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import rundir
from ..rundir import MASKS, SENSITIVITY
from ..calibrate.data import Batch, iter_batches, model_inputs
from ..calibrate.planner import quantize_weight, requantize_biases
from ..config import DataConfig
from ..errors import PtqError
from ..geometry import matrix_to_weight, rows_to_weight, sampled_columns, supported, weight_rows, weight_to_matrix
from ..graph import Graph, clone, make_initializer
from ..ops import channel_axis
from ..plan import Layer, Plan
from ..runtime import session
from .nm import mask_diversity, nm_mask
from .refit import Moments, refit_layer
from .transposable import transposable_mask



@dataclass(frozen=True)
class MaskConfig:
    n: int
    m: int
    transposable: bool = False
    method: str = "exact"
    layers: tuple[str, ...] = ()  # node names; empty: every weighted layer
    refit: bool = True
    samples: int = 256
    positions: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.n <= self.m):
            raise PtqError(f"--nm {self.n}:{self.m}: need 0 < N <= M")
        if self.method not in ("exact", "approx"):
            raise PtqError(f"--method must be exact or approx (got {self.method})")


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise PtqError(f"--nm takes N:M, e.g. 2:4 (got {text!r})") from None
    return n, m


def layer_mask(node, w: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """Boolean mask in the weight's own shape; groups of M run along the input channels."""
    axis = channel_axis(node) % w.ndim
    matrix = weight_to_matrix(np.abs(w), node.op_type, axis)
    if cfg.transposable:
        mask = transposable_mask(matrix, cfg.n, cfg.m, cfg.method)
    else:
        mask = nm_mask(matrix, cfg.n, cfg.m)
    return matrix_to_weight(mask, w.shape, node.op_type, axis).astype(bool)


def _layer_moments(g: Graph, layers: list[Layer], batches: list[Batch], cfg: MaskConfig) -> dict[str, Moments]:
    """Each layer's input moments from the float model, streamed batch by batch at sampled positions:
    memory is one K x K matrix per group, whatever the number of samples."""
    names = sorted({layer.activation for layer in layers if layer.activation})
    if not names:
        return {}
    sess = session(g.model, outputs=names)
    rng = np.random.default_rng(cfg.seed)
    moments: dict[str, Moments] = {}
    seen = 0
    for batch in batches:
        values = dict(zip(names, sess.run(names, batch.feeds)))
        for layer in layers:
            node, shape = g.node_by_name[layer.node], tuple(g.initializers[layer.weight].dims)
            x = values[layer.activation]
            block = sampled_columns(node, x, shape, cfg.positions, rng)  # (S, G, K)
            owners = seen + np.repeat(np.arange(len(x)), len(block) // max(len(x), 1))
            if layer.node not in moments:
                moments[layer.node] = Moments.empty(block.shape[1], block.shape[2])
            moments[layer.node].add(block, owners)
        seen += batch.size
    return moments


def mask_layers(g: Graph, layers: list[Layer], cfg: MaskConfig, batches: list[Batch] | None,
                start: dict[str, np.ndarray] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict]]:
    """Masks, masked weights and a report row per layer. `start` holds the weights to mask where
    they are not the float model's own (a run's learned rounding or earlier re-fit). Where data is
    given, the kept weights are re-fitted against the dense float layer, and the re-fit replaces the
    masked weights when it helps on held-out samples (the row's `refit_strength` is then set)."""
    chosen = [l for l in layers if (not cfg.layers or l.node in cfg.layers) and supported(g.node_by_name[l.node])]
    unknown = set(cfg.layers) - {l.node for l in layers}
    if unknown:
        raise PtqError(f"--layers names {', '.join(sorted(unknown))}, which are not weighted layers")
    starts = {l.weight: np.asarray((start or {}).get(l.weight, g.constant(l.weight)), dtype=np.float64) for l in chosen}
    masks = {l.weight: layer_mask(g.node_by_name[l.node], starts[l.weight], cfg) for l in chosen}
    pruned = [l for l in chosen if not masks[l.weight].all()]  # a mask that keeps everything needs no re-fit
    moments = _layer_moments(g, pruned, batches, cfg) if cfg.refit and batches else {}
    weights, report = {}, []
    for layer in chosen:
        node, w, mask = g.node_by_name[layer.node], starts[layer.weight], masks[layer.weight]
        masked = w * mask
        row = {"node": layer.node, "weight": layer.weight, "density": float(mask.mean()), "output_mse_masked": None,
               "output_mse_refit": None, "refit_strength": None,
               "log10_diversity_per_weight": _diversity(node, w, cfg)}
        if layer.node in moments:
            dense = g.constant(layer.weight).astype(np.float64)
            fitted = refit_layer(weight_rows(node, dense), weight_rows(node, mask), moments.pop(layer.node), cfg.seed)
            row.update(output_mse_masked=fitted.heldout_mse_masked, output_mse_refit=fitted.heldout_mse_refit,
                       refit_strength=fitted.strength)
            if fitted.strength is not None:
                masked = rows_to_weight(node, fitted.rows, w.shape)
        weights[layer.weight] = masked.astype(np.float32)
        report.append(row)
    return masks, weights, report


def _diversity(node, w: np.ndarray, cfg: MaskConfig) -> float | None:
    """log10 of the masks the family allows, per weight; None when rows are shorter than M."""
    k = weight_to_matrix(w, node.op_type, channel_axis(node) % w.ndim).shape[1]
    if k < cfg.m or k % cfg.m:
        return None
    d = mask_diversity(cfg.n, cfg.m, k)
    return d.transposable_log10_per_weight if cfg.transposable else d.plain_log10_per_weight


def _batches(g: Graph, data: DataConfig | None, samples: int) -> list[Batch] | None:
    if data is None or data.path is None:
        return None
    return list(iter_batches(data.path, model_inputs(g), data, limit=samples, model=g.model))


def mask_model(g: Graph, layers: list[Layer], cfg: MaskConfig, data: DataConfig | None, run_dir: Path) -> list[dict]:
    """Mask a float model; write it (and the masks) into a run directory."""
    run = rundir.ensure_run_dir(run_dir)
    masks, weights, report = mask_layers(g, layers, cfg, _batches(g, data, cfg.samples) if cfg.refit else None)
    model = clone(g.model)
    for t in model.graph.initializer:
        if t.name in weights:
            t.CopyFrom(make_initializer(t.name, weights[t.name]))
    rundir.write_float_model(run, model)
    rundir.write_npz(run / MASKS, masks)
    rundir.write_json(run / "masks.json", {"nm": f"{cfg.n}:{cfg.m}", "transposable": cfg.transposable,
                                           "method": cfg.method, "layers": report})
    return report


def mask_run(run_dir: str | Path, cfg: MaskConfig) -> tuple[Plan, list[dict]]:
    """Mask a calibrated run's layers in place; the plan then quantizes the masked weights. What
    earlier stages left is kept: an allocation keeps its formats, masks are chosen on the run's
    current weights, and the calibrated plan that later allocations start from is masked the same
    way. (stages.mask then rounds a rounded run's masked layers again.)"""
    run = rundir.load_run(run_dir)
    batches = _batches(run.graph, run.data, cfg.samples) if cfg.refit else None
    masks, weights, report = mask_layers(run.graph, run.plan.layers, cfg, batches, start=run.plan.values())
    refitted = {row["weight"]: weights[row["weight"]] for row in report if row["refit_strength"] is not None}
    label = f"{cfg.n}:{cfg.m}" + (" transposable" if cfg.transposable else "")
    plan = apply_masks(run, run.plan, masks, refitted, label, cfg)
    rundir.write_plan(run.path, plan)
    if (run.path / rundir.BASE_PLAN).is_file():
        base = rundir.read_plan(run.path, rundir.BASE_PLAN)
        rundir.write_plan(run.path, apply_masks(run, base, masks, refitted, label, cfg), rundir.BASE_PLAN)
        (run.path / SENSITIVITY).unlink(missing_ok=True)  # measured on the unmasked weights
    rundir.write_npz(run.path / MASKS, {**run.masks, **masks})
    # A layer masked again without a re-fit gives up the one it had.
    refits = {name: w for name, w in run.refits.items() if name not in masks}
    rundir.write_npz(run.path / rundir.REFITS, {**refits, **refitted})
    rundir.write_json(run.path / "masks.json", {"nm": f"{cfg.n}:{cfg.m}", "transposable": cfg.transposable,
                                                "method": cfg.method, "layers": report})
    return plan, report


def apply_masks(run: rundir.Run, plan: Plan, masks: dict[str, np.ndarray], refitted: dict[str, np.ndarray],
                label: str, cfg: MaskConfig) -> Plan:
    """The plan with each masked weight quantized afresh in its format: the re-fitted weights, or the
    weights under the mask. A learned rounding is masked from the float weights (stages.reround then
    rounds the layer again, now against its mask)."""
    for name, mask in masks.items():
        tq = plan.tensors.get(name)
        if tq is None or tq.role != "weight":
            continue
        method = "mse" if tq.source.get("method") == "mse" else "minmax"
        w = refitted.get(name)
        if w is None:
            learned = tq.source.get("rounding") == "learned"
            start = run.graph.constant(name) if tq.value is None or learned else tq.value
            w = (np.asarray(start) * mask).astype(np.float32)
        new = replace(quantize_weight(w, tq.spec, method), value=w)
        plan = plan.with_tensor(name, replace(new, source={**new.source, "sparsity": label}))
    plan = replace(plan, config={**plan.config, "masks": {"nm": label, "method": cfg.method}})
    return requantize_biases(run.graph, plan, run.stats, run.quant)
