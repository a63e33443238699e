"""Calibration inputs made without data, from the statistics a model's BatchNorm layers hold.

Each batch starts as Gaussian noise in the model's input shape. Adam then moves it until, at the
input of every BatchNormalization node, the per-channel batch mean and standard deviation match
the running mean and variance stored in that node: the statistics of the data the model was
trained on ("The Knowledge Within: Methods for Data-Free Model Compression", Haroush et al.,
CVPR 2020; ZeroQ and DeepInversion fit the same objective). The gradient comes from one of two
backends. ``numpy``: the numpy executor's tape with only the input's cotangent asked for, so no
Conv activations are kept, only the BatchNorm inputs the loss reads, one-byte activation masks and
pooling winners. ``jax`` (``pip install ptqcli[jax]``): the same graph and the same loss expression
traced by jax (``numeric/jax_program.py``) and compiled by XLA, several times faster on CPU.
``auto`` takes jax when it is installed and implements every op of the model, numpy otherwise.

The plain baselines, ``gaussian`` (N(0, 1)) and ``uniform`` (U(-1, 1)), are deliberately not
rescaled to the model's input range: they show what calibrating on noise gives.

Batch ``i`` is drawn from a generator seeded by ``(seed, i)`` and optimised on its own, so a run
resumed from a partly written ``.npz`` gives the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from ..errors import PtqError
from ..files import check_writable, write_atomic
from ..graph import Graph, load_model
from ..numeric import Program, batch_stats, batch_stats_vjp
from ..numeric.optim import adam_init, adam_step
from .data import InputSpec, model_inputs

KINDS = ("bn", "gaussian", "uniform")
BACKENDS = ("auto", "numpy", "jax")
LOSS_KEY = "synthetic_loss"  # (batches, 2): initial and final BatchNorm loss; NaN for the baselines
SIZES_KEY = "synthetic_sizes"  # samples in each stored batch
RECIPE_KEY = "synthetic_recipe"  # JSON of the settings the stored batches were made with
NO_BATCHNORM = (
    "the model has no BatchNormalization nodes to fit synthetic data to: export it with BatchNorm kept "
    "(PyTorch: torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE)) or pass --data"
)

# Called with (batch index, step within the batch, loss): for bn after every Adam step (steps 1..iters,
# the BatchNorm loss before the step); for the noise baselines once per batch (step 1, loss NaN).
# A batch read back from the output file reports once, at its last step, with its final loss.
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class BNTarget:
    """One inference BatchNormalization node: the tensor it normalises and the statistics it expects."""

    node: str
    tensor: str
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    @property
    def std(self) -> np.ndarray:
        # The epsilon is what the layer divides by, and it keeps d(std)/d(var) finite for channels
        # that a ReLU upstream leaves constant.
        return np.sqrt(self.var + self.epsilon)


@dataclass(frozen=True)
class SyntheticBatch:
    """One finished batch; losses are None for the noise baselines, which are not optimised."""

    index: int
    inputs: np.ndarray
    initial_loss: float | None
    final_loss: float | None
    resumed: bool = False


# --------------------------------------------------------------------------- #
# The model: BatchNorm targets, the input, the sub-graph that reaches the targets
# --------------------------------------------------------------------------- #


def _as_model(model: ModelProto | str | Path) -> ModelProto:
    return model if isinstance(model, ModelProto) else load_model(model)


def _is_inference_bn(node) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    training = any(a.name == "training_mode" and helper.get_attribute_value(a) for a in node.attribute)
    # Before opset 14 the training form is told apart only by its running-statistics outputs.
    updates_stats = sum(1 for o in node.output if o) > 1
    return not training and not updates_stats and len(node.input) >= 5


def _constant(model: ModelProto, name: str, node_label: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t).astype(np.float64)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                return numpy_helper.to_array(value.t).astype(np.float64)
    raise PtqError(f"BatchNormalization {node_label}: running statistic '{name}' is not a constant of the model")


def bn_targets(model: ModelProto | str | Path) -> list[BNTarget]:
    """Every inference BatchNormalization node of the model as given (before any BatchNorm folding):
    its input tensor and running mean and variance. Raises PtqError when there is none."""
    model = _as_model(model)
    targets = []
    for node in model.graph.node:
        if not _is_inference_bn(node):
            continue
        label = f"node '{node.name}'" if node.name else f"on '{node.input[0]}'"
        eps = next((float(helper.get_attribute_value(a)) for a in node.attribute if a.name == "epsilon"), 1e-5)
        targets.append(BNTarget(node.name, node.input[0], _constant(model, node.input[3], label),
                                _constant(model, node.input[4], label), eps))
    if not targets:
        raise PtqError(NO_BATCHNORM)
    return targets


def synthetic_input(model: ModelProto) -> InputSpec:
    """The one float input to generate, with every dim but the batch fixed."""
    specs = model_inputs(Graph(model))
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise PtqError(f"synthetic data feeds single-input models; this one has inputs {names} (pass --data)")
    spec = specs[0]
    if spec.dtype.kind != "f":
        raise PtqError(f"synthetic data is floating point; input '{spec.name}' is {spec.dtype} (pass --data)")
    if len(spec.shape) < 2 or any(d is None for d in spec.shape[1:]):
        shown = tuple("?" if d is None else d for d in spec.shape)
        raise PtqError(f"input '{spec.name}' has shape {shown}; synthetic data needs every dim but the batch fixed")
    return spec


def bn_input_model(model: ModelProto, targets: list[BNTarget], input_name: str) -> ModelProto:
    """The part of the graph that computes the BatchNorm inputs, which become its outputs.

    Nodes after the last BatchNorm (classifier heads, shape arithmetic before a Flatten) never
    run, so they need no numpy implementation and cost no time.
    """
    needed = {t.tensor for t in targets}
    nodes = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    graph = helper.make_graph(
        nodes[::-1], model.graph.name or "bn_inputs",
        [i for i in model.graph.input if i.name == input_name],
        [helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(t.tensor for t in targets)],
        [t for t in model.graph.initializer if t.name in needed],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def bn_program(model: ModelProto | str | Path, dtype=None) -> tuple[Program, list[BNTarget], str]:
    """A numpy program for the BatchNorm inputs, the targets, and the name of the input it takes.

    Raises the executor's one-line PtqError for an op it does not implement.
    """
    model = _as_model(model)
    targets = bn_targets(model)
    name = synthetic_input(model).name
    return Program(bn_input_model(model, targets, name), dtype), targets, name


# --------------------------------------------------------------------------- #
# The objective and its gradient
# --------------------------------------------------------------------------- #


# The objective is written once, with array methods and operators only: numpy evaluates it here,
# and the jax backend traces the very same functions (bn_term_value, stacked_terms) to differentiate
# them. bn_term_grad is the numpy backend's hand-derived reverse of bn_term_value.


def _stat_gaps(x, target: BNTarget):
    mean, var = batch_stats(x)
    std = (var + target.epsilon) ** 0.5
    return mean - target.mean, std - target.std, std


def bn_term_value(x, target: BNTarget):
    """||mean_b - running_mean||^2 + ||std_b - running_std||^2 for one BatchNorm input, as an array
    scalar of x's kind (numpy or jax)."""
    d_mean, d_std, _ = _stat_gaps(x, target)
    return d_mean @ d_mean + d_std @ d_std


