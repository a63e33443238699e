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

from ..calibrate.data import Batch, bounded_runs, embedding_vocabularies, rows_within
from ..graph import Graph
from ..nativelib import OPERATORS
from ..ops import ORT_INTEGER_OPS
from ..metrics import as_probs, kl, masked_mean_pool, next_token_terms, sample_cosines, top1
from ..plan import Plan
from ..runtime import optimized_op_counts, session

INTEGER_KERNELS = OPERATORS + ORT_INTEGER_OPS


# How an output is compared with float. Class scores get top-1 agreement and KL; embeddings (the
# float outputs of a text model) get cosine, and a [N, T, H] one also the cosine of its pooled vector.
CLASS_SCORES, EMBEDDING, LOGITS, VALUES = "class_scores", "embedding", "logits", "values"
OUTPUT_KIND_LABELS = {CLASS_SCORES: "class scores", EMBEDDING: "embedding", LOGITS: "next-token logits",
                      VALUES: "values"}
ALL_POSITIONS = "all positions"  # what a [N, T, H] embedding is pooled over when no input masks tokens


def output_kind(value: np.ndarray, text_model: bool, labelled: bool, vocabulary: int | None = None) -> str:
    """Rows of scores are read as classes when the data has labels, or, for a model that does not
    take token ids, when nothing says otherwise; a text model's [N, T, V] output over its own
    vocabulary is a language model's next-token logits; its other float [N, H] and [N, T, H]
    outputs are embeddings, whose argmax means nothing."""
    floating = value.dtype.kind == "f"
    if floating and text_model and value.ndim == 3 and vocabulary is not None and value.shape[2] == vocabulary:
        return LOGITS
    if floating and value.ndim == 2 and value.shape[1] > 1 and (labelled or not text_model):
        return CLASS_SCORES
    if floating and text_model and value.ndim in (2, 3):
        return EMBEDDING
    return VALUES


def attention_mask_name(feeds: dict[str, np.ndarray], token_inputs: Iterable[str]) -> str | None:
    """The input that marks real tokens: 2-D, integer or bool, every value 0 or 1, not token ids."""
    ids = set(token_inputs)
    for name, value in feeds.items():
        if name in ids or value.ndim != 2 or value.dtype.kind not in "iub":
            continue
        if np.all((value == 0) | (value == 1)):
            return name
    return None


def pooled_positions(pooled_over: list[str]) -> str:
    """Where pooling averaged, in words: the tokens an attention-mask input marks, or every position."""
    return " / ".join(p if p == ALL_POSITIONS else f"the tokens '{p}' marks" for p in pooled_over)


@dataclass
class _Cosines:
    """Per-sample cosines, streamed: their sum, the smallest, and how many."""

    total: float = 0.0
    smallest: float = float("inf")
    count: int = 0

    def add(self, values: np.ndarray) -> None:
        if values.size:
            self.total += float(np.sum(values))
            self.smallest = min(self.smallest, float(np.min(values)))
            self.count += int(values.size)

    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def min(self) -> float | None:
        return self.smallest if self.count else None


