"""Native export: quantized layers become ptqcli operators that ORT runs, with the QDQ export's accuracy."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import ASSETS
from ptqcli import nativelib, rundir, stages
from ptqcli.cli import app
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.export.native import export_native
from ptqcli.export.qdq import export_qdq
from ptqcli.graph import Graph

pytestmark = pytest.mark.skipif(not nativelib.available(), reason="native library not built")

FASHION = ASSETS / "fashion_cnn.onnx"
CALIB = ASSETS / "fashion_calib.npz"
TEST = ASSETS / "fashion_test.npz"


def _top1(model_path, x):
    sess = nativelib.session(model_path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])


@pytest.mark.slow
@pytest.mark.parametrize("weights,acts,ops,binary_acts", [
    ("int4", "uint8", {"Int4Conv", "Int4Gemm"}, ()),
    ("pow2:4", "uint8", {"ShiftConv", "ShiftGemm"}, ()),
    ("int4", "none", {"Int4Conv", "Int4Gemm"}, ()),  # weight-only: the operators quantize activations per row
    ("ternary", "uint8", {"Int4Conv", "Int4Gemm"}, ()),  # -1/0/+1 are 4-bit codes too
    ("int3", "uint8", {"Int4Conv", "Int4Gemm"}, ()),
    ("binary", "uint8", {"BinaryConv", "BinaryGemm"}, ("all",)),  # fully binary middle layers: XNOR-popcount
])
def test_embedded_model_native_matches_its_qdq_export(tmp_path, weights, acts, ops, binary_acts):
    run = tmp_path / "run"
    quant = QuantConfig(weights=weights, acts=acts, binary_acts=binary_acts, float_stem=False)  # every layer native
    stages.calibrate(FASHION, quant, DataConfig(path=str(CALIB), num_samples=256), run)
    qdq, native = tmp_path / "q.onnx", tmp_path / "n.onnx"
    stages.export(run, qdq, str(TEST), 1000)
    stages.export(run, native, str(TEST), 1000, fmt="native", native_layers="all")

    data = np.load(TEST)
    x, labels = data["input"][:1000].astype(np.float32), data["labels"][:1000]
    q_pred, n_pred = _top1(qdq, x), _top1(native, x)
    assert (q_pred == labels).mean() == pytest.approx((n_pred == labels).mean(), abs=0.002)
    assert (q_pred == n_pred).mean() >= 0.995

    model = onnx.load(native)
    used = {n.op_type for n in model.graph.node if n.domain == "ptqcli"}
    assert used == ops
    still_float_ops = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    float_bytes = FASHION.stat().st_size
    assert native.stat().st_size < qdq.stat().st_size < float_bytes
    assert native.stat().st_size < float_bytes / 5

    card = json.loads((tmp_path / "n.card.json").read_text())
    assert card["model"]["format"] == "native"
    assert still_float_ops == set(card["model"]["native"]["kept"])  # only layers the card says were kept
    assert len(still_float_ops) <= 2  # at most the first and last layers, kept at 8 bits
    card_md = (tmp_path / "n.card.md").read_text()
    assert "NATIVE" in card_md and all(f"{node} -> {op}" in card_md for node, op in card["model"]["native"]["replaced"].items())
    assert set(card["model"]["native"]["replaced"].values()) == ops
    assert card["results"]["accuracy"]["quantized"] == pytest.approx(
        json.loads((tmp_path / "q.card.json").read_text())["results"]["accuracy"]["quantized"], abs=0.002)


def test_layers_without_a_kernel_stay_qdq_and_say_why(tmp_path, tiny_cnn, tiny_data):
    run = tmp_path / "run"
    plan = stages.calibrate(tiny_cnn, QuantConfig(weights="int4", first_last_int8=True),
                            DataConfig(path=str(tiny_data), num_samples=32), run)
    g = Graph(rundir.read_float_model(run))
    model, report = export_native(export_qdq(g, plan), g, plan)
    assert report.replaced == {"conv2": "Int4Conv"}
    assert set(report.kept) == {"conv1", "fc"} and all("int8" in why for why in report.kept.values())
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    qdq_out = nativelib.session(export_qdq(g, plan).SerializeToString()).run(None, {"input": x})[0]
    native_out = nativelib.session(model.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(native_out, qdq_out, rtol=1e-4, atol=1e-4)


def test_native_export_of_an_int8_plan_is_a_one_line_error(tmp_path, tiny_cnn, tiny_data):
    run = tmp_path / "run"
    stages.calibrate(tiny_cnn, QuantConfig(), DataConfig(path=str(tiny_data), num_samples=32), run)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--format", "native", "--native-layers", "all"])
    assert result.exit_code == 1
    assert "no layer has a native kernel" in result.output and "Traceback" not in result.output
    assert not out.exists()
    bad = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--format", "tflite"])
    assert bad.exit_code == 1 and "unknown export format 'tflite'" in bad.output


def test_ptq_run_opens_native_models_and_reports_top1(tmp_path, tiny_cnn, tiny_data):
    run = tmp_path / "run"
    stages.calibrate(FASHION, QuantConfig(weights="int4", float_stem=False), DataConfig(path=str(CALIB), num_samples=64), run)
    native = tmp_path / "n.onnx"
    exported = CliRunner().invoke(app, ["export", str(run), "-o", str(native), "--format", "native", "--native-layers", "all"])
    assert exported.exit_code == 0, exported.output
    assert "native operators: Int4Conv x3, Int4Gemm x2" in exported.output
    saved = tmp_path / "outs.npz"
    result = CliRunner().invoke(app, ["run", str(native), "--data", str(TEST), "--num-samples", "300",
                                      "--save-outputs", str(saved)])
    assert result.exit_code == 0, result.output
    data = np.load(TEST)
    outputs = np.load(saved)["logits"]
    assert outputs.shape == (300, 10)
    top1 = (outputs.argmax(1) == data["labels"][:300]).mean()
    assert f"{100 * top1:.2f}%" in result.output
    np.testing.assert_allclose(outputs, nativelib.session(native).run(None, {"input": data["input"][:300]})[0],
                               rtol=1e-5, atol=1e-5)
    missing = CliRunner().invoke(app, ["run", str(tmp_path / "none.onnx"), "--data", str(TEST)])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_ptq_run_reports_a_failing_operator_in_one_line(tmp_path):
    run = tmp_path / "run"
    stages.calibrate(FASHION, QuantConfig(weights="int4", float_stem=False), DataConfig(path=str(CALIB), num_samples=32), run)
    native = tmp_path / "n.onnx"
    stages.export(run, native, None, 0, fmt="native", native_layers="all")
    model = onnx.load(native)
    conv = next(n for n in model.graph.node if n.op_type == "Int4Conv")
    next(a for a in conv.attribute if a.name == "K").i = 7  # no longer matches the input channels
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    result = CliRunner().invoke(app, ["run", str(broken), "--data", str(TEST), "--num-samples", "8"])
    assert result.exit_code == 1
    assert f"ONNX Runtime failed running the model: {conv.name}: K must equal" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def _padded_convs_model(mode: str, value: float):
    """Conv -> Relu -> Pad (uneven spatial pads, `mode`, constant `value`) -> depthwise stride-2 Conv,
    and the same Pad -> a plain Conv, both summed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array(value, np.float32), "pad_value")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Pad", ["r0", "pads", "pad_value"], ["p0"], name="pad0", mode=mode),
             helper.make_node("Conv", ["p0", "w1"], ["c1"], name="depthwise", group=4, strides=[2, 2]),
             helper.make_node("Pad", ["r0", "pads", "pad_value"], ["p1"], name="pad1", mode=mode),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="plain", strides=[2, 2]),
             helper.make_node("Add", ["c1", "c2"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 11, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode,value,absorbed", [("constant", 0.0, True), ("constant", 0.5, False),
                                                 ("reflect", 0.0, False)])