def stacked_terms(values, targets: list[BNTarget], size: int, count: int) -> list:
    """The BatchNorm loss of each run of ``size`` of the ``count`` samples whose BatchNorm inputs
    are ``values``: batches optimised together, each with its own statistics."""
    return [sum(bn_term_value(values[t.tensor][start:start + size], t) for t in targets)
            for start in range(0, count, size)]


def bn_term(x: np.ndarray, target: BNTarget) -> float:
    """:func:`bn_term_value` as a float."""
    return float(bn_term_value(x, target))


def bn_term_grad(x: np.ndarray, target: BNTarget) -> tuple[float, np.ndarray]:
    """:func:`bn_term` and its cotangent with respect to ``x``."""
    d_mean, d_std, std = _stat_gaps(x, target)
    # d std / d var = 1 / (2 std), so d/d var of d_std^2 is d_std / std.
    g = batch_stats_vjp(x, 2 * d_mean, d_std / std)
    return float(d_mean @ d_mean + d_std @ d_std), g


def bn_loss_and_grad(program: Program, targets: list[BNTarget], input_name: str, x: np.ndarray
                     ) -> tuple[float, np.ndarray]:
    """The BatchNorm statistics loss summed over ``targets``, and its gradient with respect to ``x``."""
    (loss,), g = stacked_loss_and_grad(program, targets, input_name, x, len(x))
    return loss, g