@dataclass
class _Running:
    """Streaming sums for one compared tensor."""

    kind: str = VALUES
    signal: float = 0.0
    noise: float = 0.0
    cosines: _Cosines = field(default_factory=_Cosines)
    pooled: _Cosines = field(default_factory=_Cosines)
    pooled_over: set = field(default_factory=set)
    agree: int = 0
    kl_sum: float = 0.0
    count: int = 0
    nll_float: float = 0.0  # language-model logits: next-token negative log-likelihoods, summed
    nll_quantized: float = 0.0
    tokens: int = 0
    # NaN or infinite values the quantized model wrote where float's were finite: counted, and
    # measured as zeros (a broken output, said so, instead of NaN everywhere in the table)
    non_finite: int = 0

    def update(self, f: np.ndarray, q: np.ndarray, mask: tuple[str, np.ndarray] | None = None,
               ids: np.ndarray | None = None) -> None:
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        broken = ~np.isfinite(q64) & np.isfinite(f64)
        if broken.any():
            self.non_finite += int(broken.sum())
            q64 = np.where(broken, 0.0, q64)
            q = q64.astype(q.dtype)
        self.signal += float(np.sum(f64**2))
        self.noise += float(np.sum((f64 - q64) ** 2))
        n = f.shape[0] if f.ndim > 1 else 1
        ff, qq = f64.reshape(n, -1), q64.reshape(n, -1)
        self.cosines.add(sample_cosines(ff, qq))
        self.count += n
        if self.kind == CLASS_SCORES:
            self.agree += int(np.sum(ff.argmax(1) == qq.argmax(1)))
            self.kl_sum += float(np.sum(kl(as_probs(ff), as_probs(qq))))
        elif self.kind == EMBEDDING and f.ndim == 3:
            self.update_pooled(f64, q64, mask)
        elif self.kind == LOGITS and ids is not None:
            weights = mask[1] if mask is not None and mask[1].shape == ids.shape else None
            nll_f, logp_f = next_token_terms(f, ids, weights)
            nll_q, logp_q = next_token_terms(q, ids, weights)
            self.nll_float += float(np.sum(nll_f, dtype=np.float64))
            self.nll_quantized += float(np.sum(nll_q, dtype=np.float64))
            self.kl_sum += float(np.sum(np.exp(logp_f) * (logp_f - logp_q), dtype=np.float64))
            self.tokens += len(nll_f)

    def update_pooled(self, f: np.ndarray, q: np.ndarray, mask: tuple[str, np.ndarray] | None) -> None:
        """Token vectors [N, T, H] pooled over the attention mask, as sentence encoders pool them; over
        every position when there is no mask of that [N, T] shape."""
        fits = mask is not None and mask[1].shape == f.shape[:2]
        weights = mask[1] if fits else None
        self.pooled_over.add(mask[0] if fits else ALL_POSITIONS)
        self.pooled.add(sample_cosines(masked_mean_pool(f, weights), masked_mean_pool(q, weights)))

    def sqnr_db(self) -> float | None:
        if self.noise == 0:
            return None  # exact: no finite SQNR
        return 10 * float(np.log10(max(self.signal, 1e-300) / self.noise))

    def summary(self) -> dict:
        out = {"kind": self.kind, "samples": self.count, "sqnr_db": self.sqnr_db(), "cosine": self.cosines.mean(),
               "cosine_min": self.cosines.min(), "mse": self.noise / max(self.count, 1)}
        if self.kind == CLASS_SCORES:
            out["top1_agreement"] = self.agree / max(self.count, 1)
            out["kl"] = self.kl_sum / max(self.count, 1)
        if self.kind == LOGITS and self.tokens:
            out["perplexity_float"] = float(np.exp(self.nll_float / self.tokens))
            out["perplexity_quantized"] = float(np.exp(self.nll_quantized / self.tokens))
            out["next_token_kl"] = self.kl_sum / self.tokens
            out["tokens"] = self.tokens
        if self.non_finite:
            out["non_finite"] = self.non_finite
        if self.pooled.count:
            out["pooled_cosine"] = self.pooled.mean()
            out["pooled_cosine_min"] = self.pooled.min()
            out["pooled_over"] = sorted(self.pooled_over)
        return out


def headline(accuracy: dict, outputs: dict[str, dict]) -> tuple[float, str] | None:
    """The one number, in percent, that says how close a quantized model is (gates and the Pareto
    view compare it): labelled accuracy, else top-1 agreement of class scores, else the lowest
    embedding cosine (pooled over the attention mask where measured), else the lowest output cosine."""
    if accuracy:
        return 100 * accuracy["quantized"], "top-1 accuracy"
    for output in outputs.values():
        if "top1_agreement" in output:
            return 100 * output["top1_agreement"], "top-1 agreement"
    embeddings = [o.get("pooled_cosine", o["cosine"]) for o in outputs.values() if o.get("kind") == EMBEDDING]
    if embeddings:
        return 100 * min(embeddings), "embedding cosine x100"
    cosines = [o["cosine"] for o in outputs.values() if o.get("cosine") is not None]
    return (100 * min(cosines), "output cosine x100") if cosines else None


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


def observed_outputs(float_model: ModelProto, quant_model: ModelProto, plan: Plan) -> dict[str, str]:
    """{layer output: the tensor its SQNR is measured on}: the output itself, or where the quantized
    model's operator absorbed the op after the layer (a bias Add a native operator adds itself), the
    output of that op, its only reader."""
    produced = {name for node in quant_model.graph.node for name in node.output}
    readers = Graph(float_model).consumers
    observed = {}
    for layer in plan.layers:
        after = readers.get(layer.output, [])
        absorbed = layer.output not in produced and len(after) == 1 and after[0].output[0] in produced
        observed[layer.output] = after[0].output[0] if absorbed else layer.output
    return observed


