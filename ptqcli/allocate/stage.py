"""`ptq allocate`: per-layer bit-widths for a run directory, under a budget.

The first allocation keeps the calibrated plan as `plan.base.json`; every allocation starts from
it, so allocations can be redone with other budgets. Damage tables are cached in
`sensitivity.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import rundir
from ..rundir import BASE_PLAN, SENSITIVITY, Run
from ..calibrate.data import iter_batches, model_inputs
from ..calibrate.planner import build_plan, kept_layers, requantize_biases
from ..calibrate.select import Selection
from ..formats import parse_weight_format
from ..parallel import Workers, run_all
from ..errors import PtqError
from ..plan import Plan
from ..progress import Progress, silent
from . import ilp
from .costs import cost_table, layer_output_shapes
from .sensitivity import Candidate, candidates, measure_damage, weight_only_damage

ALLOCATION = "allocation.json"


@dataclass(frozen=True)
class Budget:
    kind: str  # size | bits | bops | damage
    value: float


@dataclass(frozen=True)
class AllocationConfig:
    weight_formats: tuple[str, ...] = ("int8", "int4", "int3", "int2")
    act_bits: tuple[int, ...] = (8,)
    keep: tuple[str, ...] = ()
    samples: int = 64
    time_limit: float | None = None
    workers: Workers = Workers()  # where the sensitivity runs go (--ray, --workers)

    def __post_init__(self) -> None:
        if not self.weight_formats:
            raise PtqError("give at least one weight candidate")
        for fmt in self.weight_formats:
            parse_weight_format(fmt)
        if any(b not in (4, 8) for b in self.act_bits) or not self.act_bits:
            raise PtqError(f"activation candidates must be 8 and/or 4 (got {list(self.act_bits)})")
        if self.samples < 1:
            raise PtqError("--samples must be at least 1")


def load_context(run_dir: str | Path) -> Run:
    """The run as calibrated (and masked, rounded) before any allocation: its plan is the base plan
    every allocation starts from."""
    run = load_base(run_dir)
    keep_base(run)
    return run


def load_base(run_dir: str | Path) -> Run:
    """The run with its base plan, read without writing anything: before the first allocation the
    base plan is plan.json itself (an allocation that fails then leaves the run as it was)."""
    path = rundir.existing_run_dir(run_dir)
    return rundir.load_run(path, BASE_PLAN if (path / BASE_PLAN).is_file() else rundir.PLAN)


def keep_base(run: Run) -> None:
    """Keep the base plan as plan.base.json before an allocation first rewrites plan.json."""
    if not (run.path / BASE_PLAN).is_file():
        rundir.write_plan(run.path, run.plan, BASE_PLAN)


def layer_options(ctx: Run, cfg: AllocationConfig) -> dict[str, list[Candidate]]:
    pins = kept_layers(cfg.keep, ctx.plan.layers, set(ctx.graph.output_names))
    every = candidates(list(cfg.weight_formats), list(cfg.act_bits))
    options = {}
    for layer in ctx.plan.layers:
        if layer.node in pins:
            options[layer.node] = [Candidate(f"int{pins[layer.node]}", 8)]
        else:
            options[layer.node] = every
    return options


def damage_table(ctx: Run, options: dict[str, list[Candidate]], cfg: AllocationConfig,
                 progress: Progress = silent) -> dict[str, dict[str, float]]:
    """Measured damage per (layer, option), read from the cache when it already holds them."""
    wanted = sorted({c for opts in options.values() for c in opts}, key=lambda c: (-c.w_bits, -c.a_bits, c.weights))
    weight_only = ctx.quant.acts.value == "none"
    key = {"candidates": [c.label for c in wanted], "samples": cfg.samples,
           **({"measure": "gram-scaled"} if weight_only else {})}
    cache = ctx.path / SENSITIVITY
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["damage"]
    batches = list(iter_batches(ctx.data.path, model_inputs(ctx.graph), ctx.data, limit=cfg.samples, model=ctx.graph.model))
    if not batches:
        raise PtqError(f"no calibration samples could be read from {ctx.data.path}")
    if cfg.workers.ray is not None and not weight_only:
        table = _damage_on_workers(ctx, wanted, cfg, progress)
    else:
        with progress("measuring layer sensitivity", len(ctx.plan.layers) * len(wanted)) as advance:
            measure = weight_only_damage if weight_only else measure_damage
            table = measure(ctx.graph, ctx.plan, ctx.stats, ctx.quant, batches, wanted, advance, float_values(ctx))
    rundir.write_json(cache, {"key": key, "damage": table})
    return table


def _damage_on_workers(ctx: Run, wanted: list[Candidate], cfg: AllocationConfig,
                       progress: Progress) -> dict[str, dict[str, float]]:
    """measure_damage split over Ray tasks: each takes every n-th layer (costs vary along a network,
    so each share holds all depths), reads the run itself and measures its layers' rows."""
    nodes = [layer.node for layer in ctx.plan.layers]
    shares = max(1, min(len(nodes), 2 * cfg.workers.count))
    jobs = [(str(ctx.path), nodes[i::shares], wanted, cfg.samples) for i in range(shares)]
    with progress(f"measuring layer sensitivity on Ray ({shares} tasks)", shares) as advance:
        parts = run_all(_damage_rows, jobs, cfg.workers, advance)
    found = {node: row for part in parts for node, row in part.items()}
    return {node: found[node] for node in nodes if node in found}