def stacked_loss_and_grad(program: Program, targets: list[BNTarget], input_name: str, x: np.ndarray,
                          size: int) -> tuple[list[float], np.ndarray]:
    """bn_loss_and_grad of each run of ``size`` samples of ``x`` (batches optimised together, each
    with its own statistics), from one recorded pass over all of them."""
    tape = program.record({input_name: x}, [input_name])
    starts = range(0, len(x), size)
    losses, seeds = [0.0] * len(starts), {}
    for tensor in dict.fromkeys(t.tensor for t in targets):
        # Popped so each activation is freed once its cotangent exists: the peak is one copy.
        value = tape.values.pop(tensor)
        seed = np.zeros_like(value)
        for target in (t for t in targets if t.tensor == tensor):
            for part, start in enumerate(starts):
                term, g = bn_term_grad(value[start:start + size], target)
                losses[part] += term
                seed[start:start + size] += g
        seeds[tensor] = seed
        del value
    return losses, tape.backward(seeds)[input_name]


def bn_loss_value(program: Program, targets: list[BNTarget], input_name: str, x: np.ndarray) -> float:
    """The BatchNorm statistics loss alone, from a forward pass that keeps nothing for a backward."""
    values = program.run({input_name: x})
    return float(stacked_terms(values, targets, len(x), len(x))[0])


def bn_loss(model: ModelProto | str | Path, inputs: np.ndarray, batch_size: int = 32) -> list[float]:
    """The BatchNorm statistics loss of any inputs (real data, say), one value per batch of ``batch_size``."""
    program, targets, name = bn_program(model)
    return [bn_loss_value(program, targets, name, inputs[i:i + batch_size])
            for i in range(0, len(inputs), batch_size)]


@dataclass(frozen=True)
class Objective:
    """The BatchNorm statistics loss of one model on one backend.

    ``losses_and_grad(x, size)``: the loss of each run of ``size`` samples of ``x`` and the
    gradient of their sum with respect to ``x``. ``losses(x, size)``: the losses alone.
    """

    backend: str  # "numpy" or "jax"
    losses_and_grad: Callable[[np.ndarray, int], tuple[list[float], np.ndarray]]
    losses: Callable[[np.ndarray, int], list[float]]


def _numpy_losses(program: Program, targets: list[BNTarget], input_name: str, x: np.ndarray, size: int
                  ) -> list[float]:
    return [bn_loss_value(program, targets, input_name, x[start:start + size]) for start in range(0, len(x), size)]


def _numpy_objective(model: ModelProto) -> Objective:
    fit = bn_program(model)
    return Objective("numpy", partial(stacked_loss_and_grad, *fit), partial(_numpy_losses, *fit))


def _jax_program():
    """The jax translation module, or None when jax is not installed."""
    try:
        from ..numeric import jax_program
    except ImportError:
        return None
    return jax_program


def _jax_objective(jax_program, model: ModelProto) -> Objective:
    targets = bn_targets(model)
    spec = synthetic_input(model)
    if spec.dtype != np.float32:
        raise PtqError(f"the jax backend computes in float32; input '{spec.name}' is {spec.dtype} "
                       "(use --synthetic-backend numpy)")
    graph = jax_program.JaxGraph(bn_input_model(model, targets, spec.name))
    step = jax_program.input_gradient(graph, spec.name, partial(stacked_terms, targets=targets))

    def losses(x: np.ndarray, size: int) -> list[float]:
        # The same compiled step as the fit's (its gradient unused) rather than a second compilation.
        return step(x, size)[0]

    return Objective("jax", step, losses)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise PtqError(f"synthetic data backend must be one of {', '.join(BACKENDS)} (got {backend!r})")


