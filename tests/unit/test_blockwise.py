"""Block-wise weights: MatMulNBits packing checked by running ORT's own kernel, and GPTQ against a
slow obvious reference."""

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ptqcli.calibrate.gptq import GptqConfig, gptq, layer_error
from ptqcli.errors import PtqError
from ptqcli.config import QuantConfig
from ptqcli.export.nbits import matmul_nbits
from ptqcli.formats import QuantSpec
from ptqcli.plan import Layer, TensorQuant
from ptqcli.quant import block_ranges, dequantize, quantize, scale_zero_point


def _block_quant(w, bits, symmetric, block, float_zero=False):
    spec = QuantSpec(bits=bits, signed=True, symmetric=symmetric, axis=0, block_size=block, float_zero=float_zero)
    scale, zero = scale_zero_point(*block_ranges(w, 0, block), spec)
    return TensorQuant("weight", spec, scale, zero, {})


# ORT's CPU MatMulNBits refuses 8-bit weights with float zero points; the planner never makes them.
@pytest.mark.parametrize("bits, zeros", [(b, z) for b in (2, 4, 8) for z in ("symmetric", "int", "float")
                                         if (b, z) != (8, "float")])
@pytest.mark.parametrize("k", [96, 80])  # 80: a short last block
def test_matmul_nbits_computes_what_the_plan_dequantizes(bits, zeros, k):
    rng = np.random.default_rng(bits * 100 + k)
    n, block = 40, 32
    w = rng.normal(size=(k, n)).astype(np.float32)
    tq = _block_quant(w, bits, zeros == "symmetric", block, float_zero=zeros == "float")
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")
    inits, packed = matmul_nbits(node, Layer("mm", "MatMul", "a", "w", None, "y"), tq, w, accuracy_level=0)
    graph = helper.make_graph([packed], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    a = rng.normal(size=(3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    expected = a @ dequantize(quantize(w, tq.scale, tq.zero_point, tq.spec), tq.scale, tq.zero_point, tq.spec)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _obvious_gptq(w, h, spec, damp=0.01):
    """Column by column with the explicit inverse Hessian, updated after each column (no Cholesky,
    no lazy blocks): the textbook form of the same algorithm."""
    k, n = w.shape
    work, hess = w.T.astype(np.float64).copy(), h.copy()
    hess[np.diag_indices(k)] += damp * np.mean(np.diag(hess))
    inverse = np.linalg.inv(hess)
    out = np.zeros_like(work)
    column_spec = QuantSpec(spec.bits, True, spec.symmetric, axis=0)
    for j in range(k):
        if j % spec.block_size == 0:
            scale, zero = scale_zero_point(*block_ranges(work[:, j:j + spec.block_size].T.astype(np.float32), 0,
                                                         spec.block_size), spec)
            scale, zero = scale[0], zero[0]
        q = dequantize(quantize(work[:, j].astype(np.float32), scale, zero, column_spec), scale, zero, column_spec)
        out[:, j] = q
        err = (work[:, j] - q) / inverse[j, j]
        work[:, j + 1:] -= np.outer(err, inverse[j, j + 1:])
        inverse = inverse - np.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return out.T


def _layer(seed=0, k=128, n=48, rows=3000):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))
    x[:, :3] *= 8  # outlier inputs, as language models have
    return x[: rows * 3 // 4], x[rows * 3 // 4:], rng.normal(size=(k, n)).astype(np.float32)


def test_gptq_equals_the_textbook_algorithm():
    train, _, w = _layer()
    spec = QuantSpec(bits=4, signed=True, symmetric=True, axis=0, block_size=32)
    result = gptq(w, train.T @ train, spec, GptqConfig(columns=64, act_order=False, clip_search=False))
    np.testing.assert_allclose(result.value, _obvious_gptq(w, train.T @ train, spec), atol=1e-5)
    # The rounded weights lie on the recorded grid: quantizing them again changes nothing.
    again = dequantize(quantize(result.value, result.scale, result.zero_point, spec), result.scale, result.zero_point, spec)
    np.testing.assert_array_equal(again, result.value)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [32, None])
def test_gptq_error_is_below_nearest_rounding_on_held_out_inputs(act_order, block):
    train, held_out, w = _layer(seed=1)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, axis=0 if block else 1, block_size=block)
    result = gptq(w, train.T @ train, spec, GptqConfig(act_order=act_order))
    lo, hi = block_ranges(w, 0, block) if block else (w.min(axis=0), w.max(axis=0))
    scale, zero = scale_zero_point(lo, hi, spec)
    nearest = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    assert layer_error(held_out, w, result.value) < 0.6 * layer_error(held_out, w, nearest)


