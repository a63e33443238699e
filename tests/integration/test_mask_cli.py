"""`ptq mask` on the embedded model: masks hold their N:M invariants through re-fit, quantization and export."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import ASSETS
from ptqcli.geometry import weight_to_matrix
from test_cli import assert_user_error, ptq

MODEL, CALIB, TEST = ASSETS / "fashion_cnn.onnx", ASSETS / "fashion_calib.npz", ASSETS / "fashion_test.npz"


def _accuracy(path):
    data = np.load(TEST)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())


def _groups_keep(matrix, n, m):
    groups = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(axis=2)
    return np.all(groups <= n)


@pytest.mark.slow
def test_model_masks_with_refit_keep_accuracy(tmp_path):
    refit, plain = tmp_path / "refit", tmp_path / "plain"
    assert ptq("mask", MODEL, "--nm", "2:4", "--data", CALIB, "--samples", 128, "-o", refit).returncode == 0
    assert ptq("mask", MODEL, "--nm", "2:4", "--no-refit", "-o", plain).returncode == 0
    masks = np.load(refit / "masks.npz")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(refit / "model.float.onnx")).graph.initializer}
    conv3 = weight_to_matrix(weights["conv3.weight"], "Conv", 0)
    assert _groups_keep(conv3, 2, 4) and masks["conv3.weight"].mean() == 0.5
    assert np.all(weights["fc1.weight"][~masks["fc1.weight"]] == 0)
    dense, fitted, unfitted = _accuracy(MODEL), _accuracy(refit / "model.float.onnx"), _accuracy(plain / "model.float.onnx")
    assert fitted > dense - 0.02  # re-fit recovers nearly all of it
    assert fitted > unfitted + 0.1


@pytest.mark.slow
def test_run_masks_survive_quantization_and_export(tmp_path):
    run, out = tmp_path / "run", tmp_path / "q.onnx"
    assert ptq("calibrate", MODEL, "--data", CALIB, "-o", run).returncode == 0
    r = ptq("mask", run, "--nm", "2:4", "--transposable", "--samples", 128)
    assert r.returncode == 0, r.stderr
    assert ptq("export", run, "-o", out, "--eval-data", TEST, "--eval-samples", 2000).returncode == 0
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    fc1 = q["fc1.weight_quantized"]  # int8 [128, 64]
    assert _groups_keep(fc1, 2, 4) and _groups_keep(fc1.T, 2, 4)  # transposable: both directions
    card = json.loads((tmp_path / "q.card.json").read_text())
    sparsity = {row["node"]: row["sparsity"] for row in card["layers"]}
    assert sparsity["fc1"] == "2:4 transposable"
    assert card["results"]["accuracy"]["quantized"] > 0.88


def test_bad_mask_requests(tmp_path):
    assert_user_error(ptq("mask", MODEL, "--nm", "5:4", "-o", tmp_path / "r"), "need 0 < N <= M")
    assert_user_error(ptq("mask", MODEL, "--nm", "2-4", "-o", tmp_path / "r"), "--nm takes N:M")
    assert_user_error(ptq("mask", MODEL, "--nm", "2:4", "--data", CALIB), "needs -o")



def test_mask_without_data_masks_without_refit(tmp_path):
    r = ptq("mask", MODEL, "--nm", "2:4", "-o", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert "without a re-fit" in r.stdout
    masks = np.load(tmp_path / "r" / "masks.npz")
    assert masks["conv3.weight"].mean() == 0.5
