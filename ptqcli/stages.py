"""The pipeline's stages as plain functions over the run directory; the CLI only wraps these."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__
from .calibrate.collect import Shard, collect, collect_shards, save_stats, shard_bounds
from .calibrate.data import count_samples, iter_batches, model_inputs, runs_within_memory
from .parallel import Workers
from .calibrate.planner import build_plan, requantize_biases
from .calibrate.select import select
from .calibrate.smooth import float_tails
from .config import DataConfig, QuantConfig, ReduceRange, Rounding, cpu_name, to_jsonable
from .formats import learns_rounding
from .errors import PtqError
from .export.card import CardInputs, build_card, write_card
from .export.card_render import ops_summary
from .export.fidelity import INTEGER_KERNELS, Fidelity, measure
from .export.measures import batch_latency, bops, float_between_qdq, latency_not_measured, layer_kernels, weight_storage
from .export import container as containers
from .export.qdq import export_qdq
from .files import check_writable
from .graph import Graph, file_sha256, load_model, nodes_within, save_model
from .metrics import top1
from .plan import Plan
from .prepare import prepare
from .progress import Progress, silent
from . import rundir
from .nativelib import DOMAIN as NATIVE_DOMAIN
from .ops import QUANTIZED_MODEL_OPS, op_info
from .runtime import optimized_model, optimized_op_counts, release_memory, run_session, session, tensor_outputs

def load_prepared(model_path: str | Path) -> Graph:
    g = prepare(load_model(model_path), source=str(model_path))
    release_memory()  # the model as loaded, and each preparing transform's copy of it
    return g


def refuse_quantized(model_path: str | Path) -> None:
    """A one-line error for a model that holds quantized ops already (QDQ pairs, ORT's integer
    kernels, ptqcli's operators): its float original is what calibration needs."""
    found = Counter(n.op_type for n in nodes_within(load_model(model_path, weights=False).graph)
                    if (n.op_type in QUANTIZED_MODEL_OPS and n.domain in ("", "ai.onnx", "com.microsoft"))
                    or n.domain == NATIVE_DOMAIN)
    if found:
        raise PtqError(f"{Path(model_path).name} is quantized already ({ops_summary(found, 4)}): ptq quantizes float models, "
                       "give it the float original")


def calibrate(model_path: str | Path, quant: QuantConfig, data: DataConfig, run_dir: str | Path,
              progress: Progress = silent, workers: Workers = Workers()) -> Plan:
    """Prepare the model, observe activations on the data in one pass (in shards on Ray when
    `workers` says so), write the plan."""
    has_data = data.path is not None or data.synthetic is not None
    if not has_data and (quant.static_acts or quant.rounding.value not in ("nearest", "auto")):
        needs = f"--acts {quant.acts.value}" if quant.static_acts else f"{quant.rounding.value} rounding"
        instead = "--acts dynamic for weights alone" if quant.static_acts else "--rounding nearest"
        raise PtqError(f"{needs} needs calibration data: pass --data PATH or --synthetic bn|gaussian|uniform "
                       f"(or {instead})")
    if data.path is not None and data.synthetic is not None:
        raise PtqError("give --data or --synthetic, not both")
    refuse_quantized(model_path)
    with rundir.new_run_dir(run_dir) as run:
        recorded = data  # a synthetic run records how its data was made, not where it was put
        if data.synthetic is not None:
            data = replace(data, path=str(synthesize(model_path, data, quant.seed, run, progress)))
        g = load_prepared(model_path)
        inputs = model_inputs(g)
        quant, rounding_choice = resolved_rounding(g, quant, has_data)
        smoothing = {}
        # Weight-only GPTQ chooses its smoothing in its own pass over the data (gptq_rounding).
        smooth_later = quant.smooth and has_data and quant.acts.value == "none" and quant.rounding.value == "gptq"
        if quant.smooth and has_data and not smooth_later:
            g, smoothing = smooth(g, quant, data, inputs, activation_moments(g, quant, data, inputs, progress))
        # The plan and card record what `auto` resolved to, so a recipe replays identically.
        chose = "probed this CPU's int8 kernels" if quant.reduce_range is ReduceRange.auto else "set by the user"
        quant = replace(quant, reduce_range=ReduceRange.on if quant.resolved_reduce_range() else ReduceRange.off)
        sel = select(g, quant, float_tails(smoothing))
        stats, seen = observe(g, sel, quant, data, inputs, progress, workers, run) if has_data else ({}, 0)
        extra = {"data": to_jsonable(recorded), "samples_seen": seen, "reduce_range_choice": chose,
                 "rounding_choice": rounding_choice}
        if smoothing:
            extra["smoothing"] = smoothing
        plan = build_plan(g, sel, stats, quant, extra)
        plan = settle_activations(g, plan, quant, data, inputs, progress)
        if has_data and quant.rounding.value == "nearest" and quant.corrects_bias and quant.static_acts:
            plan = prefix_bias_correction(g, plan, stats, quant, data, inputs, progress)
        if quant.rounding.value == "gptq":
            g, plan = gptq_rounding(g, plan, stats, quant, data, inputs, run, progress, smooth=smooth_later)
        elif quant.rounding.value != "nearest":
            plan = optimise_rounding(g, plan, stats, quant, data, inputs, run, progress, workers=workers)
        if has_data:
            plan = fit_integer_lstms(g, plan, data, inputs, progress)
            plan = quantize_branches(g, plan, quant, data, inputs, run, progress)
        rundir.write_float_model(run, g.model)
        rundir.write_npz(run / rundir.STATS, save_stats(stats))
        rundir.write_plan(run, plan)
        rundir.write_json(run / rundir.RUN_INFO, {
            "tool_version": __version__,
            # Recorded here so that exports still describe their source after the file moves.
            "model": {"path": str(Path(model_path).resolve()), "sha256": file_sha256(model_path),
                      "bytes": Path(model_path).stat().st_size},
            "cpu": cpu_name(),
            "samples_seen": seen,
        })
        return plan


def resolved_rounding(g: Graph, quant: QuantConfig, has_data: bool) -> tuple[QuantConfig, str]:
    """`quant` with `--rounding auto` made concrete, and why (the plan and card record both, so a
    recipe replays the same rounding). Auto rounds layer by layer when there is data and a weight
    format below 8 bits: GPTQ when every layer is a MatMul/Gemm with a 2-D weight (language models
    and transformer encoders: GPTQ's Hessian walk, taken on the quantized
    prefix's inputs, measured best on them with or without quantized activations, and several times
    faster), AdaRound otherwise (it takes convolutions)."""
    if quant.rounding is not Rounding.auto:
        return quant, "set by the user"
    if not has_data or not any(learns_rounding(f) for f in (quant.weights, *quant.layer_weights.values())):
        why = "no calibration data" if not has_data else "no weight format below 8 bits"
        return replace(quant, rounding=Rounding.nearest), f"auto: nearest ({why})"
    layers = select(g, quant).layers
    if layers and all(l.op_type in ("MatMul", "Gemm") and g.constant(l.weight).ndim == 2 for l in layers):
        return replace(quant, rounding=Rounding.gptq), "auto: gptq (MatMul/Gemm layers only, weights below 8 bits)"
    return replace(quant, rounding=Rounding.adaround), "auto: adaround (weights below 8 bits, calibration data)"


def observe(g: Graph, sel, quant: QuantConfig, data: DataConfig, inputs, progress: Progress = silent,
            workers: Workers = Workers(), run: Path | None = None):
    """The selected activations' statistics over the calibration data, and the samples seen. On
    Ray the data is cut into shards of whole batches, each observed by a task reading the prepared
    model from the run directory; the merged statistics are one pass's, bit for bit. Data fed one
    sample at a time (states, --feedback, --whole-feeds, a fixed batch) is observed here."""
    total = samples_to_read(data, inputs, data.num_samples)
    histograms, axes = quant.method.value != "minmax", layer_input_axes(g, sel, quant)
    shardable = (workers.ray is not None and run is not None and not data.feedback and not data.whole_feeds
                 and all(s.batched and s.fixed_batch is None for s in inputs)
                 and count_samples(data.path, inputs, data) is not None)
    with progress("calibrating" + (" on Ray" if shardable else ""), total) as advance:
        if shardable:
            rundir.write_float_model(run, g.model)
            shards = [Shard(str(run / rundir.FLOAT_MODEL), list(sel.activations), data, inputs, quant.bins, histograms,
                            axes, start, count)
                      for start, count in shard_bounds(total, data.batch_size, 2 * workers.count)]
            stats, seen = collect_shards(shards, workers, advance)
        else:
            batches = iter_batches(data.path, inputs, data, limit=data.num_samples, model=g.model)
            stats, seen = collect(g, sel.activations, batches, quant.bins, advance, histograms=histograms,
                                  channel_axes=axes)
    if seen == 0:
        raise PtqError(f"no calibration samples could be read from {data.path}")
    return stats, seen


def samples_to_read(data: DataConfig, inputs, limit: int) -> int:
    """How many samples a pass limited to `limit` will read (for its progress bar)."""
    available = count_samples(data.path, inputs, data)
    return min(limit, available) if available is not None else limit


def activation_moments(g: Graph, quant: QuantConfig, data: DataConfig, inputs, progress: Progress = silent) -> dict:
    """One pass for what smoothing reads of the activations (calibrate/moments.py): the smoothing
    groups' extremes, and for a weight-only plan their Gram matrices (its smoothing loss)."""
    from .calibrate.moments import channel_moments
    from .calibrate.smooth import moments_wanted

    tensors, grams, rows_of, axes = moments_wanted(g, quant)
    if not tensors and not grams:
        return {}
    with progress("activation moments", samples_to_read(data, inputs, data.num_samples)) as advance:
        batches = iter_batches(data.path, inputs, data, limit=data.num_samples, model=g.model)
        moments, _ = channel_moments(g, tensors, batches, grams, rows_of, quant.smooth_samples, advance, axes)
    return moments


def smooth(g: Graph, quant: QuantConfig, data: DataConfig, inputs, moments: dict) -> tuple[Graph, dict]:
    """SmoothQuant folded into the float graph before anything is observed (calibrate/smooth.py)."""
    from .calibrate.smooth import smooth as smooth_graph, smoothing_groups

    if not smoothing_groups(g, quant.smooth_convs):
        return g, {}
    return smooth_graph(g, quant, smoothing_check_batches(g, data, inputs), moments)


def smoothing_check_batches(g: Graph, data: DataConfig, inputs) -> list:
    """The few calibration batches a smoothed float model is checked against the original on."""
    return list(iter_batches(data.path, inputs, data, limit=min(data.num_samples, 8), model=g.model))


def settle_activations(g: Graph, plan: Plan, quant: QuantConfig, data: DataConfig, inputs,
                       progress: Progress = silent) -> Plan:
    """Activations that feed no integer GEMM kernel stay in float where quantizing them alone costs
    more than `quant.act_damage_limit` at the outputs (see calibrate/settle.py)."""
    from .calibrate.settle import (GEMM_INPUT_DAMAGE_LIMIT, PROBE_SAMPLES, activation_damage, candidates,
                                   gemm_inputs, probe_budget, settle, without_idle)

    if quant.act_damage_limit is None or quant.act_damage_limit == float("inf"):
        return plan
    # Which tensors buy an integer kernel is a question for ORT's 8-bit CPU kernels; 16-bit QDQ
    # targets run the whole graph on integers.
    idle = without_idle if quant.act_bits == 8 else (lambda graph, p: p)
    plan = idle(g, plan)
    tensors, read_by_gemms = candidates(g, plan), gemm_inputs(g, plan)
    if not tensors and not read_by_gemms:
        return plan
    batches = list(iter_batches(data.path, inputs, data, limit=min(data.num_samples, quant.act_damage_samples), model=g.model))
    budget = probe_budget(g, plan, batches[0]) if batches else PROBE_SAMPLES
    with progress("measuring activation damage", len(tensors) + len(read_by_gemms)) as advance:
        damage = activation_damage(g, plan, tensors, batches, advance, quant.act_damage_limit, budget)
        # GEMM inputs against their own, far higher limit: most pass in a handful of grouped runs
        severe = activation_damage(g, plan, read_by_gemms, batches, advance, GEMM_INPUT_DAMAGE_LIMIT, budget)
    unmeasured = tuple(t for t in tensors if t not in damage)
    plan = settle(plan, damage, quant.act_damage_limit, unmeasured)
    return idle(g, settle(plan, severe, GEMM_INPUT_DAMAGE_LIMIT))


def synthesize(model_path: str | Path, data: DataConfig, seed: int, run: Path, progress: Progress = silent) -> Path:
    """Data-free calibration samples in run/synthetic.npz (resumed if a run was interrupted)."""
    from .calibrate.synthetic import batch_sizes, iter_generate, steps_per_batch

    out = run / rundir.SYNTHETIC
    iters = steps_per_batch(data.synthetic, data.synthetic_iters)
    batches = len(batch_sizes(data.num_samples, 32))
    with progress(f"synthetic data ({data.synthetic})", batches * iters) as advance:
        done = {"steps": 0}

        def report(batch: int, iteration: int, loss: float) -> None:
            steps = batch * iters + iteration
            advance(max(0, steps - done["steps"]))
            done["steps"] = max(done["steps"], steps)

        for _ in iter_generate(load_model(model_path), data.synthetic, data.num_samples, 32, data.synthetic_iters,
                               seed=seed, out_path=out, progress=report, backend=data.synthetic_backend):
            pass
    return out


def gptq_rounding(g: Graph, plan: Plan, stats, quant: QuantConfig, data: DataConfig, inputs, run: Path,
                  progress: Progress = silent, only: set[str] | None = None, smooth: bool = False
                  ) -> tuple[Graph, Plan]:
    """GPTQ over the plan's MatMul/Gemm layers (those of the weights in `only`, if given;
    calibrate/gptq.py), in graph order, each layer's Hessian taken from its inputs as the
    already-quantized prefix makes them: the graph runs segment by segment over the calibration
    batches (calibrate/segments.py), each segment with the weights rounded before it, other quantized
    weights on their grids, and the plan's activation quantizers applied.

    With `smooth` (weight-only plans), activation-aware scaling (calibrate/smooth.py) is chosen on
    the way, from the same pass: when the walk reaches a smoothing group's tensor, its factors s are
    chosen on the moments the quantized prefix gives it, the group's weights are rounded as
    diag(s) W against H / (s s^T), later segments compute with diag(s)^-1 Q, and the factors are
    folded into the float graph when the walk is over. Returns the graph (smoothed, if it was) and
    the plan."""
    from .calibrate.gptq import GptqConfig, eligible, smoothing_groups_rounded, walk
    from .calibrate.probe import quantized_prefix
    from .calibrate.segments import BatchStates
    from .calibrate.smooth import folded, smoothing_groups

    layers = [(layer, axis) for layer, axis in eligible(g, plan) if only is None or layer.weight in only]
    if not layers:
        raise PtqError("--rounding gptq found no MatMul/Gemm layer with a 2-D weight on an integer grid")
    samples = min(data.num_samples, quant.rounding_samples)
    prefix, gates, gated = quantized_prefix(g, plan, stats, quant)  # quantized activations are part of it too
    seen_as = {t: f"{t}__fq" if t in gated else t for t in {layer.activation for layer, _ in layers}}
    readers: dict[str, list] = {}
    for layer, axis in layers:
        readers.setdefault(seen_as[layer.activation], []).append((layer, axis))
    todo = {layer.weight for layer, _ in layers}
    tensors_out = dict(plan.tensors)
    groups = smoothing_groups_rounded(smoothing_groups(g) if smooth and not gated else [], readers)
    scaled: dict[str, np.ndarray] = {}  # weight -> its smoothing factors, shaped to multiply it
    chosen, smoothing = {}, {}

    def current(name: str) -> np.ndarray | None:
        tq = tensors_out.get(name)
        if tq is None or tq.role != "weight" or (name in todo and tq is plan.tensors[name]):
            return None  # float: not quantized, or not rounded yet
        value = tq.on_grid(g.constant(name))
        # The walk runs the graph as it was: a smoothed layer computes X (diag(s)^-1 Q).
        return value / scaled[name] if name in scaled else value

    # One state per calibration batch: its feeds, then what each segment leaves for the next.
    states = BatchStates([batch.feeds for batch in iter_batches(data.path, inputs, data, limit=samples, model=g.model)],
                         shared=gates)
    cfg, report = GptqConfig(act_order=quant.act_order), []
    with progress("gptq: layers", len(readers)) as advance:
        for step in walk(g, prefix, readers, states, lambda group: [plan.tensors[layer.weight] for layer, _ in group],
                         current, groups, quant, cfg, advance):
            if step.smoothing is not None:
                smoothing[step.tensor] = step.smoothing
            if step.factors is not None:
                chosen[step.tensor] = step.factors
                scaled.update((layer.weight, f) for (layer, _), f in zip(step.layers, step.shaped_factors()))
            for (layer, _), tq in zip(step.layers, step.tqs):
                tensors_out[layer.weight] = tq
                report.append({"node": layer.node, "weight": layer.weight})
    name = "rounding.json" if only is None else "rounding.allocate.json"
    rundir.write_json(run / name, {"method": "gptq", "damp": cfg.damp, "act_order": cfg.act_order,
                                   "samples": samples, "hessians": "quantized prefix", "layers": report})
    plan = replace(plan, tensors=tensors_out)
    if chosen:
        g = folded(g, list(groups.values()), chosen, smoothing_check_batches(g, data, inputs))
        # a group whose tensor has other readers is read under a new name by its GEMMs
        plan = replace(plan, layers=[replace(layer, activation=g.node_by_name[layer.node].input[0])
                                     if layer.activation in chosen else layer for layer in plan.layers])
    if smoothing:
        plan = replace(plan, config={**plan.config, "smoothing": smoothing})
    return g, requantize_biases(g, plan, stats, quant)


def quantize_branches(g: Graph, plan: Plan, quant: QuantConfig, data: DataConfig, inputs, run: Path,
                      progress: Progress = silent) -> Plan:
    """Each If branch that holds layers calibrated as a model of its own (calibrate/branches.py) in
    the run's branches/ directory, on what it reads on the calibration batches that take it; the
    plan records where, or why a branch stays float."""
    from .calibrate.branches import branch_graph, branch_model, branches, captured_feeds

    found = branches(g)
    if not found:
        return plan
    batches = list(iter_batches(data.path, inputs, data, limit=data.num_samples, model=g.model))
    feeds = captured_feeds(g, found, batches)
    records, notes, float_nodes = {}, list(plan.notes), dict(plan.float_nodes)
    for branch in found:
        taken, home = feeds[branch.key], Path(run) / "branches" / branch.key
        where = f"{branch.attribute} of If '{branch.node}'"
        record = {"node": branch.node, "branch": branch.attribute, "samples": len(taken)}
        try:
            if not taken:
                raise PtqError("no calibration sample takes it")
            (home / "data").mkdir(parents=True, exist_ok=True)
            for i, feed in enumerate(taken):
                np.savez(home / "data" / f"feed_{i:04d}.npz", **feed)
            save_model(branch_model(g, branch, taken[0]), home / "model.onnx")
            inner = calibrate(home / "model.onnx", quant, DataConfig(path=str(home / "data"), whole_feeds=True,
                                                                     num_samples=len(taken)), home / "run", progress)
        except PtqError as exc:
            records[branch.key] = {**record, "float": str(exc)}
            notes.append(f"{where} stays float: {exc}")
            continue
        records[branch.key] = {**record, "run": f"branches/{branch.key}/run"}
        notes.append(f"{where} quantized as a model of its own on the {len(taken)} calibration batches that take "
                     f"it: {len(inner.layers)} layers (branches/{branch.key}/run)")
        prefix = f"{branch.node}/{branch_graph(g, branch).name}/"
        float_nodes = {k: v for k, v in float_nodes.items() if not (k.startswith(prefix) and "subgraphs stay" in v)}
    return replace(plan, config={**plan.config, "branches": records}, notes=notes, float_nodes=float_nodes)


def with_quantized_branches(model, run: Path, plan: Plan, contrib_ops: bool) -> dict[str, str]:
    """The quantized graphs of the plan's calibrated If branches put into `model` in place (theirs
    too, recursively); what became of each branch, by key (a branch that cannot go in stays float)."""
    from .calibrate.branches import spliced

    outcome = {}
    for key, record in plan.config.get("branches", {}).items():
        if "run" not in record:
            outcome[key] = f"float: {record['float']}"
            continue
        inner = rundir.load_run(run / record["run"])
        branch = export_qdq(inner.graph, inner.plan, contrib_ops)
        nested = with_quantized_branches(branch, run / record["run"], inner.plan, contrib_ops)
        why = spliced(model, record["node"], record["branch"], branch)
        outcome[key] = f"float: {why}" if why else f"quantized: {len(inner.plan.layers)} layers"
        outcome.update({f"{key}/{k}": v for k, v in nested.items()})
    return outcome


def prefix_bias_correction(g: Graph, plan: Plan, stats, quant: QuantConfig, data: DataConfig, inputs,
                           progress: Progress = silent) -> Plan:
    """Bias correction against the quantized prefix: each corrected layer's input mean is taken
    where the already-quantized model (weights on their grids, activation quantizers, the biases
    corrected before it) gives it, in one walk cut at those inputs (calibrate/segments.py), and
    the bias removes W E[x] - Q(W) E[x_q]. With the float model's means alone it removed only the
    layer's own weight error, not the mean error the layers before it pass on."""
    from .calibrate.planner import quantize_bias
    from .calibrate.probe import quantized_prefix
    from .calibrate.segments import BatchStates, channel_means_in_order

    acts, weights = plan.of_role("activation"), plan.of_role("weight")

    def channel_axis(layer) -> int | None:
        info = op_info(layer.op_type)
        return None if info is None or info.act_channel_axis is None else info.act_channel_axis(g.node_by_name[layer.node])

    layers = [l for l in plan.layers if l.bias in plan.tensors and plan.tensors[l.bias].source.get("bias_correction")
              and l.activation in acts and l.node not in plan.binary_inputs and channel_axis(l) is not None]
    if not layers:
        return plan
    prefix, gates, _ = quantized_prefix(g, plan, stats, quant)
    readers: dict[str, list] = {}
    for layer in layers:
        readers.setdefault(f"{layer.activation}__fq", []).append(layer)
    axes = {t: channel_axis(ls[0]) for t, ls in readers.items()}
    biases: dict[str, np.ndarray] = {}

    def current(name: str) -> np.ndarray | None:
        if name in biases:
            return biases[name]
        return weights[name].on_grid(g.constant(name)) if name in weights else None

    samples = min(data.num_samples, quant.rounding_samples)
    batches = list(iter_batches(data.path, inputs, data, limit=samples, model=g.model))
    runs = runs_within_memory(g, batches, sorted({l.activation for l in layers}))
    states = BatchStates([run.feeds for run in runs], shared=gates)
    means = {}
    with progress("bias correction on the quantized prefix", len(readers)) as advance:
        for tensor, mean in channel_means_in_order(prefix, axes, states, current, advance):
            for layer in readers[tensor]:
                means[layer.activation] = mean
                bq = quantize_bias(g, layer, acts, weights, stats, quant, mean)
                if bq is not None and bq.value is not None:
                    biases[layer.bias] = bq.value
    return requantize_biases(g, plan, stats, quant, means)


def fit_integer_lstms(g: Graph, plan: Plan, data: DataConfig, inputs, progress: Progress = silent) -> Plan:
    """The tables of ptqcli's integer LSTM operator (calibrate/lstm.py) for the plan's int8 LSTMs,
    kept in the plan for a native export."""
    from .calibrate.lstm import FIT_SAMPLES, eligible, fit_lstms

    layers, _ = eligible(g, plan)
    if not layers:
        return plan
    with progress("integer LSTM tables", len(layers)) as advance:
        batches = list(iter_batches(data.path, inputs, data, limit=min(data.num_samples, FIT_SAMPLES), model=g.model))
        records = fit_lstms(g, plan, batches)
        advance(len(layers))
    return replace(plan, config={**plan.config, "integer_lstm": records})


def optimise_rounding(g: Graph, plan: Plan, stats, quant: QuantConfig, data: DataConfig, inputs, run: Path,
                      progress: Progress = silent, only: set[str] | None = None, workers: Workers = Workers()) -> Plan:
    """AdaRound / AdaQuant over the plan's layers (those of the weights in `only`, if given), then
    biases re-derived for the new weights; layers that read the same input on `workers`."""
    from .calibrate.layerwise import RoundingConfig, optimise, rounded_layers

    batches = list(iter_batches(data.path, inputs, data, limit=min(data.num_samples, quant.rounding_samples), model=g.model))
    cfg = RoundingConfig(method=quant.rounding.value, iters=quant.rounding_iters, seed=quant.seed)
    with progress(f"{quant.rounding.value}: layers", len(rounded_layers(g, plan, only))) as advance:
        plan, report = optimise(g, plan, stats, quant, batches, cfg,
                                lambda row: advance(1, f"{row['node']} loss {row['loss_nearest']:.3g} -> "
                                                       f"{row['loss_after']:.3g}"), only, workers)
    name = "rounding.json" if only is None else "rounding.allocate.json"
    rundir.write_json(run / name, {"method": cfg.method, "iters": cfg.iters, "layers": report})
    return requantize_biases(g, plan, stats, quant)


def allocate(run_dir: str | Path, budget, cfg, progress: Progress = silent):
    """`ptq allocate`: the integer program's formats, then the changed layers of a rounded run
    rounded again (see `reround`)."""
    from .allocate.stage import allocate as allocate_formats

    plan, solution, rows = allocate_formats(run_dir, budget, cfg, progress)
    return reround(run_dir, plan, progress), solution, rows


def mask(run_dir: str | Path, cfg, progress: Progress = silent):
    """`ptq mask RUN/`: N:M masks applied in place, then the masked layers of a rounded run rounded
    again (see `reround`)."""
    from .masks.stage import mask_run

    plan, report = mask_run(run_dir, cfg)
    return reround(run_dir, plan, progress), report


def reround(run_dir: str | Path, plan: Plan, progress: Progress = silent) -> Plan:
    """In a run whose weights were rounded layer by layer, the layers a later stage changed (a new
    format, a mask, a re-fit) are rounded again the same way, from the quantized prefix; the others keep
    their learned rounding. Masked zeros stay zero."""
    if plan.quant.rounding.value == "nearest":
        return plan
    run = rundir.load_run(run_dir)
    changed = {name for name, tq in plan.of_role("weight").items() if tq.source.get("rounding") != "learned"}
    if not changed:
        return plan
    inputs = model_inputs(run.graph)
    if plan.quant.rounding.value == "gptq":
        _, plan = gptq_rounding(run.graph, plan, run.stats, plan.quant, run.data, inputs, run.path, progress, only=changed)
    else:
        plan = optimise_rounding(run.graph, plan, run.stats, plan.quant, run.data, inputs, run.path, progress, changed)
    rundir.write_plan(run.path, plan)
    return plan


def layer_input_axes(g: Graph, sel, quant: QuantConfig) -> dict[str, int]:
    """The channel axis of each quantized layer's input whose per-channel means something uses: bias
    correction (layers with a bias on an int32 grid, so only with static activations) and binarized
    inputs. Observing every layer input of a large model costs memory for nothing otherwise."""
    axes = {}
    for layer in sel.layers:
        if not (quant.binary_acts or (layer.bias is not None and quant.static_acts)):
            continue
        node = g.node_by_name[layer.node]
        info = op_info(node.op_type, node.domain)
        if layer.activation and info is not None and info.act_channel_axis is not None:
            axes[layer.activation] = info.act_channel_axis(node)
    return axes


EXPORT_FORMATS = ("qdq", "onnx", "native")
def check_export_options(fmt: str, container: str, native_layers: str) -> None:
    """Refuse an unknown export choice before any work is done."""
    from .export.native import LAYER_CHOICES

    for option, value, known in (("export format", fmt, EXPORT_FORMATS), ("container", container, containers.MODES),
                                 ("--native-layers", native_layers, LAYER_CHOICES)):
        if value not in known:
            raise PtqError(f"unknown {option} '{value}' (known: {', '.join(known)})")


def export(run_dir: str | Path, out_path: str | Path, eval_data: str | None = None, eval_samples: int = 1000,
           progress: Progress = silent, fmt: str = "qdq", latency: bool = True,
           container: str = "auto", native_layers: str = "fastest") -> tuple[Plan, Fidelity | None]:
    """Build the quantized model (QDQ, or with ptqcli's native operators), measure it against the float
    model on held-out data (and time both at batch 1 unless `latency` is off), then write the model,
    fidelity.json and the card. Everything is measured before anything is written, so bad evaluation
    data leaves nothing behind. `container` stores sub-8-bit weight codes for the kernel that will run
    them (export/container.py); `native_layers` says which layers the native format replaces
    (export/native.py)."""
    check_export_options(fmt, container, native_layers)
    loaded = rundir.load_run(run_dir)
    check_writable(out_path)
    run, plan, g = loaded.path, loaded.plan, loaded.graph
    quantized = export_qdq(g, plan, contrib_ops=fmt != "onnx")
    branch_outcome = with_quantized_branches(quantized, run, plan, contrib_ops=fmt != "onnx")
    if branch_outcome:
        rundir.write_json(run / "branches.json", branch_outcome)
    native = None
    if fmt == "native":
        from .export.native import export_native, left_to_ort
        from .nativelib import require_library

        require_library()
        leave = left_to_ort(plan, native_layers)
        quantized, report = export_native(quantized, g, plan, leave)
        if not report.replaced and not leave:
            first = next(iter(report.kept.items()), None)
            why = f"; {first[0]}: {first[1]}" if first else ""
            raise PtqError("no layer has a native kernel (native export runs int2-int4, binary, ternary and pow2 up to "
                           f"4 bits, and int8 LSTMs){why}; use --format qdq")
        native = {"replaced": report.replaced, "kept": report.kept, "layers": native_layers}
    stored = containers.store(quantized, g, plan, container, frozenset(native["replaced"] if native else ()),
                              contrib_ops=fmt != "onnx")
    # Loaded by ORT before anything is measured or written: a model it refuses is never saved.
    optimized = optimized_model(quantized, "the exported model")
    kernels = layer_kernels(quantized, optimized, plan)
    unfused, added = containers.decode_unfused(quantized, plan, stored.choice, kernels)
    if unfused:  # measured again: what ORT now runs on the decoded weights
        stored = replace(stored, decoded_bytes=stored.decoded_bytes + added)
        optimized = optimized_model(quantized, "the exported model")
        kernels = layer_kernels(quantized, optimized, plan)
    between = float_between_qdq(optimized)
    del optimized  # a copy of the model's graph: not held through the fidelity pass
    source, skip, held_out = eval_source(plan, eval_data, g)
    fidelity = evaluate(g, quantized, plan, source, skip, held_out, eval_samples, progress)
    inputs = card_inputs(run, g, plan, quantized, Path(out_path), fidelity, source, skip, latency)
    types = containers.stored_types(quantized, plan)
    held = {**stored.record(), "not_fused": {n: kernels.get(n, "unknown") for n in stored.choice.widened
                                             if kernels.get(n) not in INTEGER_KERNELS}}
    save_model(quantized, out_path)
    if fidelity is not None:
        rundir.write_json(run / rundir.FIDELITY, fidelity.to_dict())
    write_card(build_card(replace(inputs, native=native, container=held, kernels=kernels, stored=types,
                                  float_between_qdq=between)), out_path)
    return plan, fidelity


def quantize_streaming(model_path: str | Path, out_path: str | Path, quant: QuantConfig, data: DataConfig,
                       progress: Progress = silent, eval_data: str | None = None,
                       eval_samples: int = 1000) -> tuple[Plan, Fidelity | None]:
    """Weight-only quantization one tensor at a time (export/stream.py), with its card: no run
    directory and no latency (it would load the float model whole); fidelity on `eval_data`, the
    float model run segment by segment."""
    from .export.stream import stored_bytes, stream_quantize

    refuse_quantized(model_path)
    if eval_data is not None:
        check_data(model_path, eval_data, replace(data, path=eval_data), eval_samples)
    measure = None if eval_data is None else (
        lambda g, path, plan, cuts, kernel_ops: measured_piecewise(g, path, plan, replace(data, path=eval_data),
                                                                   eval_samples, cuts, kernel_ops, progress))
    done = stream_quantize(model_path, out_path, quant, data, progress, measure)
    source = {"path": str(Path(model_path).resolve()), "sha256": file_sha256(model_path),
              "bytes": stored_bytes(model_path)}
    g, plan = done.graph, done.plan
    inputs = CardInputs(source_model=source, output_model=Path(out_path), graph=g, plan=plan, fidelity=done.fidelity,
                        eval_source=eval_data, size=weight_storage(g, plan), bops=bops(g, plan, []),
                        latency=latency_not_measured(cpu_name()), kernel_ops=done.kernel_ops,
                        kernels=layer_kernels(load_model(out_path, weights=False), done.optimized, plan))
    write_card(build_card(inputs), out_path)
    return plan, done.fidelity


def measured_piecewise(g: Graph, path: Path, plan: Plan, data: DataConfig, samples: int, cuts: list[str],
                       kernel_ops: dict[str, int], progress: Progress = silent) -> Fidelity:
    """A written model against the float one `g` (weights on disk) on held-out data, the float one
    run segment by segment (export/fidelity.measure_piecewise)."""
    from .export.fidelity import measure_piecewise
    from .runtime import file_session

    with progress("measuring fidelity (float model segment by segment)", samples) as advance:
        batches = iter_batches(data.path, model_inputs(g), data, limit=samples, model=g.model)
        fidelity = measure_piecewise(g, file_session(path, "the quantized model"), plan, batches, True, cuts,
                                     kernel_ops, advance)
    if not fidelity.samples:
        raise PtqError(f"--eval-data {data.path} holds no samples")
    return fidelity


def check_data(model_path: str | Path, path: str, cfg: DataConfig, limit: int) -> None:
    """Read and check the samples that will be fed, without running the model, so that `ptq quantize`
    refuses bad evaluation data before calibration writes anything. The model as stored is enough:
    its inputs and embedding tables are what preparation keeps."""
    g = Graph(load_model(model_path, weights=not cfg.feedback))  # only feedback runs the model
    for _ in iter_batches(path, model_inputs(g), cfg, limit=limit, model=g.model):
        pass


def _recorded_source(model: dict) -> dict:
    """The source model as calibration recorded it (runs from before sizes were recorded: sized now)."""
    path = Path(model["path"])
    size = model.get("bytes", path.stat().st_size if path.is_file() else 0)
    return {"path": model["path"], "sha256": model["sha256"], "bytes": int(size)}


@dataclass(frozen=True)
class RunResult:
    samples: int
    top1: float | None        # against the data's labels, when it has them
    ms_per_batch: float       # median wall time of one session.run
    batch_size: int
    outputs: dict[str, np.ndarray]


def run_model(model_path: str | Path, data: DataConfig, progress: Progress = silent) -> RunResult:
    """Run any model ptqcli wrote (float, QDQ or native operators) on data: outputs, top-1, latency."""
    import time

    g = Graph(load_model(model_path))
    sess = session(g.model)
    inputs = model_inputs(g)
    names = tensor_outputs(sess)
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    correct, labelled, seen, times, batch_size = 0, True, 0, [], 1
    with progress("running", data.num_samples) as advance:
        for batch in iter_batches(data.path, inputs, data, limit=data.num_samples, model=g.model):
            started = time.perf_counter()
            outs = run_session(sess, names, batch.feeds)
            times.append(time.perf_counter() - started)
            n = batch.size
            batch_size = max(batch_size, n)
            for name, value in zip(names, outs):
                collected[name].append(value)
            if batch.labels is None:
                labelled = False
            else:
                correct += int(np.sum(top1(outs[0]) == batch.labels))
            seen += n
            advance(n)
    if seen == 0:
        raise PtqError(f"{data.path}: no samples to run")
    return RunResult(seen, correct / seen if labelled else None, 1000 * float(np.median(times)), batch_size,
                     {n: np.concatenate(v) for n, v in collected.items()})


def card_inputs(run: Path, g: Graph, plan: Plan, quantized, out_path: Path, fidelity: Fidelity | None,
                eval_from: str | None, skip: int = 0, measure_latency: bool = True) -> CardInputs:
    info = rundir.read_json(run / rundir.RUN_INFO)
    if measure_latency:
        samples, real = latency_samples(g, plan, eval_from, skip)
        latency = batch_latency(g.model, quantized, samples, real, cpu_name())
    else:
        latency = latency_not_measured(cpu_name())
    return CardInputs(
        source_model=_recorded_source(info["model"]), output_model=out_path, graph=g, plan=plan, fidelity=fidelity,
        eval_source=eval_from, size=weight_storage(g, plan), bops=bops(g, plan, fidelity.layers if fidelity else []),
        latency=latency, kernel_ops=fidelity.kernel_ops if fidelity else optimized_op_counts(quantized),
    )


LATENCY_SAMPLES = 8  # real samples timed, one run each per round: enough to vary lengths, masks, inputs


def latency_samples(g: Graph, plan: Plan, source: str | None, skip: int = 0) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Feeds of one sample each (the model's own batch when it is fixed): up to LATENCY_SAMPLES real
    ones when there is data, else one of zeros in the input shapes (dynamic dims as 1); and whether
    they are real."""
    inputs = model_inputs(g)
    if source is not None:
        per_run = next((s.fixed_batch for s in inputs if s.fixed_batch), 1)
        one_at_a_time = replace(plan.data, batch_size=1)
        batches = list(iter_batches(source, inputs, one_at_a_time, limit=LATENCY_SAMPLES * per_run, skip=skip, model=g.model))
        if batches:
            return [b.feeds for b in batches], True
    return [{s.name: np.zeros([d if isinstance(d, int) else 1 for d in s.shape], dtype=s.dtype) for s in inputs}], False


def eval_source(plan: Plan, eval_data: str | None, g: Graph) -> tuple[str | None, int, bool]:
    """Held-out samples: --eval-data if given, else the calibration data past what calibration read."""
    if eval_data is not None:
        return eval_data, 0, True
    path = plan.data.path
    available = count_samples(path, model_inputs(g), plan.data) if path and Path(path).exists() else None
    if available is None:
        return None, 0, False
    seen = plan.samples_seen
    held_out = available > seen
    return path, (seen if held_out else 0), held_out


def evaluate(g: Graph, quantized, plan: Plan, source: str | None, skip: int, held_out: bool, eval_samples: int,
             progress: Progress = silent) -> Fidelity | None:
    if source is None:
        return None
    inputs = model_inputs(g)
    with progress("measuring fidelity", eval_samples) as advance:
        batches = iter_batches(source, inputs, plan.data, limit=eval_samples, skip=skip, model=g.model)
        fidelity = measure(g.model, quantized, plan, batches, held_out, advance)
    if fidelity.samples == 0 and skip:  # calibration read every sample after all: measure on those
        return evaluate(g, quantized, plan, source, 0, False, eval_samples, progress)
    return fidelity if fidelity.samples else None