def test_a_block_size_must_be_a_power_of_two():
    with pytest.raises(PtqError, match="power of two"):
        QuantConfig(block_size=48)


def test_float_zero_points_recover_min_offset_blocks_exactly_and_round_trip_the_plan():
    """Weights that are already d * q + m per block (GGUF's Q4_1 blocks) come back exactly with an
    unrounded zero point per block, and not with an integer one; the plan's JSON keeps them exact."""
    from ptqcli.plan import TensorQuant as TQ

    rng = np.random.default_rng(3)
    k, n, block = 128, 16, 32
    d = rng.uniform(0.01, 0.05, (k // block, n)).astype(np.float32)
    m = rng.uniform(-0.3, -0.1, (k // block, n)).astype(np.float32)
    codes = rng.integers(0, 16, (k, n))
    codes[::block] = 0  # every block reaches both ends of its range
    codes[1::block] = 15
    w = (np.repeat(d, block, 0) * codes + np.repeat(m, block, 0)).astype(np.float32)
    exact = _block_quant(w, 4, False, block, float_zero=True)
    rounded = _block_quant(w, 4, False, block)
    err = lambda tq: np.abs(tq.on_grid(w) - w).max()  # noqa: E731
    assert err(exact) < 1e-6 * np.abs(w).max() < err(rounded)
    again = TQ.from_dict(exact.to_dict())
    np.testing.assert_array_equal(again.zero_point, exact.zero_point)
    assert again.spec.float_zero and again.zero_point.dtype == np.float32


def test_float_zero_points_are_refused_where_only_int_zero_points_fit():
    from ptqcli.config import QuantConfig

    with pytest.raises(PtqError, match="float-zero-points"):
        QuantConfig(weights="int4", acts="uint8", block_size=32, float_zero_points=True)
    with pytest.raises(PtqError, match="float-zero-points"):
        QuantConfig(weights="int4", acts="none", float_zero_points=True)
    assert not QuantConfig(weights="int4", acts="none", block_size=32, float_zero_points=True).weight_symmetric


@pytest.mark.parametrize("in_axis", [0, 1])
def test_gptq_keeps_float_zero_points_and_so_recovers_min_offset_blocks(in_axis):
    """A layer already on a float-zero grid (GGUF-style d * q + m blocks) stays exactly on it through
    GPTQ, in either weight layout, and the plan's spec keeps its float zero points."""
    from ptqcli.calibrate.gptq import round_layer

    rng = np.random.default_rng(5)
    k, n, block = 128, 24, 32
    d = rng.uniform(0.01, 0.05, (k // block, n)).astype(np.float32)
    m = rng.uniform(-0.3, -0.1, (k // block, n)).astype(np.float32)
    codes = rng.integers(0, 16, (k, n))
    codes[::block], codes[1::block] = 0, 15
    w_kn = (np.repeat(d, block, 0) * codes + np.repeat(m, block, 0)).astype(np.float32)
    x = rng.normal(size=(512, k)).astype(np.float32)
    tq = _block_quant(w_kn, 4, False, block, float_zero=True)
    w = w_kn if in_axis == 0 else w_kn.T.copy()
    if in_axis == 1:
        tq = TensorQuant("weight", QuantSpec(4, True, False, axis=1, block_size=block, float_zero=True),
                         tq.scale.T.copy(), tq.zero_point.T.copy(), {})
    out = round_layer(w, in_axis, tq, (x.T @ x).astype(np.float64), GptqConfig())
    assert out.spec.float_zero and out.zero_point.dtype == np.float32
    np.testing.assert_allclose(out.value, w, atol=1e-6)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_of_layers_sharing_an_input_gives_each_its_own_result(act_order):
    """q/k/v-like layers (two in [K, N] layout, one in [N, K]) rounded in one pass side by side come
    out as each rounded alone; a layer on another grid is rounded apart."""
    from ptqcli.calibrate.gptq import round_layer, round_layers

    rng = np.random.default_rng(11)
    k, block = 96, 32
    x = rng.normal(size=(400, k)).astype(np.float32) * rng.uniform(0.2, 3.0, k).astype(np.float32)
    h = (x.T @ x).astype(np.float64)
    kn = [rng.normal(size=(k, n)).astype(np.float32) for n in (24, 8, 16, 40)]
    axes, bits = [0, 1, 0, 0], [4, 4, 4, 3]
    weights = [w if a == 0 else w.T.copy() for w, a in zip(kn, axes)]
    tqs = []
    for w, a, b in zip(kn, axes, bits):
        tq = _block_quant(w, b, False, block)
        tqs.append(tq if a == 0 else TensorQuant("weight", QuantSpec(b, True, False, axis=1, block_size=block),
                                                 tq.scale.T.copy(), tq.zero_point.T.copy(), {}))
    cfg = GptqConfig(act_order=act_order)
    together = round_layers(weights, axes, tqs, h, cfg)
    for w, a, tq, got in zip(weights, axes, tqs, together):
        alone = round_layer(w, a, tq, h, cfg)
        assert got.value.shape == w.shape and got.scale.shape == tq.scale.shape and got.spec == tq.spec
        np.testing.assert_allclose(got.value, alone.value, rtol=0, atol=1e-5 * np.abs(w).max())
        np.testing.assert_array_equal(got.scale, alone.scale)
        np.testing.assert_array_equal(got.zero_point, alone.zero_point)
        assert got.source["rounding"] == "learned"


def test_upper_factor_of_the_inverse_hessian_is_the_cholesky_factor_of_its_inverse():
    from ptqcli.calibrate.gptq import upper_factor_of_inverse

    rng = np.random.default_rng(2)
    for k in (7, 200, 300):  # below, at and past the size where the triangular inverse splits
        x = rng.normal(size=(2 * k, k)) * rng.uniform(0.1, 3.0, k)
        h = x.T @ x + 0.01 * np.eye(k)
        u = upper_factor_of_inverse(h)
        assert np.allclose(np.triu(u), u) and np.all(np.diag(u) > 0)
        np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=0, atol=1e-9 * np.abs(u).max())


def test_large_grids_are_stored_beside_the_plan_and_read_back_exactly(tmp_path):
    """A plan's block scales past GRID_IN_JSON values go to the params file (the JSON names them);
    small ones stay in the JSON; both read back bit for bit, values too."""
    from ptqcli import rundir
    from ptqcli.plan import GRID_IN_JSON, Plan

    rng = np.random.default_rng(4)
    big = rng.normal(size=(4 * GRID_IN_JSON, 32)).astype(np.float32)
    small = rng.normal(size=(64, 16)).astype(np.float32)
    tensors = {"big": _block_quant(big, 4, False, 32), "small": _block_quant(small, 4, False, 32),
               "big#scale": _block_quant(small, 4, False, 32)}  # a name a params key could take
    tensors["big"] = TensorQuant("weight", tensors["big"].spec, tensors["big"].scale, tensors["big"].zero_point,
                                 {"method": "gptq"}, value=big)
    plan = Plan(tensors=tensors, layers=[], float_nodes={}, config={})
    huge = Plan(tensors={"huge": _block_quant(big, 4, False, 32)}, layers=[], float_nodes={}, config={})
    rundir.write_plan(tmp_path, plan)
    rundir.write_plan(tmp_path, huge, "plan.huge.json")
    doc = json.loads((tmp_path / "plan.huge.json").read_text())
    assert doc["tensors"]["huge"]["scale"] == {"params": "huge#scale"}  # a reference, not 4,096 numbers
    assert json.loads((tmp_path / "plan.json").read_text())["tensors"]["big"]["scale"] != {"params": "big#scale"}
    for written, name in ((plan, "plan.json"), (huge, "plan.huge.json")):
        again = rundir.read_plan(tmp_path, name)
        for key, tq in written.tensors.items():
            got = again.tensors[key]
            np.testing.assert_array_equal(got.scale, tq.scale)
            np.testing.assert_array_equal(got.zero_point, tq.zero_point)
            assert got.zero_point.dtype == tq.zero_point.dtype and got.spec == tq.spec
            assert (got.value is None) == (tq.value is None)
            if tq.value is not None:
                np.testing.assert_array_equal(got.value, tq.value)


def test_gptq_scale_search_never_raises_a_groups_weighted_error_and_clips_outlier_blocks():
    """Each block's grid is its whole range or a shrink of it, whichever has the least H-diagonal-
    weighted rounding error: never worse than the whole range, and better where a block holds a
    lone large weight."""
    from ptqcli.calibrate.gptq import _group_errors, _scales

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.02, (128, 24)).astype(np.float32)
    w[3, :8] = 0.3  # one outlier in the first block of 8 columns
    importance = rng.uniform(0.1, 2.0, 128)
    spec = QuantSpec(bits=4, signed=True, symmetric=False, axis=0, block_size=32)
    whole = _scales(w, spec)
    searched = _scales(w, spec, importance)
    before = _group_errors(w, *whole, spec, importance)
    after = _group_errors(w, *searched, spec, importance)
    assert np.all(after <= before) and np.any(after < 0.9 * before)
    assert np.all(searched[0] <= whole[0])  # only ever a shrink of the range


def test_gptq_scale_search_in_column_runs_gives_the_same_grid(monkeypatch):
    from ptqcli.calibrate import gptq as gptq_module

    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.02, (64, 40)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 64)
    spec = QuantSpec(bits=4, signed=True, symmetric=False, axis=0, block_size=32)
    whole = gptq_module._scales(w, spec, importance)
    monkeypatch.setattr(gptq_module, "SEARCH_VALUES", 64 * 7)  # runs of 7 columns
    runs = gptq_module._scales(w, spec, importance)
    for a, b in zip(whole, runs):
        np.testing.assert_array_equal(a, b)


def _heavy_tailed(k, n, seed=0):
    """Weights with a few large values per block, as trained language models' are."""
    return (np.random.default_rng(seed).standard_t(3, (k, n)) * 0.02).astype(np.float32)


def _block_errors(w, scale, zero, spec):
    err = np.square(w - dequantize(quantize(w, scale, zero, spec), scale, zero, spec))
    k, bs = w.shape[0], spec.block_size
    return np.pad(err, ((0, -k % bs), (0, 0))).reshape(-1, bs, w.shape[1]).sum(axis=1)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [256, 80])  # 80: a short last block of 16
def test_refined_grids_never_raise_a_blocks_error_and_lower_the_total(symmetric, k):
    from ptqcli.quant import refined_block_grid

    w = _heavy_tailed(k, 48)
    spec = QuantSpec(bits=4, signed=True, symmetric=symmetric, axis=0, block_size=32)
    start = scale_zero_point(*block_ranges(w, 0, 32), spec)
    scale, zero = refined_block_grid(w, spec)
    assert scale.shape == zero.shape == (-(-k // 32), 48) and zero.dtype == np.int64
    before, after = _block_errors(w, *start, spec), _block_errors(w, scale, zero, spec)
    assert np.all(after <= before)
    assert after.sum() < 0.98 * before.sum()  # 4-5% lower on these weights
    if symmetric:
        assert np.all(zero == 0)
    # the same grid for the weight stored transposed (blocks along axis 1, as a Gemm with transB)
    t_scale, t_zero = refined_block_grid(np.ascontiguousarray(w.T), replace(spec, axis=1))
    # (sums over another memory layout round differently in the last bit)
    np.testing.assert_allclose(t_scale, scale.T, rtol=1e-5)
    assert np.mean(t_zero == zero.T) > 0.98


def test_robust_float_zero_points_keep_the_scales_and_lower_the_absolute_error():
    from ptqcli.quant import refined_block_grid

    w = _heavy_tailed(256, 48, seed=1)
    spec = QuantSpec(bits=4, signed=True, symmetric=False, axis=0, block_size=64, float_zero=True)
    start = scale_zero_point(*block_ranges(w, 0, 64), spec)
    scale, zero = refined_block_grid(w, spec)
    np.testing.assert_array_equal(scale, start[0])
    assert zero.dtype == np.float32 and not np.all(zero == np.rint(zero))

    def absolute(s, z):
        return float(np.abs(w - dequantize(quantize(w, s, z, spec), s, z, spec)).sum())

    assert absolute(scale, zero) < absolute(start[0], np.rint(start[1]))
    again = refined_block_grid(w, spec)
    np.testing.assert_array_equal(again[1], zero)
