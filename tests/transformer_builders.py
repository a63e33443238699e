"""A post-norm transformer encoder layer as torch's exporter writes it, built with onnx.helper.

Token ids go through an embedding Gather; the attention mask arrives as int64 and becomes the
additive (1 - mask) * float32-min bias; head reshapes take their shape from a Shape/Gather/Concat
subgraph on int64 tensors; LayerNormalization is the fused opset-17 op; GELU is the Erf form. Some
LayerNorm scale channels are made much larger than the rest, as trained encoders' are, so the
normalized activations carry outlier channels.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

SEQ, HIDDEN, HEADS, VOCAB, FFN = 8, 32, 2, 40, 64
OUTLIERS = (3, 17)  # LayerNorm channels scaled up


def _layer_norm(name: str, x: str, gamma: str, beta: str, out: str, decomposed: bool) -> list:
    """The fused op, or the ReduceMean/Sub/Pow/Sqrt/Div form of exporters before opset 17."""
    n = helper.make_node
    if not decomposed:
        return [n("LayerNormalization", [x, gamma, beta], [out], name=name, axis=-1, epsilon=1e-12)]
    t = lambda part: f"{name}_{part}"  # noqa: E731
    return [
        n("ReduceMean", [x], [t("mean")], name=t("mean"), axes=[-1], keepdims=1),
        n("Sub", [x, t("mean")], [t("centred")], name=t("sub")),
        n("Pow", [t("centred"), "two"], [t("sq")], name=t("pow")),
        n("ReduceMean", [t("sq")], [t("var")], name=t("var"), axes=[-1], keepdims=1),
        n("Add", [t("var"), "eps"], [t("var_eps")], name=t("add_eps")),
        n("Sqrt", [t("var_eps")], [t("std")], name=t("sqrt")),
        n("Div", [t("centred"), t("std")], [t("normed")], name=t("div")),
        n("Mul", [t("normed"), gamma], [t("scaled")], name=t("gamma")),
        n("Add", [t("scaled"), beta], [out], name=t("beta")),
    ]


def encoder_model(seed: int = 0, outlier_gain: float = 40.0, decomposed: bool = False) -> ModelProto:
    """`decomposed` writes LayerNorm as older exporters do (ReduceMean ... Mul gamma, Add beta)."""
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS
    inits = []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(name, *shape, std=None):
        return const(name, rng.normal(0, std or 1.0 / np.sqrt(shape[0]), shape))

    def ln_scale(name):
        g = rng.uniform(0.8, 1.2, HIDDEN)
        g[list(OUTLIERS)] *= outlier_gain
        return const(name, g)

    n = helper.make_node
    nodes = [
        # Embeddings and the first LayerNorm.
        n("Gather", [weight("word_embeddings", VOCAB, HIDDEN, std=0.5), "input_ids"], ["tok"], name="embed"),
        n("Add", ["tok", weight("position_embeddings", SEQ, HIDDEN, std=0.1)], ["emb"], name="embed_add"),
        *_layer_norm("ln0", "emb", ln_scale("ln0_g"), const("ln0_b", rng.normal(0, 0.1, HIDDEN)), "h0", decomposed),
        # The head shape, computed from the input's shape on int64 tensors as exporters do.
        n("Shape", ["h0"], ["h0_shape"], name="shape"),
        n("Gather", ["h0_shape", const("zero", 0, np.int64)], ["batch"], name="shape_batch", axis=0),
        n("Unsqueeze", ["batch", const("axes0", [0], np.int64)], ["batch1"], name="shape_unsqueeze"),
        n("Concat", ["batch1", const("rest", [SEQ, HEADS, head], np.int64)], ["heads_shape"], name="shape_concat", axis=0),
        n("Concat", ["batch1", const("flat", [SEQ, HIDDEN], np.int64)], ["merged_shape"], name="shape_concat2", axis=0),
        # The additive attention mask from int64 ones and zeros.
        n("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        n("Sub", [const("one", 1.0), "mask_f"], ["mask_inv"], name="mask_sub"),
        n("Mul", ["mask_inv", const("neg", np.finfo(np.float32).min)], ["mask_neg"], name="mask_mul"),
        n("Unsqueeze", ["mask_neg", const("axes12", [1, 2], np.int64)], ["mask_bias"], name="mask_unsqueeze"),
    ]
    for p in ("q", "k", "v"):
        nodes += [
            n("MatMul", ["h0", weight(f"w{p}", HIDDEN, HIDDEN)], [f"{p}_mm"], name=f"{p}_proj"),
            n("Add", [const(f"b{p}", rng.normal(0, 0.05, HIDDEN)), f"{p}_mm"], [f"{p}_b"], name=f"{p}_bias"),
            n("Reshape", [f"{p}_b", "heads_shape"], [f"{p}_r"], name=f"{p}_reshape"),
            n("Transpose", [f"{p}_r"], [f"{p}_t"], name=f"{p}_transpose",
              perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        n("MatMul", ["q_t", "k_t"], ["scores"], name="scores"),
        n("Div", ["scores", const("sqrt_d", np.sqrt(head))], ["scaled"], name="scale"),
        n("Add", ["scaled", "mask_bias"], ["masked"], name="mask_add"),
        n("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v_t"], ["ctx_h"], name="context"),
        n("Transpose", ["ctx_h"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merged_shape"], ["ctx"], name="ctx_reshape"),
        n("MatMul", ["ctx", weight("wo", HIDDEN, HIDDEN)], ["o_mm"], name="o_proj"),
        n("Add", [const("bo", rng.normal(0, 0.05, HIDDEN)), "o_mm"], ["o"], name="o_bias"),
        n("Add", ["o", "h0"], ["res1"], name="residual1"),
        *_layer_norm("ln1", "res1", ln_scale("ln1_g"), const("ln1_b", rng.normal(0, 0.1, HIDDEN)), "h1", decomposed),
        n("MatMul", ["h1", weight("w1", HIDDEN, FFN)], ["f_mm"], name="ffn_in"),
        n("Add", [const("b1", rng.normal(0, 0.05, FFN)), "f_mm"], ["f"], name="ffn_bias"),
        n("Div", ["f", const("sqrt2", np.sqrt(2.0))], ["f_s"], name="gelu_div"),
        n("Erf", ["f_s"], ["f_erf"], name="gelu_erf"),
        n("Add", ["f_erf", const("one_g", 1.0)], ["f_erf1"], name="gelu_add"),
        n("Mul", ["f", "f_erf1"], ["f_m"], name="gelu_mul"),
        n("Mul", ["f_m", const("half", 0.5)], ["gelu"], name="gelu_half"),
        n("MatMul", ["gelu", weight("w2", FFN, HIDDEN)], ["g_mm"], name="ffn_out"),
        n("Add", [const("b2", rng.normal(0, 0.05, HIDDEN)), "g_mm"], ["g"], name="ffn_out_bias"),
        n("Add", ["g", "h1"], ["res2"], name="residual2"),
        *_layer_norm("ln2", "res2", const("ln2_g", rng.uniform(0.8, 1.2, HIDDEN)),
                     const("ln2_b", rng.normal(0, 0.1, HIDDEN)), "hidden", decomposed),
    ]
    if decomposed:
        const("two", 2.0)
        const("eps", 1e-12)
    return _token_model(nodes, inits, "encoder_layer", "hidden", HIDDEN)


def _token_model(nodes: list, inits: list, name: str, output: str, width: int) -> ModelProto:
    """An opset-17 model of token ids and an attention mask (int64 [N, SEQ]) to one float [N, SEQ, width]."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", SEQ])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", SEQ, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def token_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with padded tails (id 0, mask 0) of random lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (n, SEQ)) * mask
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