def bn_objective(model: ModelProto | str | Path, backend: str = "auto") -> Objective:
    """The BatchNorm loss of ``model`` on ``backend``: numpy, jax, or auto (jax when it is installed
    and implements every op the loss needs and the input is float32, numpy otherwise)."""
    _check_backend(backend)
    model = _as_model(model)
    jax_program = None if backend == "numpy" else _jax_program()
    if backend == "jax" and jax_program is None:
        raise PtqError("the jax backend needs jax: pip install 'ptqcli[jax]' (or use --synthetic-backend numpy)")
    if backend == "auto" and jax_program is not None:
        spec = synthetic_input(model)
        needed = bn_input_model(model, bn_targets(model), spec.name)
        if spec.dtype != np.float32 or jax_program.uncovered_ops(needed):
            jax_program = None
    return _numpy_objective(model) if jax_program is None else _jax_objective(jax_program, model)


def prior_loss_and_grad(x: np.ndarray, tv_weight: float, l2_weight: float) -> tuple[float, np.ndarray | None]:
    """Smoothness and size priors on the input: tv_weight x mean squared difference of neighbours
    along each spatial axis, plus l2_weight x mean(x^2).

    Means rather than sums so the weights do not depend on resolution or batch size, and the BN
    loss's gradient shrinks with the batch size in the same way.
    """
    if not tv_weight and not l2_weight:
        return 0.0, None
    loss, g = 0.0, np.zeros_like(x)
    if l2_weight:
        loss += l2_weight * float(np.mean(np.square(x, dtype=np.float64)))
        g += (2 * l2_weight / x.size) * x
    for axis in range(2, x.ndim) if tv_weight else ():
        if x.shape[axis] < 2:
            continue
        d = np.diff(x, axis=axis)
        loss += tv_weight * float(np.mean(np.square(d, dtype=np.float64)))
        dd = (2 * tv_weight / d.size) * d
        head = [slice(None)] * x.ndim
        tail = list(head)
        head[axis], tail[axis] = slice(None, -1), slice(1, None)
        g[tuple(head)] -= dd
        g[tuple(tail)] += dd
    return loss, g


# --------------------------------------------------------------------------- #
# Optimisation
# --------------------------------------------------------------------------- #


def fit_batch(objective: Objective, x: np.ndarray, iters: int, lr: float, tv_weight: float = 0.0,
              l2_weight: float = 0.0, report: Callable[[int, float], None] | None = None
              ) -> tuple[np.ndarray, float, float]:
    """Optimise one batch; returns it with its BatchNorm loss before the first and after the last step."""
    reports = None if report is None else [report]
    (x,), (initial,), (final,) = fit_batches(objective, [x], iters, lr, tv_weight, l2_weight, reports)
    return x, initial, final


def fit_batches(objective: Objective, xs: list[np.ndarray], iters: int, lr: float, tv_weight: float = 0.0,
                l2_weight: float = 0.0, reports: list[Callable[[int, float], None]] | None = None
                ) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Optimise batches of one size together: one forward and backward pass over all of them, each
    with its own BatchNorm statistics, loss, priors and (elementwise) Adam state, so each comes out
    as it would alone, at a fraction of the per-step overhead of small batches. Returns them with
    their losses before the first and after the last step."""
    size = len(xs[0])
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    state = adam_init(x)
    initial = None
    for it in range(1, iters + 1):
        losses, g = objective.losses_and_grad(x, size)
        for part, start in enumerate(range(0, len(x), size)):
            _, g_prior = prior_loss_and_grad(x[start:start + size], tv_weight, l2_weight)
            if g_prior is not None:
                g[start:start + size] += g_prior
            if reports is not None:
                reports[part](it, losses[part])
        initial = losses if initial is None else initial
        x, state = adam_step(x, g, state, lr)
    final = objective.losses(x, size)
    return [x[start:start + size] for start in range(0, len(x), size)], (final if initial is None else initial), final


def batch_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of batch ``index``: independent of every other batch, so batches can be
    skipped on resume without changing the ones after them."""
    return np.random.default_rng([seed, index])


