"""Without the compiled operator library, native export is a clear one-line error, never a crash."""

import pytest

from ptqcli import nativelib
from ptqcli.errors import PtqError


def test_missing_library_is_reported_not_crashed(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQ_NATIVE_LIB", str(tmp_path / "absent.so"))
    assert nativelib.library_path() is None and not nativelib.available()
    with pytest.raises(PtqError, match="native operators are not built"):
        nativelib.require_library()


def test_cli_native_export_without_library(monkeypatch, tmp_path, tiny_cnn, tiny_data):
    from typer.testing import CliRunner

    from ptqcli import stages
    from ptqcli.cli import app
    from ptqcli.config import DataConfig, QuantConfig

    run = tmp_path / "run"
    stages.calibrate(tiny_cnn, QuantConfig(weights="int4"), DataConfig(path=str(tiny_data), num_samples=16), run)
    monkeypatch.setenv("PTQ_NATIVE_LIB", str(tmp_path / "absent.so"))
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(out), "--format", "native"])
    assert result.exit_code == 1
    assert "native operators are not built" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_operator_names_match_the_library():
    """The package builds the library (make install): missing, this fails rather than skips."""
    assert set(nativelib.library_operators()) == set(nativelib.OPERATORS)
    import onnxruntime as ort

    from ptqcli.export import native_ref as R
    import numpy as np

    for op in nativelib.MATRIX_OPERATORS:  # IntLSTM: tests/unit/test_native_kernels.py
        k, n = 64, 2
        if op.startswith("Binary"):
            constants = {"W": R.pack_signs(np.ones((n, k), np.float32)), "W_scale": np.ones(n, np.float32)}
        else:
            constants = {"W": R.pack_nibbles(np.full((n, k), 8, np.uint8), 64, 8), "W_scale": np.ones((n, 1), np.float32)}
        extra = dict(kernel_shape=[1, 1]) if op.endswith("Conv") else {}
        shape = (1, k, 1, 1) if op.endswith("Conv") else (1, k)
        model = R.single_op_model(op, shape, np.float32, constants, K=k, N=n, **extra)
        sess = nativelib.session(model.SerializeToString())
        assert isinstance(sess, ort.InferenceSession)
