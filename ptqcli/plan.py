"""The Plan: every quantization decision for a model, as data that round-trips through JSON.

A Plan names tensors of the prepared float graph. Stages read a Plan and return a new one;
export turns it into a model. Its JSON form is versioned so that old run directories are refused
with a clear message instead of being misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, TextIO

import numpy as np

from .config import DataConfig, QuantConfig, from_mapping
from .errors import PtqError
from .formats import QuantSpec
from .quant import dequantize, quantize

PLAN_VERSION = 1
# "value": a float tensor the plan replaces without quantizing (a corrected bias that int32 cannot hold).
# constant: an operand of an elementwise op, on the activations' grid (ops.quantize_constants).
# embedding: a table only Gathers read, int8 with one scale per row (export/qdq.py gathers both).
ROLES = ("activation", "weight", "bias", "value", "constant", "embedding")
# The float-node reason of a layer `ptq allocate --max-drop` moved back to float.
MOVED_TO_FLOAT = "moved to float by `ptq allocate --max-drop`"
# Float nodes kept for these reasons read their inputs' float values, not the dequantized ones:
# between a DequantizeLinear and a QuantizeLinear, ORT quantizes a float Conv's or Gemm's weights
# itself (its WeightBiasQuantization pass), so a layer meant to run in float would not.
# The Mul that gives a smoothed activation's other readers (a residual Add) the original back: reading
# the codes would put the activation's rounding into the residual stream, and a DequantizeLinear in
# front of every such Mul.
RESTORES_SMOOTHED = "restores a smoothed activation for its float readers (the residual stream)"
# A shallow Conv on the model input (calibrate/select.float_stems).
STEM_REASON = ("a stem Conv with few input channels: ORT runs it faster in float than as QLinearConv, and the "
               "model input stays unrounded")
FLOAT_INPUT_REASONS = ("excluded by the recipe", MOVED_TO_FLOAT, RESTORES_SMOOTHED, STEM_REASON)

# Scales and zero points of more values than this are kept in the params file beside plan.json.
GRID_IN_JSON = 4096


def grid_keys(tensor: str) -> tuple[str, str]:
    """The params-file names of a tensor's scale and zero point."""
    return f"{tensor}#scale", f"{tensor}#zero_point"


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor is quantized: its format plus the fitted scale and zero point."""

    role: str
    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray
    # Where the range came from (observer name and the float range it chose), for the card.
    source: dict = field(default_factory=dict)
    # The float values to quantize instead of the model's own (a bias after bias correction).
    value: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise PtqError(f"unknown tensor role '{self.role}'")

    def on_grid(self, original: np.ndarray) -> np.ndarray:
        """The tensor as the quantized model computes with it, in float32: its own value (or the
        model's `original`) quantized and dequantized exactly as QuantizeLinear/DequantizeLinear do."""
        source = np.asarray(original if self.value is None else self.value, dtype=np.float32)
        source = source.reshape(np.shape(original))
        return dequantize(quantize(source, self.scale, self.zero_point, self.spec), self.scale, self.zero_point,
                          self.spec)

    def to_dict(self, include_value: bool = True, grid_apart: str | None = None) -> dict:
        """`grid_apart`: the scale and zero point are the arrays `grid_keys(grid_apart)` of the
        params file instead of JSON lists (see Plan.arrays_apart)."""
        scale_key, zero_key = grid_keys(grid_apart) if grid_apart is not None else (None, None)
        return {
            "role": self.role,
            "spec": self.spec.to_dict(),
            # float32 -> Python float is exact, and the JSON text of a double round-trips exactly.
            "scale": {"params": scale_key} if scale_key
            else np.asarray(self.scale, dtype=np.float32).ravel().astype(float).tolist(),
            "scale_shape": list(np.shape(self.scale)),
            "zero_point": {"params": zero_key} if zero_key
            else np.asarray(self.zero_point).ravel().astype(float if self.spec.float_zero else int).tolist(),
            "source": self.source,
            **({} if self.value is None or not include_value
               else {"value": np.asarray(self.value, dtype=np.float32).ravel().astype(float).tolist()}),
        }

    @staticmethod
    def from_dict(d: dict, arrays: Mapping[str, np.ndarray] | None = None) -> "TensorQuant":
        """`arrays`: the params file, where a large plan keeps scales and zero points."""
        shape = tuple(d.get("scale_shape", []))
        value = None if d.get("value") is None else np.asarray(d["value"], dtype=np.float32)
        spec = QuantSpec.from_dict(d["spec"])

        def read(field: str):
            kept = d[field]
            if not isinstance(kept, dict):
                return kept
            if arrays is None or kept.get("params") not in arrays:
                raise KeyError(f"{field} {kept.get('params')!r} (the params file beside plan.json lacks it)")
            return arrays[kept["params"]]

        return TensorQuant(
            role=d["role"],
            spec=spec,
            scale=np.asarray(read("scale"), dtype=np.float32).reshape(shape),
            zero_point=np.asarray(read("zero_point"), dtype=np.float32 if spec.float_zero else np.int64).reshape(shape),
            source=dict(d.get("source", {})),
            value=value,
        )


@dataclass(frozen=True)
class Layer:
    """A quantized compute node: which tensors feed it, for bias quantization and reports."""

    node: str
    op_type: str
    activation: str | None
    weight: str | None
    bias: str | None
    output: str
    # Further constant weights quantized with `weight` (a recurrent layer's R).
    extra_weights: tuple[str, ...] = ()

    @property
    def weights(self) -> tuple[str, ...]:
        return tuple(w for w in (self.weight, *self.extra_weights) if w is not None)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.extra_weights:
            d["extra_weights"] = list(self.extra_weights)
        else:
            del d["extra_weights"]  # plans of layers without them read as before
        return d

    @staticmethod
    def from_dict(d: dict) -> "Layer":
        return Layer(**{k: d.get(k) for k in ("node", "op_type", "activation", "weight", "bias", "output")},
                     extra_weights=tuple(d.get("extra_weights", ())))


@dataclass(frozen=True)
class Plan:
    tensors: dict[str, TensorQuant]
    layers: list[Layer]
    float_nodes: dict[str, str]  # node name -> why it stays in float
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION
    # Layers whose inputs are binarized: node name -> the per-channel mean subtracted first
    # (signs of a post-ReLU tensor would all be +1 without it).
    binary_inputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def quant(self) -> QuantConfig:
        """The quantization config the plan was made with, typed (the JSON holds its record)."""
        return from_mapping(QuantConfig, self.config["quant"], "plan.json quant config")

    @property
    def data(self) -> DataConfig:
        """Where its calibration data came from, typed."""
        return from_mapping(DataConfig, self.config["data"], "plan.json data config")

    @property
    def samples_seen(self) -> int:
        return int(self.config.get("samples_seen", 0))

    def reads_float_inputs(self, node: str) -> bool:
        """A float node that reads its inputs before their QuantizeLinear (see FLOAT_INPUT_REASONS)."""
        return self.float_nodes.get(node) in FLOAT_INPUT_REASONS

    def with_tensor(self, name: str, tq: TensorQuant) -> "Plan":
        return replace(self, tensors={**self.tensors, name: tq})

    def of_role(self, role: str) -> dict[str, TensorQuant]:
        return {k: v for k, v in self.tensors.items() if v.role == role}

    def values(self) -> dict[str, np.ndarray]:
        """Tensors whose values the plan replaces (corrected biases, learned weights)."""
        return {k: v.value for k, v in self.tensors.items() if v.value is not None}

    def grids_apart(self) -> list[str]:
        """Tensors whose scales and zero points are kept out of the JSON (a language model's block
        scales run to millions: as JSON text they took seconds to write and to read back)."""
        # A key that is also a tensor's name would be read back as that tensor's value.
        return [k for k, v in self.tensors.items()
                if np.size(v.scale) > GRID_IN_JSON and not self.tensors.keys() & set(grid_keys(k))]

    def arrays_apart(self) -> dict[str, np.ndarray]:
        """What the params file beside the JSON holds: replaced values by tensor name, and the
        grids of `grids_apart` under `grid_keys`."""
        arrays = self.values()
        for name in self.grids_apart():
            scale_key, zero_key = grid_keys(name)
            arrays[scale_key] = np.asarray(self.tensors[name].scale)
            arrays[zero_key] = np.asarray(self.tensors[name].zero_point)
        return arrays

    def to_json(self, include_values: bool = True) -> str:
        """`include_values=False` leaves replaced values out (they go to an .npz beside the JSON)."""
        return json.dumps(self._doc(include_values), indent=1, sort_keys=False)

    def dump_json(self, out: TextIO, include_values: bool = True, grids_apart: bool = False) -> None:
        """to_json written to `out` as it is encoded. With `grids_apart` the large grids are
        references to the params file (arrays_apart)."""
        json.dump(self._doc(include_values, set(self.grids_apart()) if grids_apart else set()), out, indent=1,
                  sort_keys=False)
        out.write("\n")

    def _doc(self, include_values: bool, grids_apart: set[str] = frozenset()) -> dict:
        return {
            "version": self.version,
            "config": self.config,
            "notes": self.notes,
            "layers": [layer.to_dict() for layer in self.layers],
            "float_nodes": self.float_nodes,
            "tensors": {k: v.to_dict(include_values, k if k in grids_apart else None) for k, v in self.tensors.items()},
            "binary_inputs": {k: np.asarray(v, dtype=np.float32).astype(float).tolist()
                              for k, v in self.binary_inputs.items()},
        }

    def with_values(self, values: dict[str, np.ndarray]) -> "Plan":
        tensors = {k: replace(v, value=values[k]) if k in values else v for k, v in self.tensors.items()}
        return replace(self, tensors=tensors)

    @staticmethod
    def from_json(text: str, arrays: Mapping[str, np.ndarray] | None = None) -> "Plan":
        """The plan of `text`; `arrays` is its params file (arrays_apart), when it has one."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PtqError(f"plan.json is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        version = doc.get("version") if isinstance(doc, dict) else None
        if version != PLAN_VERSION:
            raise PtqError(f"plan.json has version {version!r}; this ptqcli reads version {PLAN_VERSION}")
        try:
            return Plan(
                tensors={k: TensorQuant.from_dict(v, arrays) for k, v in doc["tensors"].items()},
                layers=[Layer.from_dict(d) for d in doc["layers"]],
                float_nodes=dict(doc["float_nodes"]),
                config=dict(doc["config"]),
                notes=list(doc.get("notes", [])),
                binary_inputs={k: np.asarray(v, dtype=np.float32) for k, v in doc.get("binary_inputs", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PtqError(f"plan.json is malformed: {type(exc).__name__}: {exc}") from None
