"""The shipped Fashion-MNIST model on its labelled test slice: real data, real ORT kernels."""

import json

import onnx
import pytest

from conftest import ASSETS
from ptqcli import stages
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.plan import STEM_REASON
from ptqcli.rundir import read_plan


def test_assets_are_small_and_keep_batchnorm():
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.suffix in (".onnx", ".npz"))
    assert total < 5_000_000
    ops = [n.op_type for n in onnx.load(str(ASSETS / "fashion_cnn.onnx")).graph.node]
    assert ops.count("BatchNormalization") == 3


@pytest.mark.slow
def test_w8a8_top1_within_half_a_point_of_float(tmp_path):
    run = tmp_path / "run"
    stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(),
                     DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=512), run)
    _, fidelity = stages.export(run, tmp_path / "q.onnx", eval_data=str(ASSETS / "fashion_test.npz"),
                                eval_samples=2000)
    assert fidelity.samples == 2000 and fidelity.held_out
    float_acc, quant_acc = fidelity.accuracy["float"], fidelity.accuracy["quantized"]
    assert float_acc > 0.90
    assert round(float_acc - quant_acc, 9) <= 0.005  # exactly half a point is within it
    assert fidelity.outputs["logits"]["top1_agreement"] > 0.97
    # Measured on ORT's integer kernels, not on an emulation.
    assert fidelity.integer_kernels.get("QLinearConv") == 2  # conv1, the one-channel stem, runs in float
    saved = json.loads((run / "fidelity.json").read_text())
    assert saved["accuracy"]["quantized"] == quant_acc
    assert [layer["node"] for layer in saved["layers"]] == ["conv2", "conv3", "fc1", "fc2"]
    assert saved["layers"][-1]["sqnr_db"] == fidelity.outputs["logits"]["sqnr_db"]  # fc2 makes the logits


def test_w4a8_runs_and_reports_its_kernel_path(tmp_path):
    run = tmp_path / "run"
    stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int4"),
                     DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
    _, fidelity = stages.export(run, tmp_path / "q4.onnx", eval_data=str(ASSETS / "fashion_test.npz"),
                                eval_samples=500)
    # Stored as int8 codes (the default container), the int4 layers run on ORT's integer kernels; the
    # one-channel stem Conv runs in float, its input unquantized.
    assert fidelity.integer_kernels.get("QLinearConv") == 2 and fidelity.integer_kernels.get("QGemm") == 2
    plan = read_plan(run)
    assert plan.float_nodes == {"conv1": STEM_REASON} and "input" not in plan.tensors
    assert fidelity.accuracy["quantized"] > 0.80
    _, smallest = stages.export(run, tmp_path / "q4s.onnx", eval_data=str(ASSETS / "fashion_test.npz"),
                                eval_samples=500, container="int4")
    # int4 codes have no integer conv kernel in ORT: they run dequantized, and the report says so.
    assert "QLinearConv" not in smallest.integer_kernels
    assert smallest.accuracy["quantized"] > 0.80


@pytest.mark.slow
def test_bias_correction_recovers_low_bit_accuracy(tmp_path):
    """W3A8 on the labelled slice, nearest rounding: bias correction (on by default with nearest
    rounding below 8 bits) must help a lot. Every layer at 3 bits, the stem too."""
    results = {}
    for corrected in (False, True):
        run = tmp_path / f"run{corrected}"
        stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int3", rounding="nearest",
                                                                  bias_correction=corrected, float_stem=False),
                         DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
        _, f = stages.export(run, tmp_path / f"q{corrected}.onnx", eval_data=str(ASSETS / "fashion_test.npz"),
                             eval_samples=2000)
        results[corrected] = f.accuracy["quantized"]
    assert results[True] > results[False] + 0.05
    # The default with data below 8 bits is layer-wise rounding: well above nearest + bias correction.
    run = tmp_path / "run_default"
    plan = stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int3", float_stem=False),
                            DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
    _, f = stages.export(run, tmp_path / "q_default.onnx", eval_data=str(ASSETS / "fashion_test.npz"), eval_samples=2000)
    assert plan.quant.rounding.value == "adaround" and plan.config["rounding_choice"].startswith("auto: adaround")
    assert (run / "rounding.json").is_file() and not plan.quant.corrects_bias
    assert f.accuracy["quantized"] > results[True] + 0.05
    assert QuantConfig(weights="int3", rounding="nearest").corrects_bias
    assert not QuantConfig(weights="int8", rounding="nearest").corrects_bias


@pytest.mark.slow
def test_adaround_w4a8_close_to_float_and_deterministic(tmp_path):
    """AdaRound W4A8 on the labelled slice: within 1.5 points of float; same seed, same model."""
    outputs = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int4", rounding="adaround", rounding_iters=300),
                         DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
        _, f = stages.export(run, tmp_path / f"q{i}.onnx", eval_data=str(ASSETS / "fashion_test.npz"), eval_samples=2000)
        outputs.append((tmp_path / f"q{i}.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    assert f.accuracy["float"] - f.accuracy["quantized"] <= 0.015
    report = json.loads((run / "rounding.json").read_text())
    assert all(layer["loss_after"] <= layer["loss_nearest"] for layer in report["layers"])
    assert (run / "params.npz").is_file()  # learned weights live beside plan.json


@pytest.mark.slow
def test_bias_correction_on_the_quantized_prefix_leaves_less_mean_error_than_on_float_means(tmp_path):
    """Nearest W3A8: biases corrected against the quantized prefix's input means leave the model's
    logits with less mean error on held-out images than corrections from the float means alone."""
    import numpy as np

    from ptqcli.allocate.target import deployed
    from ptqcli.calibrate.planner import requantize_biases
    from ptqcli.rundir import load_run
    from ptqcli.runtime import session

    run = tmp_path / "run"
    plan = stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int3", rounding="nearest"),
                            DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
    sources = [t.source.get("bias_correction") for t in plan.of_role("bias").values()]
    assert sources and all(s == "quantized prefix" for s in sources)
    loaded = load_run(run)
    float_means = requantize_biases(loaded.graph, loaded.plan, loaded.stats, loaded.plan.quant)
    assert all(t.source.get("bias_correction") is True for t in float_means.of_role("bias").values())
    test = np.load(ASSETS / "fashion_test.npz")
    x = test[next(k for k in test.files if k != "labels")][:1000]
    name = loaded.graph.model.graph.input[0].name
    reference = session(loaded.graph.model).run(None, {name: x})[0]

    def mean_error(p):
        out = session(deployed(loaded, p)).run(None, {name: x})[0]
        return float(np.linalg.norm((out - reference).mean(axis=0)))

    assert mean_error(loaded.plan) < 0.8 * mean_error(float_means)
