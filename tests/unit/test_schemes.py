"""Binary, ternary, power-of-two and exponential weight grids: levels, fitted scales, codes."""

import numpy as np
import pytest

from ptqcli import formats as schemes
from ptqcli.config import parse_weight_format
from ptqcli.errors import PtqError
from ptqcli.quant import dequantize, quantize
from ptqcli.formats import QuantSpec


def spec(scheme, bits, **kw):
    return QuantSpec(bits, signed=True, symmetric=True, axis=0, scheme=scheme, **kw)


def _grid_error(row, scale, mags):
    units = np.abs(row) / scale
    nearest = mags[np.argmin(np.abs(units[:, None] - mags[None, :]), axis=1)]
    return np.sum((row - np.sign(row) * nearest * scale) ** 2)


def test_level_sets():
    np.testing.assert_array_equal(schemes.magnitudes(spec("binary", 1)), [1])
    np.testing.assert_array_equal(schemes.magnitudes(spec("ternary", 2)), [0, 1])
    np.testing.assert_array_equal(schemes.magnitudes(spec("pow2", 4)), [0, 1, 2, 4, 8, 16, 32, 64])
    np.testing.assert_allclose(schemes.magnitudes(spec("exp", 3, base=1.5)), [0, 1, 1.5, 2.25])
    assert spec("pow2", 4).storage_bits == 8 and spec("pow2", 5).storage_bits == 16
    assert spec("exp", 3, base=1.5).storage_bits == 16 and spec("exp", 3, base=2.0).storage_bits == 8


@pytest.mark.parametrize("scheme,bits", [("binary", 1), ("ternary", 2), ("pow2", 3), ("pow2", 4), ("exp", 3)])
def test_fitted_scale_matches_brute_force(scheme, bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((3, 24)) * rng.uniform(0.1, 2, (3, 1))).astype(np.float32)
    fitted, dq = schemes.fit(w, spec(scheme, bits))
    mags = schemes.magnitudes(fitted)
    scale = dq * schemes.code_multiplier(fitted)
    for c in range(3):
        ours = _grid_error(w[c].astype(np.float64), scale[c], mags)
        candidates = np.abs(w[c]).max() / mags.max() * np.linspace(0.02, 2.0, 20000)
        brute = min(_grid_error(w[c].astype(np.float64), s, mags) for s in candidates)
        assert ours <= brute * 1.001 + 1e-9


def test_binary_scale_is_the_mean_magnitude():
    w = np.array([[0.5, -1.5, 1.0, -1.0]], np.float32)
    _, dq = schemes.fit(w, spec("binary", 1))
    assert dq[0] == pytest.approx(1.0)


def test_codes_dequantize_onto_the_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 32)).astype(np.float32)
    for s in (spec("pow2", 4), spec("exp", 3), spec("ternary", 2), spec("binary", 1)):
        fitted, dq = schemes.fit(w, s)
        zp = np.zeros(4, np.int64)
        codes = quantize(w, dq, zp, fitted)
        assert np.abs(codes).max() <= fitted.qmax
        values = dequantize(codes, dq, zp, fitted)
        scale = dq * schemes.code_multiplier(fitted)
        units = np.abs(values) / scale[:, None]
        mags = schemes.magnitudes(fitted)
        # every value is a level (int16 exp codes: to within their rounding)
        assert np.all(np.min(np.abs(units[..., None] - mags), axis=-1) < 2e-4)


def test_exp3_beats_int3_on_gaussian_weights():
    from ptqcli.calibrate.planner import quantize_weight

    w = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    exp = quantize_weight(w, spec("exp", 3))
    int3 = quantize_weight(w, spec("int", 3), "mse")
    assert exp.source["sqnr_db"] > int3.source["sqnr_db"] - 0.5  # same 7 codes, better placed or as good


def test_weight_format_parsing():
    assert parse_weight_format("pow2:4") == ("pow2", 4)
    assert parse_weight_format("int3") == ("int", 3)
    assert parse_weight_format("binary") == ("binary", 1)
    for bad in ("int9", "pow2:9", "float", "exp:"):
        with pytest.raises(PtqError, match="unknown weight format"):
            parse_weight_format(bad)
    with pytest.raises(PtqError, match="pow2 weights take 2..5 bits"):
        QuantSpec(7, True, True, scheme="pow2")
