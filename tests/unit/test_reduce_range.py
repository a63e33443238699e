"""The 7-bit weight default follows what this CPU's ORT int8 kernels actually do."""

import numpy as np

import ptqcli.runtime as runtime
from ptqcli.calibrate.planner import weight_spec
from ptqcli.config import QuantConfig


def test_probe_model_is_exact_when_emulated(monkeypatch):
    """The probe's expected value is right: without fusion the QDQ graph computes the exact sum."""
    captured = {}
    real = runtime.session

    def spy(model, optimize=True, scratch=None):
        captured["model"] = model
        return real(model, optimize, scratch)

    monkeypatch.setattr(runtime, "session", spy)
    runtime.int8_kernels_saturate.cache_clear()
    try:
        runtime.int8_kernels_saturate()
    finally:
        runtime.int8_kernels_saturate.cache_clear()
    x = {"x": np.full((1, 64, 2, 2), 255.0, np.float32)}
    emulated = real(captured["model"], optimize=False).run(None, x)[0]
    np.testing.assert_allclose(emulated, round(64 * 255 * 127 / 10_000) * 10_000)
    assert runtime.optimized_op_counts(captured["model"]).get("QLinearConv") == 1  # the fused kernel is probed


def test_auto_follows_the_probe(monkeypatch):
    for saturates in (True, False):
        monkeypatch.setattr("ptqcli.runtime.int8_kernels_saturate", lambda s=saturates: s)
        spec = weight_spec(QuantConfig(), axis=0)
        assert spec.reduce_range is saturates
        assert spec.qmax == (63 if saturates else 127)
    assert weight_spec(QuantConfig(weights="int4"), axis=0).reduce_range is False  # no int4 integer kernels


def test_explicit_choice_wins(monkeypatch):
    monkeypatch.setattr("ptqcli.runtime.int8_kernels_saturate", lambda: False)
    assert weight_spec(QuantConfig(reduce_range="on"), axis=0).qmax == 63
    monkeypatch.setattr("ptqcli.runtime.int8_kernels_saturate", lambda: True)
    assert weight_spec(QuantConfig(reduce_range="off"), axis=0).qmax == 127
