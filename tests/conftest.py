import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "integration"))
from builders import conv_bn_relu_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "ptqcli" / "assets"


@pytest.fixture
def tiny_cnn(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_bn_relu_model(), str(path))
    return path


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).normal(0, 1, (64, 3, 8, 8)).astype(np.float32))
    return path