def test_zero_pads_in_front_of_native_convs_join_their_pads(tmp_path, mode, value, absorbed):
    model_path, data_path = tmp_path / "padded.onnx", tmp_path / "calib.npy"
    onnx.save(_padded_convs_model(mode, value), str(model_path))
    x = np.random.default_rng(2).normal(0, 1, (32, 3, 11, 11)).astype(np.float32)
    np.save(data_path, x)
    run = tmp_path / "run"
    # Every activation kept quantized (no damage measurement): both convs then read 8-bit inputs, which
    # the native operators consume as the same integers the QDQ model computes with.
    stages.calibrate(model_path, QuantConfig(weights="int4", act_damage_limit=None),
                     DataConfig(path=str(data_path), num_samples=32), run)
    qdq, native = tmp_path / "q.onnx", tmp_path / "n.onnx"
    stages.export(run, qdq)
    stages.export(run, native, fmt="native", native_layers="all")

    model = onnx.load(native)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Int4Conv") == 3
    assert ("Pad" in ops) != absorbed
    want = nativelib.session(qdq).run(None, {"x": x})[0]
    got = nativelib.session(native).run(None, {"x": x})[0]
    # The same integers either way: only the float sums of the QDQ convs are ordered differently.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("block, zeros, replaced", [
    ("32", "--weight-zero-points", True),   # zero points per block of 32: Int4MatMul's group_size 32
    ("32", None, True),                      # symmetric blocks: the default zero code
    ("16", "--weight-zero-points", False),   # the kernels' groups are multiples of 32
    ("32", "--float-zero-points", False),    # unrounded zero points: MatMulNBits' alone
])
def test_block_wise_weight_only_matmuls_become_int4_matmul_with_groups(tmp_path, block, zeros, replaced):
    """A language model's weight-only blocks run on Int4MatMul (group_size = the block size) and give
    what ORT's MatMulNBits gives on the same plan; blocks the kernels cannot take stay MatMulNBits,
    and the export says why."""
    import onnxruntime as ort

    from cli_runner import run_in_process as ptq
    from transformer_builders import tiny_language_model, token_data

    model = tmp_path / "lm.onnx"
    onnx.save(tiny_language_model(), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(32, seed=1))
    run = tmp_path / "run"
    args = ["--acts", "none", "--weights", "int4", "--block-size", block, *([zeros] if zeros else [])]
    r = ptq("calibrate", model, "--data", tmp_path / "calib.npz", *args, "--rounding", "gptq", "-o", run)
    assert r.returncode == 0, r.stderr
    nbits, native = tmp_path / "nbits.onnx", tmp_path / "native.onnx"
    assert ptq("export", run, "-o", nbits, "--no-latency").returncode == 0
    r = ptq("export", run, "-o", native, "--format", "native", "--native-layers", "all", "--no-latency")
    if not replaced:
        assert r.returncode == 1 and "no layer has a native kernel" in r.stderr and not native.exists()
        return
    assert r.returncode == 0, r.stderr
    ops = {n.name: n for n in onnx.load(str(native)).graph.node if n.domain in ("com.microsoft", nativelib.DOMAIN)}
    assert {n.op_type for n in ops.values()} == {"Int4MatMul"} and len(ops) == 3
    assert {a.name: a.i for a in ops["lm_head"].attribute}["group_size"] == int(block)
    feeds = token_data(8, seed=2)
    expected = ort.InferenceSession(str(nbits), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = nativelib.session(native).run(None, feeds)[0]
    cosine = np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.9999  # both quantize activations to int8 on the fly, in blocks or rows


def test_a_matmuls_bias_add_is_added_by_its_native_operator(tmp_path):
    """An encoder's projections are MatMul + Add of a bias vector: the native operator takes the
    vector as its Bias and writes the Add's output, so the Add is gone; outputs stay the QDQ export's.
    The Add in front of the erf GELU goes too: ORT then fuses the rest into one Gelu."""
    import onnxruntime as ort

    from transformer_builders import encoder_model, token_data

    model = tmp_path / "encoder.onnx"
    onnx.save(encoder_model(), str(model))
    np.savez(tmp_path / "calib.npz", **token_data(64, seed=1))
    run = tmp_path / "run"
    stages.calibrate(model, QuantConfig(weights="int4", rounding="nearest"),
                     DataConfig(path=str(tmp_path / "calib.npz"), num_samples=64), run)
    qdq, native = tmp_path / "q.onnx", tmp_path / "n.onnx"
    stages.export(run, qdq, None, 0)
    stages.export(run, native, None, 0, fmt="native", native_layers="all")
    nodes = onnx.load(str(native)).graph.node
    operators = {n.name: n for n in nodes if n.op_type == "Int4MatMul"}
    assert {"q_proj", "o_proj", "ffn_in", "ffn_out"} <= set(operators)
    biased = {name for name, n in operators.items() if len(n.input) == 7 and n.input[6]}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "ffn_in", "ffn_out"} <= biased
    assert operators["o_proj"].output[0] == "o" and not any(n.name in ("o_bias", "ffn_bias") for n in nodes)
    feeds = token_data(16, seed=2)
    expected = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]).run(["hidden"], feeds)[0]
    got = nativelib.session(native).run(["hidden"], feeds)[0]
    cosine = np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.999


