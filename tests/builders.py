"""Tiny ONNX graphs built with onnx.helper, for tests that need exact control of the model."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from transformer_builders import SEQ, VOCAB


def conv_bn_relu_model(seed: int = 0, channels: int = 8, classes: int = 4, batch: int | str = "N",
                       opset: int = 13) -> ModelProto:
    """input[N,3,8,8] -> Conv -> BatchNorm -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.normal(0, 0.2, c).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.normal(0, 0.3, c).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "bn_var"),
        numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (classes, c)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def encoder_model(seed: int = 0, seq: int = 16, hidden: int = 32, heads: int = 4, ffn: int = 64) -> ModelProto:
    """One transformer encoder block: self-attention, LayerNormalization, Gelu MLP (opset 20)."""
    rng = np.random.default_rng(seed)
    head = hidden // heads

    def w(name, *shape, std=0.08):
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    inits = [
        w("wq", hidden, hidden), w("wk", hidden, hidden), w("wv", hidden, hidden), w("wo", hidden, hidden),
        w("bq", hidden, std=0.02), w("bo", hidden, std=0.02),
        w("w_in", hidden, ffn), w("b_in", ffn, std=0.02), w("w_out", ffn, hidden), w("b_out", hidden, std=0.02),
        numpy_helper.from_array(np.ones(hidden, np.float32), "ln_g"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_b"),
        numpy_helper.from_array(np.array([0, 0, heads, head], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "merge_heads"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(head), np.float32), "inv_sqrt_d"),
    ]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q0"], name="q_proj"), n("Add", ["q0", "bq"], ["q1"], name="q_bias"),
        n("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        n("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        n("Reshape", ["q1", "split_heads"], ["q2"], name="q_split"), n("Transpose", ["q2"], ["q"], name="q_t", perm=[0, 2, 1, 3]),
        n("Reshape", ["k0", "split_heads"], ["k2"], name="k_split"), n("Transpose", ["k2"], ["kt"], name="k_t", perm=[0, 2, 3, 1]),
        n("Reshape", ["v0", "split_heads"], ["v2"], name="v_split"), n("Transpose", ["v2"], ["v"], name="v_t", perm=[0, 2, 1, 3]),
        n("MatMul", ["q", "kt"], ["scores0"], name="scores"), n("Mul", ["scores0", "inv_sqrt_d"], ["scores1"], name="scale"),
        n("Softmax", ["scores1"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v"], ["ctx0"], name="context"), n("Transpose", ["ctx0"], ["ctx1"], name="ctx_t", perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx1", "merge_heads"], ["ctx"], name="ctx_merge"),
        n("MatMul", ["ctx", "wo"], ["o0"], name="o_proj"), n("Add", ["o0", "bo"], ["o1"], name="o_bias"),
        n("Add", ["o1", "x"], ["res1"], name="residual1"),
        n("LayerNormalization", ["res1", "ln_g", "ln_b"], ["h1"], name="ln1", axis=-1),
        n("MatMul", ["h1", "w_in"], ["f0"], name="ffn_in"), n("Add", ["f0", "b_in"], ["f1"], name="ffn_in_bias"),
        n("Gelu", ["f1"], ["f2"], name="gelu"),
        n("MatMul", ["f2", "w_out"], ["f3"], name="ffn_out"), n("Add", ["f3", "b_out"], ["f4"], name="ffn_out_bias"),
        n("Add", ["f4", "h1"], ["res2"], name="residual2"),
        n("LayerNormalization", ["res2", "ln_g", "ln_b"], ["y"], name="ln2", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def masked_attention_model(seed: int = 0, seq: int = 12, hidden: int = 16) -> ModelProto:
    """Single-head self-attention with a padding mask added to the scores as exporters write it:
    (1 - mask) * float32-min, then Softmax and the value MatMul, a residual Add and LayerNorm."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, std=0.3):
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    inits = [w("wq", hidden, hidden), w("wk", hidden, hidden), w("wv", hidden, hidden), w("wo", hidden, hidden),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.ones(hidden, np.float32), "ln_g"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_b")]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q"], name="q_proj"), n("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        n("MatMul", ["x", "wv"], ["v"], name="v_proj"), n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores"], name="scores"),
        n("Sub", ["one", "mask"], ["pad"], name="pad"), n("Mul", ["pad", "neg"], ["mask_bias0"], name="mask_scale"),
        n("Unsqueeze", ["mask_bias0", "axis1"], ["mask_bias"], name="mask_unsqueeze"),
        n("Add", ["scores", "mask_bias"], ["masked"], name="mask_add"),
        n("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v"], ["ctx"], name="context"), n("MatMul", ["ctx", "wo"], ["o"], name="o_proj"),
        n("Add", ["o", "x"], ["res"], name="residual"),
        n("LayerNormalization", ["res", "ln_g", "ln_b"], ["y"], name="ln", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "masked_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def text_encoder_model(seed: int = 0, vocab: int = VOCAB, seq: int = SEQ, hidden: int = 16) -> ModelProto:
    """A sentence encoder in miniature (opset 17): int64 token ids [N, T] -> Gather on an embedding table
    -> MatMul -> Relu -> MatMul, residual Add -> LayerNormalization -> token vectors `tokens` [N, T, H],
    and their mean over the tokens marked by `attention_mask` [N, T] (int64 0/1) -> `sentence` [N, H].
    transformer_builders.token_data makes its inputs."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, std=0.3):
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    inits = [w("embeddings", vocab, hidden, std=1.0), w("w1", hidden, 2 * hidden), w("b1", 2 * hidden, std=0.1),
             w("w2", 2 * hidden, hidden), w("b2", hidden, std=0.1),
             numpy_helper.from_array(np.ones(hidden, np.float32), "ln_g"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_b"),
             numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
             numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
             numpy_helper.from_array(np.array(1e-9, np.float32), "tiny")]
    n = helper.make_node
    nodes = [
        n("Gather", ["embeddings", "input_ids"], ["e"], name="embed"),
        n("MatMul", ["e", "w1"], ["h0"], name="ffn_in"), n("Add", ["h0", "b1"], ["h1"], name="ffn_in_bias"),
        n("Relu", ["h1"], ["h2"], name="relu"),
        n("MatMul", ["h2", "w2"], ["h3"], name="ffn_out"), n("Add", ["h3", "b2"], ["h4"], name="ffn_out_bias"),
        n("Add", ["h4", "e"], ["res"], name="residual"),
        n("LayerNormalization", ["res", "ln_g", "ln_b"], ["tokens"], name="ln", axis=-1),
        n("Cast", ["attention_mask"], ["m"], name="mask_float", to=TensorProto.FLOAT),
        n("Unsqueeze", ["m", "last_axis"], ["m3"], name="mask_unsqueeze"),
        n("Mul", ["tokens", "m3"], ["masked"], name="mask_tokens"),
        n("ReduceSum", ["masked", "token_axis"], ["summed"], name="sum_tokens", keepdims=0),
        n("ReduceSum", ["m3", "token_axis"], ["count0"], name="count_tokens", keepdims=0),
        n("Max", ["count0", "tiny"], ["count"], name="no_empty"),
        n("Div", ["summed", "count"], ["sentence"], name="mean_pool"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", seq, hidden]),
         helper.make_tensor_value_info("sentence", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])



def streaming_model(seed: int = 0, chunk: int = 16, hidden: int = 8, outputs: int = 4) -> ModelProto:
    """A streaming cell as voice-activity models are exported: samples x[N, chunk], a recurrent
    state[2, N, hidden] (batch on axis 1) and a scalar sample rate sr (int64), giving y[N, outputs]
    and the next state.

    h = tanh(x W + state[0] U + state[1]); y = (h V) * sr / 16000; next = [h, state[0]]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (chunk, hidden)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.4, (hidden, hidden)).astype(np.float32), "U"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, outputs)).astype(np.float32), "V"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["state", "zero"], ["s0"], name="s0", axis=0),
        n("Gather", ["state", "one"], ["s1"], name="s1", axis=0),
        n("MatMul", ["x", "W"], ["xw"], name="input_proj"),
        n("MatMul", ["s0", "U"], ["su"], name="state_proj"),
        n("Add", ["xw", "su"], ["pre0"], name="add0"),
        n("Add", ["pre0", "s1"], ["pre"], name="add1"),
        n("Tanh", ["pre"], ["h"], name="tanh"),
        n("MatMul", ["h", "V"], ["hv"], name="out_proj"),
        n("Cast", ["sr"], ["sr_f"], name="sr_cast", to=TensorProto.FLOAT),
        n("Div", ["sr_f", "rate"], ["sr_ratio"], name="sr_ratio"),
        n("Mul", ["hv", "sr_ratio"], ["y"], name="y"),
        n("Unsqueeze", ["h", "axis0"], ["h_"], name="h_"),
        n("Unsqueeze", ["s0", "axis0"], ["s0_"], name="s0_"),
        n("Concat", ["h_", "s0_"], ["next_state"], name="next_state", axis=0),
    ]
    graph = helper.make_graph(
        nodes, "streaming",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", chunk]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", hidden]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs]),
         helper.make_tensor_value_info("next_state", TensorProto.FLOAT, [2, "N", hidden])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def as_float16(model: ModelProto, elem: int = TensorProto.FLOAT16) -> ModelProto:
    """The model with float16 (or `elem`) weights, inputs and outputs, as fp16 exporters write it."""
    dtype = {TensorProto.FLOAT16: np.float16}.get(elem)
    copy = ModelProto()
    copy.CopyFrom(model)
    for i, t in enumerate(copy.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(t)
            if dtype is not None:
                copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(dtype), t.name))
            else:
                copy.graph.initializer[i].CopyFrom(helper.make_tensor(t.name, elem, value.shape, value.ravel().tolist()))
    for vi in list(copy.graph.input) + list(copy.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = elem
    del copy.graph.value_info[:]
    return copy


def branching_model(seed: int = 0, width: int = 16) -> ModelProto:
    """Weights inside and across an If: relu(x W0) = h feeds both branches (MatMul by the outer W1 /
    by the branch's own W2) and, beside them, MatMuls in the main graph (h W1 shares W1 with a
    branch); y = (If(sum(x) > 0) + h) W0, z = h W1."""
    rng = np.random.default_rng(seed)
    w = {name: numpy_helper.from_array(rng.normal(0, 0.3, (width, width)).astype(np.float32), name)
         for name in ("W0", "W1", "W2")}
    n = helper.make_node
    vi = helper.make_tensor_value_info
    then_branch = helper.make_graph([n("MatMul", ["h", "W1"], ["t1"], name="then_mm"), n("Relu", ["t1"], ["t_out"], name="then_relu")],
                                    "then", [], [vi("t_out", TensorProto.FLOAT, ["N", width])])
    else_branch = helper.make_graph([n("MatMul", ["h", "W2"], ["e1"], name="else_mm"), n("Sigmoid", ["e1"], ["e_out"], name="else_sig")],
                                    "else", [], [vi("e_out", TensorProto.FLOAT, ["N", width])], [w["W2"]])
    nodes = [
        n("MatMul", ["x", "W0"], ["h0"], name="mm0"), n("Relu", ["h0"], ["h"], name="relu0"),
        n("ReduceSum", ["x"], ["s"], name="rs", keepdims=0), n("Greater", ["s", "zero"], ["flag"], name="gt"),
        n("If", ["flag"], ["y0"], name="branch", then_branch=then_branch, else_branch=else_branch),
        n("Add", ["y0", "h"], ["y1"], name="res"), n("MatMul", ["y1", "W0"], ["y"], name="mm_out"),
        n("MatMul", ["h", "W1"], ["z"], name="mm_side"),
    ]
    graph = helper.make_graph(nodes, "branching", [vi("x", TensorProto.FLOAT, ["N", width])],
                              [vi("y", TensorProto.FLOAT, ["N", width]), vi("z", TensorProto.FLOAT, ["N", width])],
                              [w["W0"], w["W1"], numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def recurrent_model(op: str = "LSTM", seed: int = 0, features: int = 12, hidden: int = 16,
                    classes: int = 5) -> ModelProto:
    """x[T, N, features] -> {op} (one direction) -> last hidden state -> Gemm -> logits[N, classes]."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (1, gates * hidden, features)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1, gates * hidden, hidden)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 2 * gates * hidden)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.normal(0, 0.5, (classes, hidden)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "fc_b"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    n = helper.make_node
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    nodes = [n(op, ["x", "W", "R", "B"], outputs, name="rnn", hidden_size=hidden),
             n("Squeeze", ["Y_h", "axis0"], ["h"], name="last"),
             n("Gemm", ["h", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "recurrent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def hardswish_cnn_model(seed: int = 0, channels: int = 8) -> ModelProto:
    """Conv -> x * clip(x + 3, 0, 6) / 6 (HardSwish as exporters decompose it) -> Conv -> GAP -> Flatten."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w1", "b1"], ["x"], name="conv1", pads=[1, 1, 1, 1]),
        n("Add", ["x", "three"], ["x3"], name="hs_add"),
        n("Clip", ["x3", "lo", "hi"], ["gate"], name="hs_clip"),
        n("Mul", ["x", "gate"], ["xg"], name="hs_mul"),
        n("Div", ["xg", "six"], ["hs"], name="hs_div"),
        n("Conv", ["hs", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["c2"], ["pooled"], name="gap"),
        n("Flatten", ["pooled"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(nodes, "hardswish_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def depthwise_hardswish_model(seed: int = 0, channels: int = 16) -> ModelProto:
    """Conv whose output channels differ in scale by three decades (as BatchNorm folding leaves a
    depthwise-separable net's) -> hard-swish (x * clip(x + 3, 0, 6) / 6) -> depthwise 3x3 Conv ->
    hard-swish -> 1x1 Conv -> GAP -> Flatten."""
    rng = np.random.default_rng(seed)
    c = channels
    spread = np.logspace(-1.5, 1.5, c).astype(np.float32)[rng.permutation(c)]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None], "w1"),
        numpy_helper.from_array((rng.normal(0, 0.1, c) * spread).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (c, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, c, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    n = helper.make_node

    def hardswish(x: str, y: str) -> list:
        return [n("Add", [x, "three"], [f"{y}_x3"], name=f"{y}_add"),
                n("Clip", [f"{y}_x3", "lo", "hi"], [f"{y}_gate"], name=f"{y}_clip"),
                n("Mul", [x, f"{y}_gate"], [f"{y}_xg"], name=f"{y}_mul"),
                n("Div", [f"{y}_xg", "six"], [y], name=f"{y}_div")]

    nodes = [n("Conv", ["input", "w1", "b1"], ["x"], name="conv1", pads=[1, 1, 1, 1]), *hardswish("x", "hs1"),
             n("Conv", ["hs1", "w2", "b2"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=c), *hardswish("d", "hs2"),
             n("Conv", ["hs2", "w3"], ["c3"], name="pointwise"),
             n("GlobalAveragePool", ["c3"], ["pooled"], name="gap"),
             n("Flatten", ["pooled"], ["out"], name="flatten")]
    graph = helper.make_graph(nodes, "depthwise_hardswish",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def fused_attention_model(seed: int = 0, seq: int = 8, hidden: int = 16, heads: int = 2) -> ModelProto:
    """A block as ORT's transformer optimizer writes it: com.microsoft Attention (QKV weight
    [hidden, 3 * hidden], bias, mask index) -> MatMul -> Add residual."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (hidden, 3 * hidden)).astype(np.float32), "qkv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 3 * hidden).astype(np.float32), "qkv_b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (hidden, hidden)).astype(np.float32), "o_w"),
    ]
    n = helper.make_node
    nodes = [
        n("Attention", ["x", "qkv_w", "qkv_b", "mask_index"], ["ctx"], name="attention", domain="com.microsoft",
          num_heads=heads),
        n("MatMul", ["ctx", "o_w"], ["o"], name="o_proj"),
        n("Add", ["o", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(nodes, "fused_attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, hidden]),
                               helper.make_tensor_value_info("mask_index", TensorProto.INT32, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def flagged_conv_model(seed: int = 0, channels: int = 4) -> ModelProto:
    """x[N, 3, 8, 8], flag[] (bool) -> Conv -> Transpose -> If(flag): then a Conv -> Relu -> Conv
    branch, else a Conv branch (different weights), each reading the transposed tensor from the main
    graph -> GlobalAveragePool -> y. Weights live in the main graph (then) and in the branch (else), as
    exporters write them."""
    rng = np.random.default_rng(seed)
    c = channels

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    n = helper.make_node
    then_branch = helper.make_graph(
        [n("Transpose", ["t"], ["t_back"], name="then_back", perm=[0, 1, 3, 2]),
         n("Conv", ["t_back", "w_then1"], ["a"], name="then_conv1", pads=[1, 1, 1, 1]),
         n("Relu", ["a"], ["a_relu"], name="then_relu"),
         n("Conv", ["a_relu", "w_then2"], ["then_out"], name="then_conv2", pads=[1, 1, 1, 1])],
        "then_graph", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", c, 8, 8])])
    else_branch = helper.make_graph(
        [n("Transpose", ["t"], ["t_back2"], name="else_back", perm=[0, 1, 3, 2]),
         n("Conv", ["t_back2", "w_else"], ["else_out"], name="else_conv", pads=[1, 1, 1, 1])],
        "else_graph", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", c, 8, 8])],
        [w("w_else", c, c, 3, 3)])
    nodes = [n("Conv", ["x", "w_in"], ["h"], name="conv_in", pads=[1, 1, 1, 1]),
             n("Transpose", ["h"], ["t"], name="to_t", perm=[0, 1, 3, 2]),
             n("If", ["flag"], ["b"], name="branch", then_branch=then_branch, else_branch=else_branch),
             n("GlobalAveragePool", ["b"], ["y"], name="gap")]
    graph = helper.make_graph(nodes, "branching",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])],
                              [w("w_in", c, 3, 3, 3), w("w_then1", c, c, 3, 3), w("w_then2", c, c, 3, 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
