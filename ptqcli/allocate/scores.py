"""What `ptq allocate --max-drop` holds to: a score of the quantized model's outputs against the float
model's, higher is better, and the drop is score(float, float) - score(float, quantized).

- With labels: top-1 accuracy in percent on the first output, so the drop is float accuracy minus
  quantized accuracy, in points.
- Without: the mean over samples of the cosine between float and quantized outputs (averaged over
  the float outputs), so the drop is 1 - mean cosine.
- `--metric module:function` (or `path/to/file.py:function`): the user's own
  function(float_outputs, quant_outputs) -> float, each a dict of output name -> array over all the
  evaluation samples (first axis).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import PtqError
from ..metrics import sample_cosines, top1

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Score:
    description: str  # what is measured, on which outputs
    unit: str  # how a drop reads: "points", "" (a plain number)
    score: Callable[[Outputs, Outputs], float]

    def drop_against(self, reference: Outputs) -> Callable[[Outputs], float]:
        """drop(quantized outputs) relative to the float outputs `reference`."""
        best = self.score(reference, reference)
        return lambda quantized: best - self.score(reference, quantized)

    def describe(self, drop: float) -> str:
        return f"{drop:.4g}{' ' + self.unit if self.unit else ''}"


def accuracy(labels: np.ndarray, output: str) -> Score:
    labels = np.asarray(labels).reshape(-1)

    def score(_: Outputs, quantized: Outputs) -> float:
        return 100.0 * float(np.mean(top1(quantized[output]) == labels))

    return Score(f"top-1 accuracy on the labels (output {output}); drop in points", "points", score)


def cosine(outputs: list[str]) -> Score:
    def score(reference: Outputs, quantized: Outputs) -> float:
        return float(np.mean([np.mean(sample_cosines(reference[o], quantized[o])) for o in outputs]))

    return Score(f"1 - mean cosine to float (output{'s' if len(outputs) > 1 else ''} {', '.join(outputs)}"
                 f"{', averaged' if len(outputs) > 1 else ''})", "", score)


def user_metric(spec: str) -> Score:
    """The function `spec` names, checked to import; its calls checked to return a finite number."""
    fn = load_metric(spec)

    def score(reference: Outputs, quantized: Outputs) -> float:
        try:
            value = fn(_read_only(reference), _read_only(quantized))
        except Exception as exc:  # the user's code: any failure is theirs to see in one line
            raise PtqError(f"--metric {spec} raised {type(exc).__name__}: {exc}") from None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise PtqError(f"--metric {spec} returned {type(value).__name__}, not a number") from None
        if not math.isfinite(value):
            raise PtqError(f"--metric {spec} returned {value}; it must be finite")
        return value

    return Score(f"--metric {spec} (higher is better); drop = {spec}(float, float) - {spec}(float, quantized)", "",
                 score)


def load_metric(spec: str) -> Callable:
    """`module:function` (importable from the current directory too) or `path/to/file.py:function`."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise PtqError(f"--metric takes module:function or path/to/file.py:function (got {spec!r})")
    try:
        module = _module_from_file(Path(where)) if where.endswith(".py") else _module_from_path(where)
    except PtqError:
        raise
    except Exception as exc:  # a module that does not import, whatever it raises on the way
        raise PtqError(f"--metric {spec}: cannot import {where}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PtqError(f"--metric {spec}: {where} has no function {name}")
    return fn


def _module_from_file(path: Path):
    if not path.is_file():
        raise PtqError(f"--metric: file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"ptq_metric_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module_from_path(name: str):
    """An installed module, or one in the current directory (which the console script's sys.path
    lacks)."""
    here = str(Path.cwd())
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(here)


def _read_only(outputs: Outputs) -> Outputs:
    """Views the user's function cannot write through: the float outputs are reused for every plan."""
    views = {}
    for k, v in outputs.items():
        view = v.view()
        view.flags.writeable = False
        views[k] = view
    return views