def tiny_language_model(seed: int = 0, outlier_gain: float = 1.0) -> ModelProto:
    """Token ids -> embedding -> RMSNorm (decomposed: ... * gamma) -> SiLU MLP with a residual ->
    next-token logits over the vocabulary from a tied-transpose head: a language model's shape
    without attention, for measuring perplexity. `outlier_gain` scales gamma's OUTLIERS channels,
    as trained models' normalizations have a few large ones."""
    rng = np.random.default_rng(seed)
    inits = []
    gamma = rng.uniform(0.5, 1.5, HIDDEN)
    gamma[list(OUTLIERS)] *= outlier_gain

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    table = rng.normal(0, 1.0, (VOCAB, HIDDEN)).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Gather", [const("embed", table), "input_ids"], ["h"], name="embed"),
        n("Mul", ["h", "h"], ["sq"], name="rms_sq"),
        n("ReduceMean", ["sq"], ["ms"], name="rms_mean", axes=[-1], keepdims=1),
        n("Add", ["ms", const("eps", 1e-5)], ["ms_eps"], name="rms_eps"),
        n("Sqrt", ["ms_eps"], ["rms"], name="rms_sqrt"),
        n("Div", ["h", "rms"], ["normed"], name="rms_div"),
        n("Mul", ["normed", const("gamma", gamma)], ["x"], name="rms_gamma"),
        n("MatMul", ["x", const("w_up", rng.normal(0, HIDDEN ** -0.5, (HIDDEN, FFN)))], ["up"], name="up_proj"),
        n("Sigmoid", ["up"], ["gate"], name="silu_sigmoid"),
        n("Mul", ["up", "gate"], ["act"], name="silu_mul"),
        n("MatMul", ["act", const("w_down", rng.normal(0, FFN ** -0.5, (FFN, HIDDEN)))], ["down"], name="down_proj"),
        n("Add", ["x", "down"], ["y"], name="residual"),
        n("MatMul", ["y", const("lm_head", table.T.copy())], ["logits"], name="lm_head"),
    ]
    return _token_model(nodes, inits, "tiny_lm", "logits", VOCAB)


def tied_head_language_model(seed: int = 0, vocab: int = 160, hidden: int = 48,
                             head_factors: np.ndarray | None = None) -> ModelProto:
    """Token ids -> embedding -> a residual linear layer -> logits from an output projection that
    holds the embedding table's transpose as its own copy (tied weights as exporters write them),
    its rows times `head_factors` where given (a normalization's scale folded into it)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1.0, (vocab, hidden)).astype(np.float32)
    head = table.T.copy() if head_factors is None else (head_factors[:, None] * table.T).astype(np.float32)
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(head, "lm_head"),
             numpy_helper.from_array(rng.normal(0, hidden ** -0.5, (hidden, hidden)).astype(np.float32), "w_mid")]
    n = helper.make_node
    nodes = [
        n("Gather", ["embed", "input_ids"], ["h"], name="embed"),
        n("MatMul", ["h", "w_mid"], ["m"], name="mid"),
        n("Add", ["h", "m"], ["y"], name="residual"),
        n("MatMul", ["y", "lm_head"], ["logits"], name="lm_head"),
    ]
    return _token_model(nodes, inits, "tied_lm", "logits", vocab)