def initial_batch(kind: str, seed: int, index: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The starting point of batch ``index``: N(0, 1) for bn and gaussian (so a bn batch is the
    gaussian batch it started from, optimised), U(-1, 1) for uniform."""
    rng = batch_rng(seed, index)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, shape).astype(dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


# Batches optimised together (fit_batches): consecutive ones of one size, GROUP_BATCHES at most,
# cut at multiples of GROUP_BATCHES so that a resumed run groups the rest as an uninterrupted one.
GROUP_BATCHES = 8


def _groups(planned: list[int], start: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for index in range(start, len(planned)):
        last = groups[-1] if groups else None
        if last and planned[last[0]] == planned[index] and index // GROUP_BATCHES == last[0] // GROUP_BATCHES:
            last.append(index)
        else:
            groups.append([index])
    return groups


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    return [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]


def steps_per_batch(kind: str, iters: int) -> int:
    """How many progress steps each batch reports: a progress bar's total is this times the batches."""
    return iters if kind == "bn" else 1


# --------------------------------------------------------------------------- #
# The resumable output file
# --------------------------------------------------------------------------- #


def _model_digest(model: ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def recipe(model: ModelProto, spec: InputSpec, kind: str, batch_size: int, iters: int, lr: float,
           seed: int, tv_weight: float, l2_weight: float, backend: str = "numpy") -> dict:
    """What the content of a batch depends on (besides its index and size). ``backend`` is the one
    that computed the gradients: the two round differently, so a file is resumed only on its own."""
    made = {"format": 1, "kind": kind, "seed": seed, "batch_size": batch_size, "input": spec.name,
            "sample_shape": list(spec.sample_shape()), "dtype": spec.dtype.str}
    if kind == "bn":
        made.update(model=_model_digest(model), iters=iters, lr=lr, tv_weight=tv_weight, l2_weight=l2_weight,
                    backend=backend)
    return made


def _read_recipe(npz) -> dict:
    made = json.loads(str(npz[RECIPE_KEY]))
    if made.get("kind") == "bn":
        made.setdefault("backend", "numpy")  # files from before the jax backend existed
    return made


def stored_backend(path: Path) -> str | None:
    """The backend that made the batches in ``path``, if it is a synthetic data file of kind bn."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _read_recipe(npz).get("backend")
    except (OSError, KeyError, ValueError):
        return None


def load_finished(path: Path, made: dict, planned: list[int]) -> list[SyntheticBatch]:
    """Batches already in ``path`` that this run would make identically: those made with the same
    recipe, in order, while their sizes match the planned ones."""
    if not path.exists():
        return []
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored_recipe = _read_recipe(npz)
            sizes, losses = npz[SIZES_KEY].tolist(), npz[LOSS_KEY]
            inputs = npz[made["input"]] if stored_recipe == made else None
    except (OSError, KeyError, ValueError) as exc:
        raise PtqError(f"{path.name} is not a synthetic data file to resume ({type(exc).__name__}); "
                       "delete it or choose another output") from None
    if inputs is None:
        raise PtqError(f"{path.name} was generated with other settings or another model; "
                       "delete it or choose another output")
    batches, start = [], 0
    for index, (size, want) in enumerate(zip(sizes, planned)):
        if size != want:
            break
        initial, final = (None if math.isnan(v) else float(v) for v in losses[index])
        batches.append(SyntheticBatch(index, inputs[start:start + size], initial, final, resumed=True))
        start += size
    return batches


def save_finished(path: Path, made: dict, batches: list[SyntheticBatch]) -> None:
    """Write every finished batch to ``path`` as a whole new file, replaced atomically.

    The input's array comes first: readers that count samples look at the first array.
    """
    losses = [[np.nan if b.initial_loss is None else b.initial_loss,
               np.nan if b.final_loss is None else b.final_loss] for b in batches]
    buffer = io.BytesIO()
    np.savez(buffer, **{
        made["input"]: np.concatenate([b.inputs for b in batches]),
        LOSS_KEY: np.asarray(losses, dtype=np.float64).reshape(-1, 2),
        SIZES_KEY: np.asarray([len(b.inputs) for b in batches], dtype=np.int64),
        RECIPE_KEY: np.asarray(json.dumps(made, sort_keys=True)),
    })
    write_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def _check_args(kind: str, num_samples: int, batch_size: int, iters: int, lr: float,
                tv_weight: float, l2_weight: float, backend: str) -> None:
    if kind not in KINDS:
        raise PtqError(f"synthetic data kind must be one of {', '.join(KINDS)} (got {kind!r})")
    _check_backend(backend)
    if num_samples < 1 or batch_size < 1:
        raise PtqError(f"synthetic data needs num_samples and batch_size >= 1 (got {num_samples}, {batch_size})")
    if iters < 0 or not lr > 0:
        raise PtqError(f"synthetic data needs iters >= 0 and lr > 0 (got {iters}, {lr})")
    if tv_weight < 0 or l2_weight < 0:
        raise PtqError(f"prior weights must be >= 0 (got tv {tv_weight}, l2 {l2_weight})")


def iter_generate(model: ModelProto | str | Path, kind: str = "bn", num_samples: int = 256,
                  batch_size: int = 32, iters: int = 500, lr: float = 0.1, seed: int = 0,
                  tv_weight: float = 0.0, l2_weight: float = 0.0, out_path: str | Path | None = None,
                  progress: ProgressFn | None = None, backend: str = "auto") -> Iterator[SyntheticBatch]:
    """Synthetic batches in turn, each written to ``out_path`` (if given) as soon as it is done.

    Batches already in ``out_path`` from an earlier run with the same settings are read back
    instead of being made again; under ``backend="auto"`` the rest are made on the backend that
    made those. A model with a fixed batch dimension still gets ``batch_size`` samples per
    optimised batch: both backends take any batch.
    """
    _check_args(kind, num_samples, batch_size, iters, lr, tv_weight, l2_weight, backend)
    model = _as_model(model)
    spec = synthetic_input(model)
    path = None if out_path is None else Path(out_path)
    if path is not None:
        check_writable(path)
        if backend == "auto" and kind == "bn" and path.exists():
            backend = stored_backend(path) or backend
    objective = bn_objective(model, backend) if kind == "bn" else None
    planned = batch_sizes(num_samples, batch_size)
    made = recipe(model, spec, kind, batch_size, iters, lr, seed, tv_weight, l2_weight,
                  objective.backend if objective else "numpy")
    finished = [] if path is None else load_finished(path, made, planned)
    last_step = steps_per_batch(kind, iters)
    for batch in finished:
        if progress is not None:
            progress(batch.index, last_step, batch.final_loss if batch.final_loss is not None else math.nan)
        yield batch
    for group in _groups(planned, len(finished)):
        xs = [initial_batch(kind, seed, index, (planned[index], *spec.sample_shape()), spec.dtype) for index in group]
        if objective is None:
            made_now = [SyntheticBatch(index, x, None, None) for index, x in zip(group, xs)]
            for index in group if progress is not None else ():
                progress(index, last_step, math.nan)
        else:
            reports = None if progress is None else [(lambda it, loss, i=index: progress(i, it, loss)) for index in group]
            xs, initial, final = fit_batches(objective, xs, iters, lr, tv_weight, l2_weight, reports)
            made_now = [SyntheticBatch(index, x, a, b) for index, x, a, b in zip(group, xs, initial, final)]
        finished.extend(made_now)
        if path is not None:
            save_finished(path, made, finished)
        yield from made_now


def generate(model: ModelProto | str | Path, kind: str = "bn", num_samples: int = 256, batch_size: int = 32,
             iters: int = 500, lr: float = 0.1, seed: int = 0, tv_weight: float = 0.0, l2_weight: float = 0.0,
             out_path: str | Path | None = None, progress: ProgressFn | None = None,
             backend: str = "auto") -> np.ndarray:
    """``num_samples`` calibration inputs in the model's input shape and dtype, without data.

    ``kind="bn"`` fits each batch of ``batch_size`` to the statistics of every BatchNormalization
    node with ``iters`` Adam steps of size ``lr``; ``"gaussian"`` and ``"uniform"`` are the plain
    noise baselines. ``model`` must be the model as exported, before BatchNorm folding. With
    ``out_path`` (.npz) every finished batch is saved (under the input's name, so the file is
    calibration data as it stands, with the per-batch losses beside it) and a rerun resumes from it.
    ``backend`` computes the gradients: numpy, jax or auto (see :func:`bn_objective`).
    """
    batches = iter_generate(model, kind, num_samples, batch_size, iters, lr, seed, tv_weight, l2_weight,
                            out_path, progress, backend)
    return np.concatenate([b.inputs for b in batches])