def test_fastest_leaves_layers_on_8bit_inputs_to_orts_integer_kernels(tmp_path):
    """The default layer choice: the embedded CNN at W4A8 reads 8-bit activations everywhere, so ORT's
    QLinearConv/QGemm run every layer, on int4 codes widened at load (the file stays int4-sized);
    weight-only layers still go to the native operators."""
    run = tmp_path / "run"
    stages.calibrate(FASHION, QuantConfig(weights="int4", float_stem=False), DataConfig(path=str(CALIB), num_samples=64), run)
    fastest, every = tmp_path / "fastest.onnx", tmp_path / "all.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(fastest), "--format", "native", "--no-latency",
                                      "--eval-data", str(TEST), "--eval-samples", "300"])
    assert result.exit_code == 0, result.output
    assert "native operators: none" in result.output
    printed = " ".join(result.output.split())
    assert "kept as QDQ: conv1, conv2, conv3 (ORT's integer Conv kernel runs its 8-bit input faster" in printed
    assert "kept as QDQ: fc1, fc2 (ORT's integer Gemm kernel" in printed
    stages.export(run, every, str(TEST), 300, fmt="native", latency=False, native_layers="all")
    card = json.loads((tmp_path / "fastest.card.json").read_text())
    assert card["model"]["native"]["layers"] == "fastest" and card["model"]["native"]["replaced"] == {}
    assert [row["kernel"] for row in card["layers"]] == ["QLinearConv"] * 3 + ["QGemm"] * 2
    assert card["model"]["container"]["widened_at"] == "load" and len(card["model"]["container"]["int8"]) == 5
    # int4 codes in the file: near the native packing, well below the codes stored as int8
    wide = tmp_path / "int8.onnx"
    stages.export(run, wide, None, 0, latency=False, container="int8")
    assert fastest.stat().st_size < 0.7 * wide.stat().st_size
    assert fastest.stat().st_size < 1.25 * every.stat().st_size
    every_card = json.loads((tmp_path / "all.card.json").read_text())
    assert every_card["results"]["accuracy"]["quantized"] == pytest.approx(
        card["results"]["accuracy"]["quantized"], abs=0.01)

    weight_only = tmp_path / "wo"
    stages.calibrate(FASHION, QuantConfig(weights="int4", acts="none", float_stem=False), DataConfig(path=str(CALIB), num_samples=32),
                     weight_only)
    out = tmp_path / "wo.onnx"
    stages.export(weight_only, out, None, 0, fmt="native", latency=False)
    assert {n.op_type for n in onnx.load(out).graph.node if n.domain == "ptqcli"} == {"Int4Conv", "Int4Gemm"}
    bad = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--format", "native", "--native-layers", "some"])
    assert bad.exit_code == 1 and "unknown --native-layers 'some' (known: fastest, all)" in bad.output


def test_fastest_leaves_pow2_layers_on_8bit_inputs_to_ort_from_4bit_indices(tmp_path):
    run = tmp_path / "run"
    stages.calibrate(FASHION, QuantConfig(weights="pow2:4", float_stem=False), DataConfig(path=str(CALIB), num_samples=64), run)
    fastest, every = tmp_path / "fastest.onnx", tmp_path / "all.onnx"
    stages.export(run, fastest, str(TEST), 300, fmt="native", latency=False)
    stages.export(run, every, str(TEST), 300, fmt="native", latency=False, native_layers="all")
    ops = [{n.op_type for n in onnx.load(p).graph.node if n.domain == "ptqcli"} for p in (fastest, every)]
    assert ops == [set(), {"ShiftConv", "ShiftGemm"}]
    card = json.loads((tmp_path / "fastest.card.json").read_text())
    assert [row["kernel"] for row in card["layers"]] == ["QLinearConv"] * 3 + ["QGemm"] * 2
    assert len(card["model"]["container"]["indexed"]) == 5
    assert fastest.stat().st_size < 1.25 * every.stat().st_size
