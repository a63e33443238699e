"""Typed, validated configuration. The CLI and recipe files both produce these dataclasses."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import PtqError
from .formats import parse_weight_format

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


EMBEDDING_CHOICES = ("int8", "int4", "float", "tied")


class ActFormat(str, Enum):
    uint8 = "uint8"
    int8 = "int8"
    # 16-bit QDQ for runtimes with int16 kernels (NPUs); ORT's CPU kernels take 8 bits only.
    int16 = "int16"
    # Quantized at run time per tensor (DynamicQuantizeLinear + MatMulInteger): no calibration.
    dynamic = "dynamic"
    none = "none"


class Method(str, Enum):
    minmax = "minmax"
    percentile = "percentile"
    mse = "mse"
    entropy = "entropy"


class WeightMethod(str, Enum):
    minmax = "minmax"
    mse = "mse"


class Rounding(str, Enum):
    # Resolved when calibration starts (stages.resolved_rounding): layer-wise below 8 bits with data.
    auto = "auto"
    nearest = "nearest"
    adaround = "adaround"
    adaquant = "adaquant"
    gptq = "gptq"


class Granularity(str, Enum):
    channel = "channel"
    tensor = "tensor"


class ReduceRange(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"




@dataclass(frozen=True)
class DataConfig:
    """Where calibration samples come from and how images become tensors."""

    path: str | None = None
    num_samples: int = 256
    batch_size: int = 16
    # Images: resize the shorter side, centre-crop to the model's input size, then (pixel - mean) / std
    # on 0..255 values. `resize` 0 means "resize straight to the input size".
    resize: int = 0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (255.0,)
    layout: str = "auto"  # auto | NCHW | NHWC
    color: str = "auto"  # auto | rgb | bgr | gray
    # Data-free calibration: bn (fitted to the model's BatchNorm statistics), gaussian, uniform.
    synthetic: str | None = None
    synthetic_iters: int = 500
    # What computes the gradients of --synthetic bn: auto (jax when it is installed and covers the
    # model, else numpy), numpy or jax.
    synthetic_backend: str = "auto"
    # Streaming models: "OUTPUT=INPUT" pairs. Each data file is one stream of consecutive steps; a
    # step's INPUT is the float model's OUTPUT of the step before (the file's value at the first).
    feedback: tuple[str, ...] = ()
    # Every data file is one complete feed, as given: no input is split into samples or batched
    # (time-major sequences [T, N, F] whose batch the signature does not name, odd signatures).
    whole_feeds: bool = False

    def feedback_pairs(self) -> dict[str, str]:
        """{input: the output fed back into it}."""
        return {i.strip(): o.strip() for o, i in (pair.split("=") for pair in self.feedback)}

    def __post_init__(self) -> None:
        if isinstance(self.feedback, str):
            object.__setattr__(self, "feedback", tuple(v.strip() for v in self.feedback.split(",") if v.strip()))
        for pair in self.feedback:
            if pair.count("=") != 1 or not all(side.strip() for side in pair.split("=")):
                raise PtqError(f"--feedback takes OUTPUT=INPUT pairs, comma-separated (got {pair!r})")
        if self.num_samples < 1:
            raise PtqError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.batch_size < 1:
            raise PtqError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.layout not in ("auto", "NCHW", "NHWC"):
            raise PtqError(f"--layout must be auto, NCHW or NHWC (got {self.layout})")
        if self.color not in ("auto", "rgb", "bgr", "gray"):
            raise PtqError(f"--color must be auto, rgb, bgr or gray (got {self.color})")
        if any(s == 0 for s in self.std):
            raise PtqError("--std values must be non-zero")
        if self.synthetic not in (None, "bn", "gaussian", "uniform"):
            raise PtqError(f"--synthetic must be bn, gaussian or uniform (got {self.synthetic})")
        if self.synthetic_backend not in ("auto", "numpy", "jax"):
            raise PtqError(f"--synthetic-backend must be auto, numpy or jax (got {self.synthetic_backend})")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how."""

    weights: str = "int8"
    # Binary/ternary networks keep their first and last layers at int8 (the usual practice);
    # None means: do so for binary and ternary weights only.
    first_last_int8: bool | None = None
    # Remove the output mean shift weight quantization causes; None: on below 8-bit integers.
    bias_correction: bool | None = None
    rounding: Rounding = Rounding.auto
    # Steps per layer. On EfficientNet-Lite0 W4A8 (256 samples) 200 steps gave 87.4% top-1 and 95.2%
    # agreement with float, 1,000 steps 86.4% and 95.8% in three times as long.
    rounding_iters: int = 200
    rounding_samples: int = 256
    acts: ActFormat = ActFormat.uint8
    granularity: Granularity = Granularity.channel
    act_symmetric: bool = False
    method: Method = Method.minmax
    weight_method: WeightMethod = WeightMethod.minmax
    percentile: float = 99.999
    reduce_range: ReduceRange = ReduceRange.auto
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    # Per-layer weight formats ({node name: format}, a recipe's [quant.layer_weights] table).
    layer_weights: dict = field(default_factory=dict)
    # Layers kept on a wider integer grid: first, last, lm_head or node names, each =BITS (default 8).
    keep: tuple[str, ...] = ()
    # Layers whose inputs are binarized too (fully binary layers): node names, or "all" for every
    # layer with binary weights except the first and last.
    binary_acts: tuple[str, ...] = ()
    bins: int = 4096
    seed: int = 0
    # An activation that feeds no Conv/Gemm/MatMul stays in float when quantizing it alone costs
    # more than this output error (squared error over signal power; calibrate/settle.py). None:
    # quantize every candidate, as before this was measured.
    act_damage_limit: float | None = 3e-4
    act_damage_samples: int = 16
    # SmoothQuant on normalized activations read by GEMMs (calibrate/smooth.py); the loss that
    # picks each tensor's strength runs on the activation rows of this many samples.
    smooth: bool = True
    # The same for Conv inputs written by a Mul by a constant (the end of a hard-swish): evens out
    # depthwise-separable CNNs' channels, but the hard-swish before each smoothed Conv input then
    # runs in float (smooth.float_tails), which costs speed: off unless asked.
    smooth_convs: bool = False
    # A stem Conv too shallow for ORT's integer kernel to pay (calibrate/select.float_stems) stays float.
    float_stem: bool = True
    # Embedding tables (a float table that only Gathers read by id): int8 with one scale per row,
    # int4 in blocks along each row (GatherBlockQuantized), left float, or tied: a table that is the
    # transpose of a block-wise MatMul weight (an output projection sharing the token embeddings)
    # takes that weight's grid and, where the weight is exported as MatMulNBits, its stored codes.
    embeddings: str = "int8"
    smooth_samples: int = 16
    # Block-wise weight scales for MatMul/Gemm layers (blocks along the input channels, as
    # MatMulNBits takes them); None: one scale per output channel.
    block_size: int | None = None
    # Weights on a symmetric grid; False gives each channel or block a zero point too.
    weight_symmetric: bool = True
    # MatMulNBits compute type (0: as the input; 4: int8 activations, ORT's fastest CPU path).
    accuracy_level: int = 4
    # Weight-only block-wise MatMuls: unrounded float zero points (implies zero points).
    float_zero_points: bool = False
    # GPTQ: input channels in order of decreasing Hessian diagonal (static block scales). On
    # SmolLM2-135M int4 it cut the perplexity rise from +14.4% to +9.8% (g32) and +27.3% to +18.0% (g128).
    act_order: bool = True

    def __post_init__(self) -> None:
        parse_weight_format(self.weights)
        for name, enum in (("acts", ActFormat), ("method", Method),
                           ("weight_method", WeightMethod), ("rounding", Rounding),
                           ("granularity", Granularity), ("reduce_range", ReduceRange)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value.value if isinstance(value, Enum) else value))
            except ValueError:
                choices = ", ".join(e.value for e in enum)
                raise PtqError(f"{name} must be one of {choices} (got {value!r})") from None
        if not 50.0 < self.percentile <= 100.0:
            raise PtqError(f"percentile must be in (50, 100] (got {self.percentile})")
        if self.rounding_iters < 1 or self.rounding_samples < 1:
            raise PtqError("rounding_iters and rounding_samples must be at least 1")
        if isinstance(self.layer_weights, (list, tuple)):  # a card's recipe stores pairs
            object.__setattr__(self, "layer_weights", {str(k): str(v) for k, v in self.layer_weights})
        if not isinstance(self.layer_weights, dict):
            raise PtqError("layer_weights must be a table of node name = weight format")
        for fmt in self.layer_weights.values():
            parse_weight_format(fmt)
        if isinstance(self.binary_acts, str):
            object.__setattr__(self, "binary_acts", tuple(n.strip() for n in self.binary_acts.split(",") if n.strip()))
        if "all" in self.binary_acts and len(self.binary_acts) > 1:
            raise PtqError("binary_acts is either 'all' or a list of node names, not both")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise PtqError(f"--embeddings takes {', '.join(EMBEDDING_CHOICES)} (got {self.embeddings})")
        if self.act_damage_limit is not None and not self.act_damage_limit >= 0:
            raise PtqError(f"act_damage_limit must be a non-negative number (got {self.act_damage_limit})")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise PtqError(f"block size must be a power of two of at least 16 (got {self.block_size})")
        if self.float_zero_points:
            if self.block_size is None or self.acts.value != "none":
                raise PtqError("--float-zero-points is for weight-only block-wise MatMuls (MatMulNBits): "
                               "give --block-size and --acts none")
            object.__setattr__(self, "weight_symmetric", False)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PtqError(f"accuracy_level must be 0-4 (got {self.accuracy_level})")
        if self.smooth_samples < 1:
            raise PtqError("smooth_samples must be at least 1")
        if self.act_damage_samples < 1:
            raise PtqError("act_damage_samples must be at least 1")
        if self.bins < 256 or self.bins % 4:
            raise PtqError(f"bins must be a multiple of 4 and at least 256 (got {self.bins})")

    @property
    def static_acts(self) -> bool:
        """Activations quantized with scales fixed at calibration."""
        return self.acts.value in ("uint8", "int8", "int16")

    @property
    def act_bits(self) -> int:
        return 16 if self.acts.value == "int16" else 8

    @property
    def weight_bits(self) -> int:
        return parse_weight_format(self.weights)[1]

    @property
    def weight_scheme(self) -> str:
        return parse_weight_format(self.weights)[0]

    @property
    def corrects_bias(self) -> bool:
        if self.bias_correction is None:
            # (auto is resolved when calibration starts; a plan built without that rounds to nearest.)
            # AdaRound/AdaQuant fit each layer to inputs from the already-quantized prefix, which
            # removes the mean shift too: correcting it again measurably hurts (bench/results/aimet_adaround.md).
            if self.rounding not in (Rounding.nearest, Rounding.auto):
                return False
            return self.weight_scheme != "int" or self.weight_bits < 8
        return self.bias_correction

    @property
    def keeps_first_last_int8(self) -> bool:
        if self.first_last_int8 is None:
            return self.weight_scheme in ("binary", "ternary")
        return self.first_last_int8

    def resolved_reduce_range(self) -> bool:
        if self.reduce_range is ReduceRange.auto:
            return cpu_needs_reduce_range()
        return self.reduce_range is ReduceRange.on


