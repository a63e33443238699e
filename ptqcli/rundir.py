"""The run directory: what each stage leaves for the next, written atomically."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import PtqError
from .files import write_atomic
from .graph import load_model, save_model
from .plan import Plan

FLOAT_MODEL = "model.float.onnx"
PLAN = "plan.json"
STATS = "stats.npz"
RUN_INFO = "run.json"
FIDELITY = "fidelity.json"
PARAMS = "params.npz"


def ensure_run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PtqError(f"run directory path exists and is not a directory: {p}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PtqError(f"cannot create run directory {p}: {exc.strerror}") from None
    if not os.access(p, os.W_OK):
        raise PtqError(f"run directory is not writable: {p}")
    return p


def existing_run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not (p / PLAN).is_file() or not (p / FLOAT_MODEL).is_file():
        raise PtqError(f"{p} is not a run directory (run `ptq calibrate MODEL -o {p}` first)")
    return p


def write_json(path: Path, doc: dict) -> None:
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PtqError(f"cannot read {path}: {exc}") from None


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def write_plan(run: Path, plan: Plan) -> None:
    """plan.json, plus params.npz for the values it replaces (learned weights can be large)."""
    values = plan.values()
    if values:
        write_npz(run / PARAMS, values)
    else:
        (run / PARAMS).unlink(missing_ok=True)
    write_atomic(run / PLAN, (plan.to_json(include_values=False) + "\n").encode())


def read_plan(run: Path) -> Plan:
    plan = Plan.from_json((run / PLAN).read_text())
    if (run / PARAMS).is_file():
        with np.load(run / PARAMS) as params:
            plan = plan.with_values({k: params[k] for k in params.files})
    return plan


def write_float_model(run: Path, model) -> None:
    save_model(model, run / FLOAT_MODEL)


def read_float_model(run: Path):
    return load_model(run / FLOAT_MODEL)
