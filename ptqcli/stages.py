"""The pipeline's stages as plain functions over the run directory; the CLI only wraps these."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from . import __version__
from .calibrate.collect import collect, save_stats
from .calibrate.data import count_samples, iter_batches, model_inputs
from .calibrate.planner import build_plan
from .calibrate.select import select
from .config import DataConfig, QuantConfig, cpu_name, to_jsonable
from .errors import PtqError
from .export.fidelity import Fidelity, measure
from .export.qdq import export_qdq
from .files import check_writable
from .graph import Graph, file_sha256, load_model, save_model
from .plan import Plan
from .prepare import prepare
from . import rundir

# A progress reporter: given a description and a total (None if unknown), a context that yields
# an `advance(n)` callable. The CLI passes a rich one; library callers get silence by default.
Progress = Callable[[str, "int | None"], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def silent(description: str, total: int | None):
    yield lambda n: None


def load_prepared(model_path: str | Path) -> Graph:
    return prepare(load_model(model_path), source=str(model_path))


def calibrate(model_path: str | Path, quant: QuantConfig, data: DataConfig, run_dir: str | Path,
              progress: Progress = silent) -> Plan:
    """Prepare the model, observe activations on the data in one pass, write the plan."""
    if data.path is None:
        raise PtqError("calibration needs data: pass --data PATH")
    g = load_prepared(model_path)
    run = rundir.ensure_run_dir(run_dir)
    inputs = model_inputs(g)
    sel = select(g, quant)
    available = count_samples(data.path)
    total = min(data.num_samples, available) if available is not None else data.num_samples
    with progress("calibrating", total) as advance:
        batches = iter_batches(data.path, inputs, data, limit=data.num_samples)
        stats, seen = collect(g, sel.activations, batches, quant.bins, advance)
    if seen == 0:
        raise PtqError(f"no calibration samples could be read from {data.path}")
    extra = {"data": to_jsonable(data), "samples_seen": seen}
    plan = build_plan(g, sel, stats, quant, extra)
    rundir.write_float_model(run, g.model)
    rundir.write_npz(run / rundir.STATS, save_stats(stats))
    rundir.write_plan(run, plan)
    rundir.write_json(run / rundir.RUN_INFO, {
        "tool_version": __version__,
        "model": {"path": str(model_path), "sha256": file_sha256(model_path)},
        "cpu": cpu_name(),
        "samples_seen": seen,
    })
    return plan


def export(run_dir: str | Path, out_path: str | Path, eval_data: str | None = None, eval_samples: int = 1000,
           progress: Progress = silent) -> tuple[Plan, Fidelity | None]:
    """Write the QDQ model, then measure it against the float model on held-out data."""
    run = rundir.existing_run_dir(run_dir)
    check_writable(out_path)
    plan = rundir.read_plan(run)
    g = Graph(rundir.read_float_model(run))
    quantized = export_qdq(g, plan)
    save_model(quantized, out_path)
    fidelity = evaluate(g, quantized, plan, eval_data, eval_samples, progress)
    if fidelity is not None:
        rundir.write_json(run / rundir.FIDELITY, fidelity.to_dict())
    return plan, fidelity


def evaluate(g: Graph, quantized, plan: Plan, eval_data: str | None, eval_samples: int,
             progress: Progress = silent) -> Fidelity | None:
    """Held-out samples: --eval-data if given, else the calibration data past what calibration read."""
    data_cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.config["data"].items()})
    seen = int(plan.config.get("samples_seen", 0))
    if eval_data is not None:
        source, skip, held_out = eval_data, 0, True
    else:
        available = count_samples(data_cfg.path) if data_cfg.path and Path(data_cfg.path).exists() else None
        if available is None:
            return None
        held_out = available > seen
        source, skip = data_cfg.path, seen if held_out else 0
    inputs = model_inputs(g)
    with progress("measuring fidelity", eval_samples) as advance:
        batches = iter_batches(source, inputs, data_cfg, limit=eval_samples, skip=skip)
        return measure(g.model, quantized, plan, batches, held_out, advance)
