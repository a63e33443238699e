"""A transformer encoder layer: what the planner quantizes, SmoothQuant, and the activation modes.

The model (tests/transformer_builders.py) is an exporter-style post-norm layer with token ids, an
int64 attention mask, shape subgraphs and LayerNorm outlier channels."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cli_runner import run_in_process as ptq
from ptqcli import rundir, stages
from ptqcli.calibrate.smooth import smoothing_groups
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.graph import Graph
from ptqcli.runtime import optimized_op_counts
from transformer_builders import encoder_model, token_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoder")
    model = tmp / "encoder.onnx"
    onnx.save(encoder_model(), str(model))
    np.savez(tmp / "calib.npz", **token_data(128, seed=1))
    np.savez(tmp / "eval.npz", **token_data(64, seed=2))
    return model, tmp


def _outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["hidden"], feeds)[0]


def _cosine(model, quantized, data_path) -> np.ndarray:
    feeds = dict(np.load(data_path))
    f, q = _outputs(model, feeds).reshape(len(feeds["input_ids"]), -1), _outputs(quantized, feeds).reshape(
        len(feeds["input_ids"]), -1)
    return np.sum(f * q, 1) / np.linalg.norm(f, axis=1) / np.linalg.norm(q, axis=1)


def _quantize(encoder, name, quant: QuantConfig, with_data=True):
    model, tmp = encoder
    data = DataConfig(path=str(tmp / "calib.npz") if with_data else None, num_samples=128)
    stages.calibrate(model, quant, data, tmp / f"{name}.run")
    out = tmp / f"{name}.onnx"
    stages.export(tmp / f"{name}.run", out, str(tmp / "eval.npz"), 64)
    return rundir.read_plan(tmp / f"{name}.run"), out


def test_the_plan_quantizes_gemm_inputs_only(encoder):
    plan, out = _quantize(encoder, "static", QuantConfig())
    g = Graph(onnx.load(str(encoder[0])))
    quantized = {t for t, tq in plan.tensors.items() if tq.role == "activation"}
    # Never a non-float tensor: ids, mask, shape subgraph.
    assert not quantized & {"input_ids", "attention_mask", "h0_shape", "batch", "heads_shape", "mask_f"}
    # The mask Add, Softmax input, residual Adds, GELU's inner tensors and the bias Adds stay float.
    assert not quantized & {"masked", "scaled", "scores", "res1", "res2", "o", "o_mm", "f_erf1", "f_mm", "q_mm"}
    # The attention MatMuls between two activations stay float; the weight MatMuls' inputs are quantized.
    assert {"scores", "context"} <= set(plan.float_nodes)
    assert {"ctx", "gelu"} <= quantized
    assert len([t for t in quantized if t.startswith("h0") or t.startswith("h1")]) == 2  # the smoothed LN outputs
    assert {layer.node for layer in plan.layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "ffn_in", "ffn_out"}
    kernels = optimized_op_counts(onnx.load(str(out)))
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 6, kernels
    assert np.mean(_cosine(encoder[0], out, encoder[1] / "eval.npz")) > 0.999


def test_smoothing_folds_into_the_layernorms_and_keeps_the_float_model(encoder):
    model, tmp = encoder
    g = Graph(onnx.load(str(model)))
    groups = {grp.tail: grp for grp in smoothing_groups(g)}
    assert set(groups) == {("ln0",), ("ln1",)}  # ln2 feeds no GEMM
    assert set(groups["ln0",].gemms) == {"q_proj", "k_proj", "v_proj"} and groups["ln0",].shared  # residual reads h0
    assert groups["ln1",].gemms == ("ffn_in",) and groups["ln1",].shared

    plan, _ = _quantize(encoder, "smoothed", QuantConfig())
    report = plan.config["smoothing"]
    for tensor in ("h0", "h1"):
        assert report[tensor]["alpha"] is not None and report[tensor]["loss"] < 0.5 * report[tensor]["loss_unsmoothed"]
    smoothed = rundir.load_run(tmp / "smoothed.run").graph
    ops = Counter(n.op_type for n in smoothed.graph.node)
    # ln0 and ln1 smoothed in place; their residual readers get the original back through one Mul each
    restores = [n for n in smoothed.graph.node if n.op_type == "Mul" and n.name.endswith("__unsmoothed")]
    assert ops["LayerNormalization"] == 3 and len(restores) == 2
    feeds = dict(np.load(tmp / "eval.npz"))
    original = _outputs(model, feeds)
    smoothed_path = tmp / "smoothed_float.onnx"
    onnx.save(smoothed.model, str(smoothed_path))
    np.testing.assert_allclose(_outputs(smoothed_path, feeds), original, rtol=1e-4, atol=1e-5)


def test_integer_matmuls_add_their_bias_and_the_residual_reads_float(encoder):
    """Every projection is exported as a MatMulIntegerToFloat that adds its bias (the erf GELU's
    included: ORT then runs a plain Gelu, not a BiasGelu), so no Add of a constant is left after
    an integer MatMul; outputs match the standard-op export, whose Adds ORT runs apart. The Muls that give the
    residual stream the smoothed LayerNorm outputs back read their float values, not the codes."""
    model, tmp = encoder
    run = tmp / "fused.run"
    stages.calibrate(model, QuantConfig(), DataConfig(path=str(tmp / "calib.npz"), num_samples=128), run)
    fused, standard = tmp / "fused.onnx", tmp / "standard.onnx"
    stages.export(run, fused, None, 0, latency=False)
    stages.export(run, standard, None, 0, fmt="onnx", latency=False)
    graph = onnx.load(str(fused)).graph
    producers = {out: n for n in graph.node for out in n.output}
    matmuls = {n.name: n for n in graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert set(matmuls) == {"q_proj", "k_proj", "v_proj", "o_proj", "ffn_in", "ffn_out"}
    assert all(len(n.input) == 7 and n.input[6] for n in matmuls.values())
    constants = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Add" and set(n.input) & constants and any(
        producers.get(x) is not None and producers[x].op_type == "MatMulIntegerToFloat" for x in n.input)]
    restores = [n for n in graph.node if n.name.endswith("__unsmoothed")]
    assert len(restores) == 2 and {producers[n.input[0]].op_type for n in restores} == {"LayerNormalization"}
    kernels = optimized_op_counts(onnx.load(str(fused)))
    assert kernels.get("Gelu") == 1 and "BiasGelu" not in kernels and kernels["MatMulIntegerToFloat"] == 6, kernels
    assert optimized_op_counts(onnx.load(str(standard))).get("Add", 0) > kernels.get("Add", 0)
    card = json.loads(fused.with_suffix(".card.json").read_text())
    assert sorted(card["model"]["container"]["bias_fused"]) == sorted(matmuls)
    feeds = dict(np.load(tmp / "eval.npz"))
    np.testing.assert_allclose(_outputs(fused, feeds), _outputs(standard, feeds), rtol=1e-4, atol=1e-4)


def test_smoothing_beats_no_smoothing_on_outlier_channels(encoder):
    _, smooth = _quantize(encoder, "with_smooth", QuantConfig())
    _, plain = _quantize(encoder, "without_smooth", QuantConfig(smooth=False))
    eval_path = encoder[1] / "eval.npz"
    with_s, without = _cosine(encoder[0], smooth, eval_path), _cosine(encoder[0], plain, eval_path)
    assert 1 - with_s.mean() < 0.5 * (1 - without.mean()), (with_s.mean(), without.mean())


def test_dynamic_activations_need_no_data_and_run_ort_integer_kernels(encoder):
    plan, out = _quantize(encoder, "dynamic", QuantConfig(acts="dynamic"), with_data=False)
    assert not [t for t, tq in plan.tensors.items() if tq.role == "activation"]
    exported = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert exported["MatMulInteger"] == 6 and exported["DynamicQuantizeLinear"] == 4  # h0 feeds q, k and v
    kernels = optimized_op_counts(onnx.load(str(out)))
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulIntegerToFloat", 0) == 6, kernels
    data_free = np.mean(_cosine(encoder[0], out, encoder[1] / "eval.npz"))
    # With calibration data the outlier channels are smoothed first; run-time scales do the rest.
    _, smoothed = _quantize(encoder, "dynamic_smoothed", QuantConfig(acts="dynamic"))
    with_data = np.mean(_cosine(encoder[0], smoothed, encoder[1] / "eval.npz"))
    assert data_free > 0.95 and with_data > 0.995 and 1 - with_data < 0.5 * (1 - data_free), (data_free, with_data)


def test_int16_activations_are_16_bit_qdq_at_opset_21(encoder):
    plan, out = _quantize(encoder, "int16", QuantConfig(acts="int16"))
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    zero_points = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    acts = [t for t, tq in plan.tensors.items() if tq.role == "activation"]
    assert acts and all(zero_points[f"{t}_zero_point"] == onnx.TensorProto.INT16 for t in acts)
    assert {"scores", "context"}.isdisjoint(plan.float_nodes)  # 16-bit targets quantize attention too
    cosine = _cosine(encoder[0], out, encoder[1] / "eval.npz")  # 8-bit weights bound it, not the activations
    assert cosine.mean() > 0.9995 and cosine.min() > 0.995


def test_token_data_is_refused_without_calibration_data_for_static_acts(encoder, tmp_path):
    model, _ = encoder
    r = ptq("quantize", model, "-o", tmp_path / "q.onnx")
    assert r.returncode == 1 and "needs calibration data" in r.stderr + r.stdout and not (tmp_path / "q.onnx").exists()


def test_a_decomposed_layernorm_is_smoothed_through_its_gamma_and_beta(tmp_path):
    model = tmp_path / "decomposed.onnx"
    onnx.save(encoder_model(decomposed=True), str(model))
    groups = {grp.tail: grp for grp in smoothing_groups(Graph(onnx.load(str(model))))}
    assert set(groups) == {("ln0_gamma", "ln0_beta"), ("ln1_gamma", "ln1_beta")}
    np.savez(tmp_path / "calib.npz", **token_data(128, seed=1))
    np.savez(tmp_path / "eval.npz", **token_data(64, seed=2))
    encoder = (model, tmp_path)
    plan, smoothed = _quantize(encoder, "smoothed", QuantConfig())
    _, plain = _quantize(encoder, "plain", QuantConfig(smooth=False))
    assert all(r["alpha"] is not None for r in plan.config["smoothing"].values())
    with_s, without = (_cosine(model, q, tmp_path / "eval.npz").mean() for q in (smoothed, plain))
    assert 1 - with_s < 0.5 * (1 - without), (with_s, without)


def test_tensors_written_by_ort_contrib_ops_get_their_types_and_are_quantized():
    """ORT's transformer optimizer fuses into com.microsoft ops that ONNX's shape inference does not
    know; their outputs' types come from ORT, so the GEMMs after them still get quantized inputs."""
    from onnx import TensorProto, helper, numpy_helper

    from ptqcli.calibrate.select import select
    from ptqcli.prepare import prepare

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 16)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("BiasGelu", ["h", "b1"], ["act"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["act", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert "act" not in {vi.name for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    g = prepare(model)
    assert g.is_float("act")
    assert {"x", "act"} <= set(select(g, QuantConfig()).activations)


def test_weight_only_int4_blocks_export_as_matmul_nbits_and_gptq_beats_nearest(encoder, tmp_path):
    model, tmp = encoder
    common = ("--data", tmp / "calib.npz", "--eval-data", tmp / "eval.npz", "--acts", "none", "--weights", "int4",
              "--block-size", "16", "--no-latency")
    cosines = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / f"{rounding}.onnx"
        r = ptq("quantize", model, *common, "--rounding", rounding, "-o", out)
        assert r.returncode == 0, r.stderr
        ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
        assert ops["MatMulNBits"] == 6 and ops["MatMul"] == 2  # the two attention MatMuls stay float
        cosines[rounding] = _cosine(model, out, tmp / "eval.npz").mean()
    assert 1 - cosines["gptq"] < 0.5 * (1 - cosines["nearest"]), cosines
    # Same inputs, same bytes.
    again = tmp_path / "again.onnx"
    assert ptq("quantize", model, *common, "--rounding", "gptq", "-o", again).returncode == 0
    assert again.read_bytes() == (tmp_path / "gptq.onnx").read_bytes()
    # Standard ops only: block-wise DequantizeLinear at opset 21, the same numbers.
    standard = tmp_path / "standard.onnx"
    assert ptq("export", tmp_path / "gptq.onnx.run", "-o", standard, "--format", "onnx", "--no-latency").returncode == 0
    m = onnx.load(str(standard))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 6 and all(any(a.name == "block_size" and a.i == 16 for a in n.attribute) for n in dq)
    np.testing.assert_allclose(_cosine(model, standard, tmp / "eval.npz").mean(), cosines["gptq"], atol=1e-4)
    # Smoothing chosen in GPTQ's own pass over the data (on the quantized prefix) and folded in after.
    smoothing = json.loads((tmp_path / "gptq.onnx.run" / "plan.json").read_text())["config"]["smoothing"]
    assert any(entry["alpha"] is not None for entry in smoothing.values()), smoothing
    # act-order is the default (recorded in the run); --no-act-order rounds channels in their own order.
    assert json.loads((tmp_path / "gptq.onnx.run" / "rounding.json").read_text())["act_order"] is True
    in_order = tmp_path / "in_order.onnx"
    r = ptq("quantize", model, *common, "--rounding", "gptq", "--no-act-order", "-o", in_order)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "in_order.onnx.run" / "rounding.json").read_text())["act_order"] is False
    assert in_order.read_bytes() != (tmp_path / "gptq.onnx").read_bytes()
    assert 1 - _cosine(model, in_order, tmp / "eval.npz").mean() < 0.5 * (1 - cosines["nearest"])


@pytest.mark.parametrize("args, message", [
    (("--block-size", "24"), "power of two"),
    (("--block-size", "64"), "larger than K=32"),
])
def test_bad_block_sizes_are_one_line_errors(encoder, tmp_path, args, message):
    model, tmp = encoder
    out = tmp_path / "q.onnx"
    r = ptq("quantize", model, "--data", tmp / "calib.npz", "--acts", "none", "--weights", "int4", *args, "-o", out)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_language_model_logits_get_perplexity_and_the_gate_reads_it(tmp_path):
    from transformer_builders import tiny_language_model

    model = tmp_path / "lm.onnx"
    onnx.save(tiny_language_model(), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(64, seed=1))
    np.savez(tmp_path / "eval.npz", **token_data(64, seed=2))
    out = tmp_path / "lm.int4.onnx"
    r = ptq("quantize", model, "--data", tmp_path / "calib.npz", "--eval-data", tmp_path / "eval.npz",
            "--acts", "none", "--weights", "int4", "--block-size", "16", "--rounding", "gptq", "-o", out, "--no-latency")
    assert r.returncode == 0, r.stderr
    import json

    card = json.loads(out.with_name("lm.int4.card.json").read_text())
    lm = card["results"]["outputs"]["logits"]
    assert lm["kind"] == "logits" and lm["tokens"] > 0
    # Reference: the perplexity of the float model computed here from its own logits.
    feeds = dict(np.load(tmp_path / "eval.npz"))
    logits = _outputs_named(model, feeds, "logits")
    shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, feeds["input_ids"][:, 1:, None], -1)[..., 0]
    real = (feeds["attention_mask"][:, :-1] > 0) & (feeds["attention_mask"][:, 1:] > 0)
    assert lm["perplexity_float"] == pytest.approx(float(np.exp(nll[real].mean())), rel=1e-4)
    assert lm["perplexity_quantized"] > 0 and lm["next_token_kl"] >= 0
    increase = 100 * (lm["perplexity_quantized"] / lm["perplexity_float"] - 1)
    card_path = out.with_name("lm.int4.card.json")
    assert ptq("gate", card_path, "--max-ppl-increase", f"{abs(increase) + 1:.3f}").returncode == 0
    failing = ptq("gate", card_path, "--max-ppl-increase", "0")
    assert (failing.returncode == 1) == (increase > 0)


def _outputs_named(path, feeds, name):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([name], feeds)[0]


def test_keep_lm_head_leaves_the_output_projection_at_int8(tmp_path):
    """--keep lm_head=8: the layer that writes the logits gets 8-bit blocks, the rest int4; an alias
    that names nothing, and bits that are not a number, are one-line errors."""
    from transformer_builders import tiny_language_model

    model = tmp_path / "lm.onnx"
    onnx.save(tiny_language_model(), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(32, seed=1))
    out = tmp_path / "lm.int4.onnx"
    common = ("--data", tmp_path / "calib.npz", "--acts", "none", "--weights", "int4", "--block-size", "16",
              "--no-latency")
    r = ptq("quantize", model, *common, "--keep", "lm_head=8", "-o", out)
    assert r.returncode == 0, r.stderr
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"}
    assert bits["lm_head_MatMulNBits"] == 8 and {b for name, b in bits.items() if name != "lm_head_MatMulNBits"} == {4}
    for keep, message in (("lm_head=eight", "bits must be a whole number"), ("nowhere=8", "not a quantized layer")):
        bad = tmp_path / "bad.onnx"
        r = ptq("quantize", model, *common, "--keep", keep, "-o", bad)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not bad.exists()


def test_a_block_wise_int3_language_model_exports_through_the_opset_converter(tmp_path):
    """int3 blocks need opset-21 DequantizeLinear: the opset converter rewrites the model's
    ReduceMean and adds nodes that have no name; the export passes over them."""
    from transformer_builders import tiny_language_model

    model = tmp_path / "lm.onnx"
    onnx.save(tiny_language_model(), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(32, seed=1))
    out = tmp_path / "lm.int3.onnx"
    r = ptq("quantize", model, "--data", tmp_path / "calib.npz", "--acts", "none", "--weights", "int3",
            "--block-size", "16", "--weight-zero-points", "--rounding", "nearest", "-o", out, "--no-latency")
    assert r.returncode == 0, r.stderr
    quantized = onnx.load(str(out))
    assert any(not n.name for n in quantized.graph.node)  # what the converter added
    assert max(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 21
    feeds = token_data(8, seed=2)
    f = _outputs_named(model, feeds, "logits")
    q = _outputs_named(out, feeds, "logits")
    assert np.sum(f * q) / np.linalg.norm(f) / np.linalg.norm(q) > 0.9


def test_int4_weights_with_quantized_activations_are_rounded_by_gptq_and_it_beats_adaround(encoder):
    """An encoder's layers are all MatMuls: `--rounding auto` takes GPTQ for them with quantized
    activations too (its Hessians from the quantized prefix's inputs), and on held-out inputs it
    keeps the output closer to float than AdaRound does."""
    auto_plan, auto = _quantize(encoder, "w4_auto", QuantConfig(weights="int4"))
    _, adaround = _quantize(encoder, "w4_adaround", QuantConfig(weights="int4", rounding="adaround"))
    assert auto_plan.quant.rounding.value == "gptq" and auto_plan.config["rounding_choice"].startswith("auto: gptq")
    eval_path = encoder[1] / "eval.npz"
    with_gptq, with_adaround = _cosine(encoder[0], auto, eval_path).mean(), _cosine(encoder[0], adaround, eval_path).mean()
    assert 1 - with_gptq < 1 - with_adaround, (with_gptq, with_adaround)
