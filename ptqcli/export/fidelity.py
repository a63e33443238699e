"""How close the quantized model is to the float one, measured in ONNX Runtime on held-out data.

End-to-end numbers come from the quantized model as users deploy it: default session options,
so ORT's integer kernels (QLinearConv, ...) run where it fuses them. Per-layer SQNR needs the
layer outputs exposed, which blocks those fusions, so it is measured on the emulated path and
labelled so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
from onnx import ModelProto

from ..calibrate.data import Batch
from ..nativelib import OPERATORS
from ..metrics import as_probs, kl, top1
from ..plan import Plan
from ..runtime import optimized_op_counts, session, with_outputs

INTEGER_KERNELS = OPERATORS + ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd",
                    "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
                    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax")


@dataclass
class _Running:
    """Streaming sums for one compared tensor."""

    signal: float = 0.0
    noise: float = 0.0
    cosine_sum: float = 0.0
    agree: int = 0
    kl_sum: float = 0.0
    count: int = 0
    classifier: bool = False

    def update(self, f: np.ndarray, q: np.ndarray) -> None:
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        self.signal += float(np.sum(f64**2))
        self.noise += float(np.sum((f64 - q64) ** 2))
        n = f.shape[0] if f.ndim > 1 else 1
        ff, qq = f64.reshape(n, -1), q64.reshape(n, -1)
        denom = np.linalg.norm(ff, axis=1) * np.linalg.norm(qq, axis=1)
        self.cosine_sum += float(np.sum(np.where(denom > 0, np.sum(ff * qq, axis=1) / np.maximum(denom, 1e-300), 1.0)))
        self.count += n
        if ff.shape[1] > 1 and f.ndim == 2:
            self.classifier = True
            self.agree += int(np.sum(ff.argmax(1) == qq.argmax(1)))
            self.kl_sum += float(np.sum(kl(as_probs(ff), as_probs(qq))))

    def sqnr_db(self) -> float | None:
        if self.noise == 0:
            return None  # exact: no finite SQNR
        return 10 * float(np.log10(max(self.signal, 1e-300) / self.noise))

    def summary(self) -> dict:
        out = {"samples": self.count, "sqnr_db": self.sqnr_db(), "cosine": self.cosine_sum / max(self.count, 1)}
        out["mse"] = self.noise / max(self.count, 1)
        if self.classifier:
            out["top1_agreement"] = self.agree / max(self.count, 1)
            out["kl"] = self.kl_sum / max(self.count, 1)
        return out


@dataclass
class Fidelity:
    samples: int
    held_out: bool
    outputs: dict[str, dict]
    layers: list[dict]
    accuracy: dict[str, float] = field(default_factory=dict)
    kernel_ops: dict[str, int] = field(default_factory=dict)

    @property
    def integer_kernels(self) -> dict[str, int]:
        return {k: v for k, v in self.kernel_ops.items() if k in INTEGER_KERNELS}

    def to_dict(self) -> dict:
        return asdict(self)


def measure(float_model: ModelProto, quant_model: ModelProto, plan: Plan, batches: Iterable[Batch],
            held_out: bool, advance: Callable[[int], None] = lambda n: None) -> Fidelity:
    outputs = [o.name for o in float_model.graph.output]
    layer_outputs = [layer.output for layer in plan.layers if layer.output not in outputs]
    float_sess = session(with_outputs(float_model, layer_outputs))
    quant_sess = session(quant_model)
    quant_probe = session(with_outputs(quant_model, layer_outputs)) if layer_outputs else None
    out_stats = {name: _Running() for name in outputs}
    layer_stats = {name: _Running() for name in layer_outputs}
    correct = {"float": 0, "quantized": 0}
    labelled = 0
    shapes: dict[str, list[int]] = {}
    for batch in batches:
        fv = dict(zip(outputs + layer_outputs, float_sess.run(outputs + layer_outputs, batch.feeds)))
        shapes = shapes or {name: list(value.shape[1:]) for name, value in fv.items()}
        qv = dict(zip(outputs, quant_sess.run(outputs, batch.feeds)))
        if quant_probe is not None:
            qv.update(zip(layer_outputs, quant_probe.run(layer_outputs, batch.feeds)))
        for name in outputs:
            out_stats[name].update(fv[name], qv[name])
        for name in layer_outputs:
            layer_stats[name].update(fv[name], qv[name])
        if batch.labels is not None:
            labels = batch.labels.reshape(-1)
            labelled += len(labels)
            correct["float"] += int(np.sum(top1(fv[outputs[0]]) == labels))
            correct["quantized"] += int(np.sum(top1(qv[outputs[0]]) == labels))
        advance(len(next(iter(batch.feeds.values()))))
    layers = [
        {"node": layer.node, "op_type": layer.op_type, "output": layer.output,
         "output_shape": shapes.get(layer.output),
         "sqnr_db": (layer_stats.get(layer.output) or out_stats[layer.output]).sqnr_db()}
        for layer in plan.layers
    ]
    accuracy = {k: v / labelled for k, v in correct.items()} if labelled else {}
    samples = next(iter(out_stats.values())).count if out_stats else 0
    return Fidelity(samples, held_out, {k: v.summary() for k, v in out_stats.items()}, layers, accuracy,
                    optimized_op_counts(quant_model))
