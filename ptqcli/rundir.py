"""The run directory: what each stage leaves for the next, written atomically, and `Run`, the typed
context every stage that works on a run directory loads once."""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .calibrate.collect import Stats, load_stats
from .config import DataConfig, QuantConfig
from .errors import PtqError
from .files import write_atomic
from .graph import Graph, load_model, save_model, through_file
from .plan import Plan

FLOAT_MODEL = "model.float.onnx"
PLAN = "plan.json"
STATS = "stats.npz"
RUN_INFO = "run.json"
FIDELITY = "fidelity.json"
PARAMS = "params.npz"
MASKS = "masks.npz"
# The float weights an N:M mask was re-fitted to, kept because a learned rounding replaces them in the plan.
REFITS = "refits.npz"
# `ptq allocate`'s cache of measured per-layer damage.
SENSITIVITY = "sensitivity.json"
SYNTHETIC = "synthetic.npz"
# The calibrated plan that allocations start from (kept when `ptq allocate` first rewrites plan.json).
BASE_PLAN = "plan.base.json"


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


@contextmanager
def new_run_dir(path: str | os.PathLike) -> Iterator[Path]:
    """ensure_run_dir, removed again when the work that fills it fails, if it did not exist before:
    a refused command leaves nothing behind."""
    created = not Path(path).exists()
    p = ensure_run_dir(path)
    try:
        yield p
    except BaseException:
        if created:
            shutil.rmtree(p, ignore_errors=True)
        raise


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
    # Straight to the file: GPTQ's values of a language model are as large as its weights.
    write_atomic(path, lambda f: np.savez(f, **arrays))


def _params_path(run: Path, name: str) -> Path:
    """params.npz beside plan.json; params.base.npz beside plan.base.json."""
    return run / (PARAMS if name == PLAN else PARAMS.replace(".npz", name.removeprefix("plan").replace(".json", ".npz")))


def _as_text(binary, write) -> None:
    """`write` given a UTF-8 text view of the open binary file, left open for its owner to close."""
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")
    write(text)
    text.flush()
    text.detach()


def write_plan(run: Path, plan: Plan, name: str = PLAN) -> None:
    """plan.json (or another plan file), plus its params .npz for what is large: the values it
    replaces (learned and masked weights) and the scales of block-wise grids (Plan.arrays_apart)."""
    arrays = plan.arrays_apart()
    if arrays:
        write_npz(_params_path(run, name), arrays)
    else:
        _params_path(run, name).unlink(missing_ok=True)
    write_atomic(run / name, lambda f: _as_text(f, lambda text: plan.dump_json(text, include_values=False,
                                                                                grids_apart=True)))


def read_plan(run: Path, name: str = PLAN) -> Plan:
    params = {}
    if _params_path(run, name).is_file():
        with np.load(_params_path(run, name)) as stored:
            params = {k: stored[k] for k in stored.files}
    return Plan.from_json((run / name).read_text(), params).with_values(params)


def write_float_model(run: Path, model) -> None:
    # A large model's weights go beside it, tensor by tensor: serializing it whole would hold a
    # second copy of them in memory.
    save_model(model, run / FLOAT_MODEL, external=through_file(model))


def read_float_model(run: Path):
    return load_model(run / FLOAT_MODEL)


def read_masks(run: Path) -> dict[str, np.ndarray]:
    if not (run / MASKS).is_file():
        return {}
    with np.load(run / MASKS) as arrays:
        return {k: arrays[k].astype(bool) for k in arrays.files}


def read_refits(run: Path) -> dict[str, np.ndarray]:
    if not (run / REFITS).is_file():
        return {}
    with np.load(run / REFITS) as arrays:
        return {k: arrays[k] for k in arrays.files}


@dataclass(frozen=True)
class Run:
    """A run directory as the stages see it: the prepared float model, the current plan with its
    typed configs, the activation statistics, the N:M masks applied so far and the float weights
    re-fitted under them."""

    path: Path
    graph: Graph
    plan: Plan
    stats: Stats
    masks: dict[str, np.ndarray]
    refits: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def quant(self) -> QuantConfig:
        return self.plan.quant

    @property
    def data(self) -> DataConfig:
        """The calibration data; a synthetic run's samples are the ones calibration made here."""
        data = self.plan.data
        if data.path is None and data.synthetic is not None:
            return replace(data, path=str(self.path / SYNTHETIC))
        return data


def load_run(path: str | os.PathLike, plan_name: str = PLAN) -> Run:
    run = existing_run_dir(path)
    with np.load(run / STATS) as arrays:
        stats = load_stats(arrays)
    return Run(run, Graph(read_float_model(run)), read_plan(run, plan_name), stats, read_masks(run), read_refits(run))