@dataclass
class _Tally:
    """Float and quantized values of a model's outputs (and of layer outputs) compared batch by batch."""

    outputs: list[str]
    layer_outputs: list[str]
    token_inputs: set[str]
    vocabulary: int | None
    out_stats: dict = field(default_factory=dict)
    layer_stats: dict = field(default_factory=dict)
    correct: dict = field(default_factory=lambda: {"float": 0, "quantized": 0})
    labelled: int = 0
    shapes: dict = field(default_factory=dict)
    evaluated: int = 0  # input samples: an output's first axis may be time (a [T, N, C] sequence), not samples

    @classmethod
    def of(cls, float_graph: Graph, outputs: list[str], layer_outputs: list[str]) -> "_Tally":
        vocabularies = embedding_vocabularies(float_graph)
        return cls(outputs, layer_outputs, set(vocabularies), min(vocabularies.values()) if vocabularies else None,
                   {name: _Running() for name in outputs}, {name: _Running() for name in layer_outputs})

    def add(self, batch: Batch, fv: dict[str, np.ndarray], qv: dict[str, np.ndarray]) -> None:
        self.evaluated += batch.size
        if not self.shapes:  # the first batch tells what each output is
            self.shapes = {name: list(value.shape[1:]) for name, value in fv.items()}
            for name in self.outputs:
                self.out_stats[name].kind = output_kind(fv[name], bool(self.token_inputs), batch.labels is not None,
                                                        self.vocabulary)
        mask_name = attention_mask_name(batch.feeds, self.token_inputs) if self.token_inputs else None
        mask = (mask_name, batch.feeds[mask_name]) if mask_name else None
        ids = next((batch.feeds[t] for t in self.token_inputs if t in batch.feeds), None)
        for name in self.outputs:
            self.out_stats[name].update(fv[name], qv[name], mask, ids)
        for name in self.layer_outputs:
            self.layer_stats[name].update(fv[name], qv[name])
        if batch.labels is not None:
            labels = batch.labels.reshape(-1)
            self.labelled += len(labels)
            self.correct["float"] += int(np.sum(top1(fv[self.outputs[0]]) == labels))
            self.correct["quantized"] += int(np.sum(top1(qv[self.outputs[0]]) == labels))

    def fidelity(self, plan: Plan, observed: dict[str, str] | None, held_out: bool,
                 kernel_ops: dict[str, int]) -> Fidelity:
        """The comparison as a Fidelity, with each layer's SQNR on the tensor `observed` names for
        its output (None: layers were not observed, and the Fidelity lists none)."""
        layers = [{"node": layer.node, "op_type": layer.op_type, "output": observed[layer.output],
                   "output_shape": self.shapes.get(observed[layer.output]),
                   "sqnr_db": (self.layer_stats.get(observed[layer.output]) or self.out_stats[observed[layer.output]]).sqnr_db()}
                  for layer in plan.layers] if observed is not None else []
        accuracy = {k: v / self.labelled for k, v in self.correct.items()} if self.labelled else {}
        return Fidelity(self.evaluated, held_out, {k: v.summary() for k, v in self.out_stats.items()}, layers,
                        accuracy, kernel_ops)


def tensor_outputs_of(model: ModelProto) -> list[str]:
    """The graph outputs that are tensors: the sequences of maps an ai.onnx.ml classifier also
    returns (ZipMap) repeat its probability tensor."""
    return [o.name for o in model.graph.output if o.type.HasField("tensor_type")]


def measure(float_model: ModelProto, quant_model: ModelProto, plan: Plan, batches: Iterable[Batch],
            held_out: bool, advance: Callable[[int], None] = lambda n: None) -> Fidelity:
    outputs = tensor_outputs_of(float_model)
    observed = observed_outputs(float_model, quant_model, plan)
    layer_outputs = list(dict.fromkeys(name for name in observed.values() if name not in outputs))
    float_sess = session(float_model, outputs=layer_outputs)
    quant_sess = session(quant_model)
    quant_probe = session(quant_model, outputs=layer_outputs) if layer_outputs else None
    tally = _Tally.of(Graph(float_model), outputs, layer_outputs)
    rows = None
    for batch in bounded_runs(batches, lambda: rows):
        fv = dict(zip(outputs + layer_outputs, float_sess.run(outputs + layer_outputs, batch.feeds)))
        if rows is None:  # the first run (one sample) tells how many samples a run may hold
            rows = rows_within(fv.values(), 1)
        qv = dict(zip(outputs, quant_sess.run(outputs, batch.feeds)))
        if quant_probe is not None:
            qv.update(zip(layer_outputs, quant_probe.run(layer_outputs, batch.feeds)))
        tally.add(batch, fv, qv)
        advance(batch.size)
    return tally.fidelity(plan, observed, held_out, optimized_op_counts(quant_model))


def measure_piecewise(float_graph: Graph, quant_sess, plan: Plan, batches: Iterable[Batch], held_out: bool,
                      cuts: Iterable[str], kernel_ops: dict[str, int],
                      advance: Callable[[int], None] = lambda n: None) -> Fidelity:
    """The model outputs alone (no layer SQNR), the float model computed segment by segment (cut at
    `cuts`, each segment's weights read from disk when it is built: see segments.outputs_piecewise)
    and the quantized one by `quant_sess`, a sample at a time: for a model too large to be held in
    memory, whose quantized form is a fraction of it."""
    from ..calibrate.segments import outputs_piecewise
    from ..runtime import run_session

    outputs = tensor_outputs_of(float_graph.model)
    runs = list(bounded_runs(batches, lambda: 1))
    tally = _Tally.of(float_graph, outputs, [])
    for run, fv in zip(runs, outputs_piecewise(float_graph, [r.feeds for r in runs], outputs, cuts)):
        tally.add(run, fv, dict(zip(outputs, run_session(quant_sess, outputs, run.feeds))))
        advance(run.size)
    return tally.fidelity(plan, None, held_out, kernel_ops)

