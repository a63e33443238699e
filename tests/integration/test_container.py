"""Sub-8-bit weight codes stored for the kernel that will run them (`--container`), checked in ORT's
optimized graph: where the layer reads a quantized activation, int4 codes read as int8 (ORT fuses
the layer into QLinearConv / QGemm / MatMulIntegerToFloat), widened by a Cast ORT folds at load
(auto) or in the file (int8); the smallest container elsewhere."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from builders import encoder_model
from conftest import ASSETS
from ptqcli.export.card import card_paths, read_card
from ptqcli.export.fidelity import INTEGER_KERNELS
from ptqcli.runtime import optimized_op_counts, session
from test_cli import assert_user_error, ptq

MODEL, CALIB, TEST = ASSETS / "fashion_cnn.onnx", ASSETS / "fashion_calib.npz", ASSETS / "fashion_test.npz"
LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2"]
MODES = ("auto", "int8", "int4")


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    """The embedded CNN calibrated to int4 weights and uint8 activations, exported in every container."""
    tmp = tmp_path_factory.mktemp("w4a8")
    run = tmp / "run"
    # the stem too: every layer's container is under test
    r = ptq("calibrate", MODEL, "--data", CALIB, "--num-samples", 128, "--weights", "int4", "--no-float-stem", "-o", run)
    assert r.returncode == 0, r.stderr
    models = {}
    for mode in MODES:
        out = tmp / f"{mode}.onnx"
        r = ptq("export", run, "-o", out, "--eval-data", TEST, "--eval-samples", 400, "--no-latency",
                *(["--container", mode] if mode != "auto" else []))
        assert r.returncode == 0, r.stderr
        models[mode] = out
        if mode == "auto":
            assert "5 sub-8-bit layers stored as int4 and widened to int8 codes when ORT loads" in " ".join(r.stdout.split())
    return models


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def weight_name(node: str) -> str:
    return "fc1.weight" if node == "fc1" else f"{node}.weight"


@pytest.mark.parametrize("mode, stored, at", [("auto", "int4, int8 at load", "load"), ("int8", "int8", "file")])
def test_int4_codes_read_as_int8_and_ort_fuses_every_layer(w4a8, mode, stored, at):
    card = read_card(card_paths(w4a8[mode])["json"])
    assert [(row["node"], row["format"], row["container"]) for row in card["layers"]] == [
        (node, "int4", stored) for node in LAYERS]
    assert [row["kernel"] for row in card["layers"]] == ["QLinearConv"] * 3 + ["QGemm"] * 2
    container = card["model"]["container"]
    assert container["mode"] == mode and container["widened_at"] == at and sorted(container["int8"]) == sorted(LAYERS)
    assert container["smallest"] == {} and container["not_fused"] == {}
    # ORT's own optimized graph: every layer fused, no weight dequantized or cast at run time
    ops = optimized_op_counts(onnx.load(str(w4a8[mode])))
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2
    assert "DequantizeLinear" not in ops and "Cast" not in ops
    assert card["results"]["kernel_ops"] == ops


def test_auto_keeps_int4_codes_in_the_file(w4a8):
    inits = initializers(w4a8["auto"])
    for node in LAYERS:
        assert inits[f"{weight_name(node)}_quantized"].data_type == TensorProto.INT4
        assert inits[f"{weight_name(node)}_zero_point"].data_type == TensorProto.INT4
    casts = [n for n in onnx.load(str(w4a8["auto"])).graph.node if n.op_type == "Cast"]
    assert sorted(n.input[0] for n in casts) == sorted(f"{weight_name(node)}_{part}" for node in LAYERS
                                                       for part in ("quantized", "zero_point"))
    assert all(n.attribute[0].i == TensorProto.INT8 for n in casts)


def test_the_smallest_container_runs_in_float(w4a8):
    card = read_card(card_paths(w4a8["int4"])["json"])
    assert [row["container"] for row in card["layers"]] == ["int4"] * 5
    assert [row["kernel"] for row in card["layers"]] == ["Conv (float)"] * 3 + ["Gemm (float)"] * 2
    assert card["model"]["container"] == {"mode": "int4", "int8": {}, "extra_bytes": 0, "not_fused": {},
                                          "widened_at": "load", "smallest": {node: "--container int4" for node in LAYERS}}
    ops = optimized_op_counts(onnx.load(str(w4a8["int4"])))
    assert ops["DequantizeLinear"] >= 5 and "QLinearConv" not in ops and "QGemm" not in ops


def test_every_container_holds_the_same_levels(w4a8):
    stores = {mode: initializers(w4a8[mode]) for mode in MODES}
    for node in LAYERS:
        for part in ("quantized", "zero_point", "scale"):
            name = f"{weight_name(node)}_{part}"
            values = [numpy_helper.to_array(stores[mode][name]).astype(np.float64) for mode in MODES]
            np.testing.assert_array_equal(values[0], values[1])
            np.testing.assert_array_equal(values[0], values[2])
        assert stores["int8"][f"{weight_name(node)}_quantized"].data_type == TensorProto.INT8
    # so the models compute the same thing where nothing is fused (every node run as written)
    feeds = {"input": np.load(TEST)["input"][:16]}
    runs = [session(onnx.load(str(w4a8[m])), optimize=False).run(None, feeds)[0] for m in MODES]
    np.testing.assert_array_equal(runs[0], runs[2])
    np.testing.assert_array_equal(runs[1], runs[2])


def test_the_size_cost_is_recorded(w4a8):
    cards = {mode: read_card(card_paths(w4a8[mode])["json"]) for mode in MODES}
    narrow = initializers(w4a8["int4"])
    codes = [int(np.prod(t.dims)) for name, t in narrow.items() if t.data_type == TensorProto.INT4]
    assert len(codes) == 10  # weights and their per-channel zero points
    half_bytes = sum(n - (n + 1) // 2 for n in codes)  # half a byte more per code
    for mode, low, high in (("int8", half_bytes, half_bytes + 2 * len(codes)), ("auto", 1, 128 * len(codes))):
        extra = cards[mode]["model"]["container"]["extra_bytes"]
        assert low <= extra <= high, (mode, extra)
        grown = w4a8[mode].stat().st_size - w4a8["int4"].stat().st_size
        assert abs(grown - extra) <= 16  # the file grows by that much (length prefixes aside)
    assert w4a8["auto"].stat().st_size < w4a8["int4"].stat().st_size + half_bytes / 10
    assert "stored as 8-bit codes for ORT's integer kernels (+" in card_paths(w4a8["int8"])["md"].read_text()
    assert "widened to int8 codes when ORT loads the model" in card_paths(w4a8["auto"])["md"].read_text()


def test_accuracy_of_the_fused_models_matches_the_emulated_one(w4a8):
    accuracy = {mode: read_card(card_paths(w4a8[mode])["json"])["results"]["accuracy"] for mode in MODES}
    assert accuracy["auto"] == accuracy["int8"]  # the same kernels on the same codes
    assert accuracy["auto"]["float"] == accuracy["int4"]["float"]
    assert abs(accuracy["auto"]["quantized"] - accuracy["int4"]["quantized"]) <= 0.01  # 4 of 400: integer vs float


def test_weight_only_layers_are_decoded_at_load_unless_asked_and_the_check_says_what_did_not_fuse(tmp_path, tiny_cnn):
    """Dynamic activations leave every layer of the tiny CNN weight-only: no integer Conv/Gemm kernel.
    auto keeps their int4 codes in the file and has ORT fold them into float weights when it loads
    the model (no dequantization on every run); --container int4 leaves the DequantizeLinears."""
    cards, models = {}, {}
    for mode in ("auto", "int8", "int4"):
        out = tmp_path / f"{mode}.onnx"
        r = ptq("quantize", tiny_cnn, "--acts", "dynamic", "--weights", "int4", "--container", mode, "-o", out,
                "--no-latency")
        assert r.returncode == 0, r.stderr
        cards[mode], models[mode] = read_card(card_paths(out)["json"]), out
        if mode == "int8":
            assert "read as int8 but not fused: conv1" in r.stdout  # the int8 run's console says so too
    auto = cards["auto"]["model"]["container"]
    assert auto["int8"] == {} and auto["smallest"] == {} and set(auto["decoded"]) == {"conv1", "conv2", "fc"}
    assert [row["container"] for row in cards["auto"]["layers"]] == ["int4, float32 at load"] * 3
    assert [row["kernel"] for row in cards["auto"]["layers"]] == ["Conv (float, folded)"] * 2 + ["Gemm (float, folded)"]
    ops = optimized_op_counts(onnx.load(str(models["auto"])))
    assert "DequantizeLinear" not in ops and "Cast" not in ops and "Mul" not in ops  # all folded at load
    assert all(row["kernel"].endswith("(float)") for row in cards["int4"]["layers"])  # dequantized every run
    # the same float weights either way: decoding at load is DequantizeLinear's arithmetic
    feeds = {"input": np.random.default_rng(0).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    runs = [session(onnx.load(str(models[m])), optimize=False).run(None, feeds)[0] for m in ("auto", "int4")]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert "decoded" not in cards["int4"]["model"]["container"]
    forced = cards["int8"]["model"]["container"]
    assert set(forced["int8"]) == {"conv1", "conv2", "fc"} and forced["extra_bytes"] > 0
    # int8 codes on a float input buy no integer kernel here, and the card says so
    assert set(forced["not_fused"]) == {"conv1", "conv2", "fc"}
    assert all(k not in INTEGER_KERNELS for k in forced["not_fused"].values())
    assert "read as 8-bit but not fused: conv1" in card_paths(tmp_path / "int8.onnx")["md"].read_text()


def test_matmuls_reading_quantized_activations_fuse(tmp_path):
    model, data = tmp_path / "encoder.onnx", tmp_path / "x.npy"
    onnx.save(encoder_model(), str(model))
    np.save(data, np.random.default_rng(0).normal(0, 1, (32, 16, 32)).astype(np.float32))
    out = tmp_path / "encoder.q.onnx"
    r = ptq("quantize", model, "--data", data, "--num-samples", 32, "--weights", "int4", "-o", out, "--no-latency")
    assert r.returncode == 0, r.stderr
    card = json.loads(card_paths(out)["json"].read_text())
    matmuls = [row for row in card["layers"] if row["op_type"] == "MatMul"]
    assert len(matmuls) == 6
    assert all(row["container"] == "int4, int8 at load" and row["kernel"] in INTEGER_KERNELS for row in matmuls), [
        (row["container"], row["kernel"]) for row in matmuls]
    assert card["model"]["container"]["not_fused"] == {}


def test_an_unknown_container_is_refused(tmp_path, tiny_cnn, tiny_data):
    out = tmp_path / "m.onnx"
    assert_user_error(ptq("quantize", tiny_cnn, "--data", tiny_data, "--container", "int2", "-o", out),
                      "unknown container 'int2' (known: auto, int4, int8)")
    assert not out.exists() and not (tmp_path / "m.onnx.run").exists()


@pytest.mark.parametrize("weights, table_type, fused, layers", [
    ("pow2:4", TensorProto.INT8, True, LAYERS),
    ("ternary", TensorProto.INT8, True, LAYERS[1:-1]),  # ternary keeps the first and last layers at int8
    ("exp:3", TensorProto.INT16, False, LAYERS)])
def test_level_set_codes_are_stored_as_4bit_indices_and_decoded_at_load(tmp_path, weights, table_type, fused, layers):
    run = tmp_path / "run"
    r = ptq("calibrate", MODEL, "--data", CALIB, "--num-samples", 64, "--weights", weights, "--no-float-stem", "-o", run)
    assert r.returncode == 0, r.stderr
    paths = {mode: tmp_path / f"{mode}.onnx" for mode in ("auto", "int8")}
    for mode, out in paths.items():
        r = ptq("export", run, "-o", out, "--container", mode, "--no-latency")
        assert r.returncode == 0, r.stderr
    cards = {mode: read_card(card_paths(out)["json"]) for mode, out in paths.items()}
    auto, wide = initializers(paths["auto"]), initializers(paths["int8"])
    for node in layers:
        codes = f"{weight_name(node)}_quantized"
        index, table = auto[f"{codes}_index"], auto[f"{codes}_levels"]
        assert codes not in auto and index.data_type == TensorProto.UINT4 and table.data_type == table_type
        levels = numpy_helper.to_array(table)
        assert len(levels) <= 16 and np.all(np.diff(levels) > 0)
        # the indices pick out exactly the codes the int8 container stores
        np.testing.assert_array_equal(levels[numpy_helper.to_array(index).astype(np.int64)],
                                      numpy_helper.to_array(wide[codes]))
    container = cards["auto"]["model"]["container"]
    assert sorted(container["indexed"]) == sorted(layers) and container["saved_bytes"] > 0
    assert "indexed" not in cards["int8"]["model"]["container"]
    saved = container["saved_bytes"] - container.get("decoded_bytes", 0)
    assert paths["int8"].stat().st_size - paths["auto"].stat().st_size == pytest.approx(saved, abs=16)
    assert [row["node"] for row in cards["auto"]["layers"] if row["container"].startswith("uint4 indices")] == layers
    kernels = [[row["kernel"] for row in cards[mode]["layers"]] for mode in paths]
    if fused:
        assert kernels[0] == kernels[1] and all(k in INTEGER_KERNELS for k in kernels[0])  # from the smaller file
    else:  # int16 codes: ORT runs them in float; under auto decoded once at load, not on every run
        assert all(k.endswith("(float, folded)") for k in kernels[0]) and all(k.endswith("(float)") for k in kernels[1])
        assert sorted(container["decoded"]) == sorted(LAYERS)
    ops = optimized_op_counts(onnx.load(str(paths["auto"])))
    assert "Gather" not in ops and "Cast" not in ops  # decoded once, when ORT loaded the model
    feeds = {"input": np.load(TEST)["input"][:16]}
    for optimize in (False, True):
        runs = [session(onnx.load(str(p)), optimize=optimize).run(None, feeds)[0] for p in paths.values()]
        np.testing.assert_array_equal(runs[0], runs[1])


def test_weight_only_level_set_layers_decode_from_their_indices_at_load(tmp_path):
    """pow2 weights on float inputs: 4-bit indices in the file, a Gather, then the Cast and Mul that
    turn the codes into float weights, all folded when ORT loads the model."""
    out = tmp_path / "pow2.onnx"
    r = ptq("quantize", MODEL, "--data", CALIB, "--num-samples", 64, "--weights", "pow2:4", "--acts", "none", "-o", out,
            "--no-latency", "--eval-data", TEST, "--eval-samples", 200)
    assert r.returncode == 0, r.stderr
    card = read_card(card_paths(out)["json"])
    container = card["model"]["container"]
    assert sorted(container["decoded"]) == sorted(container["indexed"]) == sorted(LAYERS)
    assert [row["kernel"] for row in card["layers"]] == ["Conv (float, folded)"] * 3 + ["FusedGemm (float, folded)", "Gemm (float, folded)"]
    ops = optimized_op_counts(onnx.load(str(out)))
    assert not {"DequantizeLinear", "Gather", "Cast"} & set(ops)
    plain = tmp_path / "plain.onnx"
    assert ptq("export", tmp_path / "pow2.onnx.run", "-o", plain, "--container", "int8", "--no-latency").returncode == 0
    feeds = {"input": np.load(TEST)["input"][:16]}
    runs = [session(onnx.load(str(p)), optimize=False).run(None, feeds)[0] for p in (out, plain)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_layer_ort_runs_in_float_gets_its_weights_decoded_at_load(tmp_path):
    """Two Convs read one quantized tensor; one's output stays quantized (QLinearConv), the other's
    does not, so ORT runs it in float and would dequantize its weights on every run. The export
    reads that from ORT's optimized graph and decodes those weights at load instead: the card shows
    it folded, with the reason, and the outputs are those ORT computes from the QDQ graph as written."""
    import onnxruntime as ort
    from dataclasses import replace

    from onnx import TensorProto, helper, numpy_helper
    from ptqcli import rundir, stages
    from ptqcli.config import DataConfig, QuantConfig
    from ptqcli.export.container import UNFUSED_REASON

    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu_a"),
             helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             helper.make_node("Conv", ["rb", "wd"], ["y1"], name="conv_d", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["r", "wc"], ["c"], name="conv_c"),
             helper.make_node("Sigmoid", ["c"], ["y2"], name="sigmoid_c")]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 8, 8, 8]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [w("wa", (8, 3, 3, 3)), w("wb", (8, 8, 3, 3)), w("wc", (4, 8, 1, 1)), w("wd", (8, 8, 3, 3))])
    model = tmp_path / "branches.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    x = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    run = tmp_path / "run"
    stages.calibrate(model, QuantConfig(act_damage_limit=None), DataConfig(path=str(tmp_path / "calib.npz")), run)
    plan = rundir.read_plan(run)
    assert {"r", "c"} <= set(plan.tensors)
    # conv_c's output goes back to float (as a damage measurement may decide); conv_b keeps r quantized
    rundir.write_plan(run, replace(plan, tensors={k: v for k, v in plan.tensors.items() if k not in ("c", "y2")}))
    out = tmp_path / "q.onnx"
    stages.export(run, out, None, 0, latency=False)
    card = json.loads(out.with_suffix(".card.json").read_text())
    kernels = {layer["node"]: layer["kernel"] for layer in card["layers"]}
    assert kernels["conv_b"] == "QLinearConv" and kernels["conv_c"] == "Conv (float, folded)", kernels
    assert card["model"]["container"]["decoded"]["conv_c"] == UNFUSED_REASON
    feeds = {"x": x[:4]}
    literal = ort.SessionOptions()
    literal.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(out), literal, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