def cpu_needs_reduce_range() -> bool:
    """True where ORT's int8 kernels saturate with full-range weights (x86 without VNNI)."""
    from .runtime import int8_kernels_saturate

    return int8_kernels_saturate()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_jsonable(cfg: Any) -> dict:
    def convert(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, tuple):
            return list(v)
        return v

    return {k: convert(v) for k, v in asdict(cfg).items()}


def from_mapping(cls, mapping: dict, where: str):
    """Build a config dataclass from a dict (a recipe section), refusing unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise PtqError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}
    switches = {f.name for f in fields(cls) if str(f.type).replace(" ", "") in ("bool", "bool|None", "Optional[bool]")}
    for key in sorted(switches & set(values)):
        if values[key] is not None and not isinstance(values[key], bool):
            raise PtqError(f"{where}: {key} must be true or false (got {values[key]!r})")
    try:
        return cls(**values)
    except TypeError as exc:
        raise PtqError(f"{where}: {exc}") from None


def read_toml(p: Path, what: str) -> dict:
    if not p.is_file():
        raise PtqError(f"{what} file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PtqError(f"{what} {p} is not valid TOML: {exc}") from None


def load_toml_table(path: str, table: str) -> dict:
    return dict(read_toml(Path(path), "limits").get(table, {}))


def merge(cls, recipe_section: dict, overrides: dict, where: str):
    """Recipe values first, then every CLI option the user actually passed."""
    merged = {**recipe_section, **{k: v for k, v in overrides.items() if v is not None}}
    return from_mapping(cls, merged, where)


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class RunInfo:
    """Provenance stored with every run directory."""

    model_path: str
    model_sha256: str
    tool_version: str
    quant: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