def _damage_rows(job: tuple[str, list[str], list[Candidate], int]) -> dict[str, dict[str, float]]:
    """One Ray task of _damage_on_workers: the rows of `nodes`, as measure_damage computes them."""
    run_dir, nodes, wanted, samples = job
    ctx = load_base(run_dir)
    batches = list(iter_batches(ctx.data.path, model_inputs(ctx.graph), ctx.data, limit=samples, model=ctx.graph.model))
    return measure_damage(ctx.graph, ctx.plan, ctx.stats, ctx.quant, batches, {node: wanted for node in nodes},
                          values=float_values(ctx))


def solve(ctx: Run, budget: Budget, cfg: AllocationConfig, progress: Progress = silent,
          method: str = "ilp") -> tuple[ilp.Solution, dict, dict]:
    """The chosen option per layer, with the damage and cost tables it was chosen from."""
    options = layer_options(ctx, cfg)
    measured = damage_table(ctx, options, cfg, progress)
    damage = {node: {c.label: measured[node][c.label] for c in opts} for node, opts in options.items()}
    kind = "size" if budget.kind == "damage" else budget.kind
    first = next(iter_batches(ctx.data.path, model_inputs(ctx.graph), ctx.data, limit=1, model=ctx.graph.model), None)
    shapes = layer_output_shapes(ctx.graph, ctx.plan, first) if first is not None else {}
    cost, fixed = cost_table(ctx.graph, ctx.plan, options, kind, shapes)
    if budget.kind == "damage":
        return ilp.min_cost(damage, cost, budget.value, fixed, cfg.time_limit), damage, cost
    limit = budget.value
    unit = " bytes" if kind == "size" else ""
    if kind == "bits":  # an average over the layers' parameters
        limit, unit = budget.value * sum(_params(ctx, node) for node in cost), " weight bits"
    if method == "greedy":
        return ilp.greedy(damage, cost, limit, fixed), damage, cost
    return ilp.min_damage(damage, cost, limit, fixed, cfg.time_limit, unit), damage, cost


def plan_for(ctx: Run, choice: dict[str, str], extra: dict | None = None) -> Plan:
    """The base plan re-derived with each layer's chosen weight and activation widths. A weight whose
    format the choice keeps keeps its quantizer as it is (learned rounding, masks); one whose format
    changes is quantized anew from its float values: the masked or re-fitted ones where the run has
    them (learned grid values are not carried over to another grid)."""
    by_node = {layer.node: layer for layer in ctx.plan.layers}
    weight_formats = {by_node[node].weight: Candidate.parse(label).weights for node, label in choice.items()}
    act_bits: dict[str, int] = {}
    for node, label in choice.items():
        tensor = by_node[node].activation
        if tensor:  # a tensor read by several layers keeps the widest width any of them chose
            act_bits[tensor] = max(act_bits.get(tensor, 0), Candidate.parse(label).a_bits)
    activations = [name for name, t in ctx.plan.tensors.items() if t.role == "activation"]
    sel = Selection(ctx.plan.layers, activations, ctx.plan.float_nodes, tuple(ctx.plan.of_role("constant")),
                    tuple(ctx.plan.of_role("embedding")))
    config = {k: v for k, v in ctx.plan.config.items() if k not in ("quant", "allocation", "fallback")}
    plan = build_plan(ctx.graph, sel, ctx.stats, ctx.quant, {**config, **(extra or {})}, weight_formats, act_bits,
                      float_values(ctx))
    kept = {name: tq for name, tq in ctx.plan.of_role("weight").items()
            if tq.source.get("rounding") == "learned" and name in plan.tensors and plan.tensors[name].spec == tq.spec}
    if not kept:
        return plan
    return requantize_biases(ctx.graph, replace(plan, tensors={**plan.tensors, **kept}), ctx.stats, ctx.quant)


def float_values(ctx: Run) -> dict[str, np.ndarray]:
    """The float weights each layer is quantized from when its format changes: a masked or re-fitted
    value of the base plan, the weights the run's mask was re-fitted to (a learned rounding has
    replaced them in the plan), the float weight under the run's mask, or (None) the model's own."""
    values = {}
    for name, tq in ctx.plan.of_role("weight").items():
        if tq.value is not None and tq.source.get("rounding") != "learned":
            values[name] = np.asarray(tq.value, dtype=np.float32)
        elif name in ctx.refits:
            values[name] = np.asarray(ctx.refits[name], dtype=np.float32)
        elif name in ctx.masks:
            values[name] = (ctx.graph.constant(name) * ctx.masks[name]).astype(np.float32)
    return values


def allocate(run_dir: str | Path, budget: Budget, cfg: AllocationConfig, progress: Progress = silent
             ) -> tuple[Plan, ilp.Solution, list[dict]]:
    ctx = load_context(run_dir)
    solution, damage, cost = solve(ctx, budget, cfg, progress)
    allocation = {"budget": {"kind": budget.kind, "value": budget.value}, "status": solution.status,
                  "solver": solution.solver, "damage": solution.damage, "cost": solution.cost,
                  "choice": solution.choice}
    plan = plan_for(ctx, solution.choice, {"allocation": allocation})
    rows = [{"node": node, "option": label, "damage": damage[node][label], "cost": cost[node][label],
             "params": int(_params(ctx, node))} for node, label in solution.choice.items()]
    rundir.write_plan(ctx.path, plan)
    rundir.write_json(ctx.path / ALLOCATION, {**allocation, "layers": rows})
    return plan, solution, rows


def _params(ctx: Run, node: str) -> int:
    weight = next(layer.weight for layer in ctx.plan.layers if layer.node == node)
    return int(np.prod(ctx.graph.initializers[weight].dims))
