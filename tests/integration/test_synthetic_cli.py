"""`ptq calibrate --synthetic`: data-free calibration through the normal path."""

import json

import pytest

from conftest import ASSETS
from test_cli import assert_user_error, ptq


@pytest.mark.slow
def test_bn_synthetic_w8a8_close_to_real_data(tmp_path):
    out = tmp_path / "syn.onnx"
    r = ptq("quantize", ASSETS / "fashion_cnn.onnx", "--synthetic", "bn", "--num-samples", 64, "--iters", 60,
            "--eval-data", ASSETS / "fashion_test.npz", "--eval-samples", 2000, "-o", out)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "syn.card.json").read_text())
    assert card["calibration"]["kind"] == "synthetic" and card["recipe"]["data"]["synthetic"] == "bn"
    accuracy = card["results"]["accuracy"]
    assert accuracy["float"] - accuracy["quantized"] <= 0.01
    assert (tmp_path / "syn.onnx.run" / "synthetic.npz").is_file()


def test_synthetic_refusals(tmp_path, tiny_data):
    import onnx
    import sys

    sys.path.insert(0, str(ASSETS.parents[1] / "tests"))
    from builders import encoder_model

    no_bn = tmp_path / "encoder.onnx"
    onnx.save(encoder_model(), str(no_bn))
    assert_user_error(ptq("calibrate", no_bn, "--synthetic", "bn", "-o", tmp_path / "r1"), "PRESERVE")
    assert_user_error(ptq("calibrate", ASSETS / "fashion_cnn.onnx", "--synthetic", "bn", "--data", tiny_data,
                          "-o", tmp_path / "r2"), "not both")
    assert_user_error(ptq("calibrate", ASSETS / "fashion_cnn.onnx", "--synthetic", "noise", "-o", tmp_path / "r3"),
                      "--synthetic must be")
