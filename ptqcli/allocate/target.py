"""`ptq allocate --max-drop P`: the fewest layers or activations moved back to float so that the
quantized model stays within P of the float model on the user's measure (allocate/scores.py).

Every plan the search tries (allocate/fallback.py) is measured as deployed: exported as `ptq export`
writes it by default and run in ONNX Runtime with default session options, on the same evaluation samples, against float outputs
computed once. The result is written as the run's plan; the base plan stays in plan.base.json, so
the fallback can be redone with another target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from onnx import ModelProto

from .. import rundir
from ..calibrate.data import Batch, iter_batches, model_inputs
from ..errors import PtqError
from ..export import container
from ..plan import Plan
from ..progress import Progress, silent
from ..rundir import Run
from ..runtime import run_session, session, tensor_outputs
from ..stages import eval_source
from .fallback import KINDS, PROOF_BUDGET, Moves, Search, candidates, check_destination, fewest_moves, moved_to
from .scores import Outputs, Score, accuracy, cosine, user_metric
from .stage import keep_base, load_base

FALLBACK = "fallback.json"


@dataclass(frozen=True)
class Fallback:
    plan: Plan
    search: Search
    score: Score
    record: dict  # what the plan's config holds under "fallback"


def fall_back(run_dir: str | Path, target: float, eval_data: str | None, eval_samples: int,
              metric: str | None = None, kinds: tuple[str, ...] = KINDS, proof_evals: int = PROOF_BUDGET,
              progress: Progress = silent, destination: str = "float") -> Fallback:
    """Search, then write the plan, plan.base.json (if not yet kept) and fallback.json; nothing is
    written when the metric fails or no plan meets the target."""
    custom = user_metric(metric) if metric else None  # a metric that does not import fails before any work
    check_destination(destination)
    run = load_base(run_dir)
    items = candidates(run.plan, kinds)
    batches, evaluation = evaluation_batches(run, eval_data, eval_samples)
    reference = outputs_of(run.graph.model, batches)
    score = custom or default_score(reference, labels_of(batches), run.graph.output_names)
    drop = score.drop_against(reference)

    def moved(moves: Moves) -> Plan:
        return moved_to(run.plan, moves, destination, run.graph.constant)

    def drop_of(moves: Moves) -> float:
        return drop(outputs_of(deployed(run, moved(moves)), batches))

    search = fewest_moves(items, drop_of, target, progress, proof_evals, score.describe)
    record = {**fallback_record(search, score, target, evaluation), "to": destination}
    result = moved(search.moved)
    plan = replace(result, config={**result.config, "fallback": record})
    keep_base(run)
    rundir.write_plan(run.path, plan)
    ranking = sorted(search.harm.items(), key=lambda kv: -kv[1])
    rundir.write_json(run.path / FALLBACK, {**record, "candidates": [{**m.to_dict(), "harm": h} for m, h in ranking]})
    return Fallback(plan, search, score, record)


def evaluation_batches(run: Run, eval_data: str | None, eval_samples: int) -> tuple[list[Batch], dict]:
    """The evaluation samples, held in memory (every plan runs on them), and where they came from."""
    source, skip, held_out = eval_source(run.plan, eval_data, run.graph)
    if source is None:
        raise PtqError("--max-drop needs evaluation data: pass --eval-data")
    batches = list(iter_batches(source, model_inputs(run.graph), run.plan.data, limit=eval_samples, skip=skip,
                                 model=run.graph.model))
    if not batches:
        raise PtqError(f"no evaluation samples could be read from {source}")
    samples = sum(b.size for b in batches)
    return batches, {"source": str(source), "samples": samples, "held_out": held_out}


def fallback_record(search: Search, score: Score, target: float, evaluation: dict) -> dict:
    """What the plan's config keeps under "fallback", for the card and for reports."""
    return {
        "target": target, "measure": score.description, "unit": score.unit, "evaluation": evaluation,
        "drop_before": search.drop_before, "drop_after": search.drop_after,
        "moved": [{**m.to_dict(), "harm": search.harm[m]} for m in search.moved],
        "evaluations": search.evaluations, "proven_fewest": search.proven_fewest,
    }


def deployed(run: Run, plan: Plan) -> ModelProto:
    """The QDQ model `ptq export` writes by default, weight codes in the container ORT's integer
    kernels take (export/container.py)."""
    return container.export(run.graph, plan)[0]


def default_score(reference: Outputs, labels: np.ndarray | None, output_names: list[str]) -> Score:
    """Accuracy on the labels when the data has them, else the cosine of the float outputs."""
    if labels is not None:
        return accuracy(labels, output_names[0])
    floating = [name for name in output_names if reference[name].dtype.kind == "f"]
    if not floating:
        raise PtqError("the model has no float output to compare with cosine; give --metric or labelled data")
    return cosine(floating)


def outputs_of(model: ModelProto, batches: list[Batch]) -> Outputs:
    """Every graph output over all the batches, from a session with default options (ORT's fusions
    and integer kernels, as the model is deployed)."""
    sess = session(model)
    names = tensor_outputs(sess)
    runs = [run_session(sess, names, b.feeds) for b in batches]
    try:
        return {name: np.concatenate([values[i] for values in runs]) for i, name in enumerate(names)}
    except ValueError:
        raise PtqError("the model's outputs change shape from batch to batch; pad the evaluation data to one "
                       "shape") from None


def labels_of(batches: list[Batch]) -> np.ndarray | None:
    if any(b.labels is None for b in batches):
        return None
    return np.concatenate([b.labels.reshape(-1) for b in batches])
