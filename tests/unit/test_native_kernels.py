"""Every native operator equals its numpy reference bit for bit, run through real ONNX Runtime sessions."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptqcli import nativelib
from ptqcli import recurrent as rc
from ptqcli.export import native_ref as R

pytestmark = pytest.mark.skipif(
    not nativelib.available(), reason="native library not built")  # test_native_build.py fails and says why


@pytest.fixture(autouse=True, params=["best", "avx2", "scalar"])
def instruction_set(request, monkeypatch):
    """Every test runs on each kernel path this CPU has: results must be identical on all of them."""
    if request.param == "best":
        monkeypatch.delenv("PTQ_NATIVE_ISA", raising=False)
    else:
        monkeypatch.setenv("PTQ_NATIVE_ISA", request.param)
    return request.param


def test_the_requested_kernel_path_runs(instruction_set):
    chosen = nativelib.instruction_set()
    assert chosen in ("avx512-vnni", "avx2", "scalar")
    if instruction_set != "best":
        assert chosen in (instruction_set, "scalar")


def run(model, x):
    return nativelib.session(model.SerializeToString(), threads=2).run(None, {"X": x})[0]


def int4_case(rng, n, k, group_size, asymmetric):
    kp = R.padded_k(k, group_size)
    groups = kp // (group_size or kp)
    if asymmetric:
        zero = rng.integers(0, 16, (n, groups)).astype(np.uint8)
        codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    else:
        zero = None
        codes = R.int4_codes(rng.integers(-8, 8, (n, k)))
    pad = zero[:, -1] if zero is not None else R.INT4_ZERO
    scale = (rng.random((n, groups)) + 0.05).astype(np.float32)
    return codes, R.pack_nibbles(codes, kp, pad), scale, zero


def activations(rng, shape, dtype):
    if dtype == np.float32:
        x = rng.standard_normal(shape).astype(np.float32)
        x.reshape(-1, shape[-1])[0] = 0  # an all-zero row takes the scale-1 path
        return x, None, 0
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    return x, np.float32(rng.random() * 0.1 + 0.01), int(rng.integers(info.min, info.max + 1))


def int4_matmul(rng, op, x_shape, n, group_size, asymmetric, dtype, with_bias):
    k = x_shape[-1]
    codes, packed, scale, zero = int4_case(rng, n, k, group_size, asymmetric)
    x, x_scale, x_zero = activations(rng, x_shape, dtype)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    constants = {"W": packed, "W_scale": scale}
    if zero is not None:
        constants["W_zero_point"] = zero
    if x_scale is not None:
        constants["X_scale"] = np.array(x_scale, dtype=np.float32)
        constants["X_zero_point"] = np.array(x_zero, dtype=dtype)
    if bias is not None:
        constants["Bias"] = bias
    model = R.single_op_model(op, x.shape, dtype, constants, K=k, N=n, group_size=group_size)
    got = run(model, x)
    rows = x.reshape(-1, k)
    want = R.int4_matmul_reference(rows, codes, scale, group_size, zero, bias, x_scale, x_zero)
    return got.reshape(-1, n), want


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 70, 9), (3, 33, 5), (17, 130, 7), (4, 64, 2), (64, 257, 33),
                                   (13, 256, 80)])
@pytest.mark.parametrize("group_size", [0, 32, 64])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_int4_matmul_float_input_is_exact(m, k, n, group_size, asymmetric):
    rng = np.random.default_rng(m * 1000 + k * 10 + n + group_size)
    got, want = int4_matmul(rng, "Int4MatMul", (m, k), n, group_size, asymmetric, np.float32, with_bias=True)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("op", ["Int4MatMul", "Int4Gemm"])
def test_int4_quantized_input_is_exact(dtype, op):
    rng = np.random.default_rng(3)
    got, want = int4_matmul(rng, op, (9, 77), 13, 32, True, dtype, with_bias=op == "Int4Gemm")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k", [31, 4100, 9000])
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("x_value", [-128, 127])
def test_int4_sums_at_their_largest_stay_exact(k, group_size, x_value):
    # Every code 15 against every input at the int8 extremes: the largest sums the kernels' narrow
    # accumulators ever hold (int16 pairs on AVX2, 16 x code chunks with VNNI), over long K too.
    n, m = 19, 3
    kp = R.padded_k(k, group_size)
    groups = kp // (group_size or kp)
    codes = np.full((n, k), 15, np.uint8)
    zero = np.zeros((n, groups), np.uint8)
    scale = np.full((n, groups), 0.001, np.float32)
    x = np.full((m, k), x_value, np.int8)
    constants = {"W": R.pack_nibbles(codes, kp, 0), "W_scale": scale, "W_zero_point": zero,
                 "X_scale": np.array(0.5, np.float32), "X_zero_point": np.array(0, np.int8)}
    model = R.single_op_model("Int4MatMul", x.shape, np.int8, constants, K=k, N=n, group_size=group_size)
    want = R.int4_matmul_reference(x, codes, scale, group_size, zero, None, np.float32(0.5), 0)
    np.testing.assert_array_equal(run(model, x), want)


@pytest.mark.parametrize("m", [1, 6])
def test_int4_long_rows_are_exact(m):
    rng = np.random.default_rng(m)
    got, want = int4_matmul(rng, "Int4MatMul", (m, 8200), 21, 0, False, np.float32, with_bias=False)
    np.testing.assert_array_equal(got, want)


def test_int4_matmul_keeps_leading_dimensions():
    rng = np.random.default_rng(4)
    k, n = 40, 6
    codes, packed, scale, _ = int4_case(rng, n, k, 0, False)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    model = R.single_op_model("Int4MatMul", x.shape, np.float32, {"W": packed, "W_scale": scale}, K=k, N=n)
    got = run(model, x)
    assert got.shape == (2, 3, n)
    np.testing.assert_array_equal(got.reshape(-1, n), R.int4_matmul_reference(x.reshape(-1, k), codes, scale))


@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (6, 64, 4), (19, 200, 11)])
@pytest.mark.parametrize("op", ["ShiftMatMul", "ShiftGemm"])
def test_shift_is_exact(m, k, n, op):
    rng = np.random.default_rng(m + k + n)
    values = R.shift_values()[rng.integers(0, 16, (n, k))]
    codes = R.shift_codes(values)
    packed = R.pack_nibbles(codes, R.padded_k(k), R.SHIFT_ZERO_CODE)
    scale = (rng.random((n, 1)) * 0.01).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    model = R.single_op_model(op, x.shape, np.float32, {"W": packed, "W_scale": scale, "Bias": bias}, K=k, N=n)
    np.testing.assert_array_equal(run(model, x), R.shift_matmul_reference(x, codes, scale, bias))


def test_shift_codes_round_trip_every_level():
    values = R.shift_values()
    assert sorted(set(values.tolist())) == sorted({0} | {s * 2 ** e for s in (1, -1) for e in range(7)})
    np.testing.assert_array_equal(R.shift_values()[R.shift_codes(values)], values)
    with pytest.raises(ValueError):
        R.shift_codes(np.array([3]))


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (2, 63, 3), (5, 64, 4), (7, 65, 9), (3, 300, 5), (16, 2050, 6)])
@pytest.mark.parametrize("op", ["BinaryGemm", "BinaryMatMul"])
def test_binary_is_exact(m, k, n, op):
    rng = np.random.default_rng(m * k + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    scale = np.abs(w).mean(axis=1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    model = R.single_op_model(op, x.shape, np.float32, {"W": R.pack_signs(w), "W_scale": scale, "Bias": bias}, K=k, N=n)
    np.testing.assert_array_equal(run(model, x), R.binary_gemm_reference(x, w, scale, bias))


def test_sign_packing_puts_element_k_at_bit_k():
    w = np.ones((1, 130), dtype=np.float32)
    w[0, [0, 63, 64, 129]] = -1
    words = R.pack_signs(w)
    assert words.shape == (1, 3)
    assert words[0, 0] == (1 | (1 << 63)) and words[0, 1] == 1 and words[0, 2] == 2


CONV_CASES = [
    # channels, size, out, kernel, strides, pads, dilations, group
    (3, 9, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (8, 7, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),  # depthwise
    (6, 8, 4, (3, 2), (1, 2), (2, 0, 1, 1), (2, 1), 2),  # grouped, asymmetric pads, dilated
    (5, 6, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise
    (20, 9, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise, whole 16 x 16 blocks and remainders
    (12, 9, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise, two-panel tiles, an odd panel, leftover pixels
    (4, 7, 33, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),  # two-panel tiles into a 1-channel remainder
    (64, 5, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2),  # grouped pointwise
    (6, 11, 6, (5, 3), (2, 3), (2, 0, 1, 2), (1, 2), 6),  # depthwise, strided, dilated, uneven pads
    (4, 5, 4, (3, 3), (1, 1), (3, 3, 3, 3), (1, 1), 4),  # depthwise, pads wider than the kernel reach
    (5, 20, 5, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 5),  # depthwise, rows wider than a vector
    (4, 17, 4, (3, 3), (2, 2), (1, 0, 0, 1), (1, 1), 4),  # depthwise, stride 2 on odd sizes
    (3, 35, 3, (5, 5), (2, 2), (2, 1, 1, 2), (1, 1), 3),  # depthwise, stride 2, odd left pad, wide rows
    (2, 19, 2, (3, 3), (3, 3), (1, 1, 1, 1), (2, 2), 2),  # depthwise, stride 3, dilated
]


def conv_attributes(kernel, strides, pads, dilations, group):
    return dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads), dilations=list(dilations), group=group)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
def test_int4_conv_is_exact(case, dtype):
    c, size, n, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(c * size + n)
    k = (c // group) * kernel[0] * kernel[1]
    codes, packed, scale, zero = int4_case(rng, n, k, 0, asymmetric=dtype == np.int8)
    x, x_scale, x_zero = activations(rng, (2, c, size, size + 1), dtype)
    bias = rng.standard_normal(n).astype(np.float32)
    constants = {"W": packed, "W_scale": scale, "Bias": bias}
    if zero is not None:
        constants["W_zero_point"] = zero
    if x_scale is not None:
        constants.update(X_scale=np.array(x_scale, np.float32), X_zero_point=np.array(x_zero, dtype=dtype))
    attrs = conv_attributes(kernel, strides, pads, dilations, group)
    model = R.single_op_model("Int4Conv", x.shape, dtype, constants, K=k, N=n, **attrs)

    def gemm(rows, _valid, cols):
        return R.int4_matmul_reference(rows, codes[cols], scale[cols], 0, None if zero is None else zero[cols],
                                       bias[cols], x_scale, x_zero)

    want = R.conv_reference(x, gemm, n, kernel, strides, pads, dilations, group,
                            pad_value=0 if x_scale is None else x_zero)
    np.testing.assert_array_equal(run(model, x), want)


@pytest.mark.parametrize("case", CONV_CASES)
def test_binary_conv_ignores_padding(case):
    c, size, n, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(7 + c)
    k = (c // group) * kernel[0] * kernel[1]
    w = rng.standard_normal((n, k)).astype(np.float32)
    scale = np.abs(w).mean(axis=1).astype(np.float32)
    x = rng.standard_normal((2, c, size, size)).astype(np.float32)
    model = R.single_op_model("BinaryConv", x.shape, np.float32, {"W": R.pack_signs(w), "W_scale": scale}, K=k, N=n,
                              **conv_attributes(kernel, strides, pads, dilations, group))
    want = R.conv_reference(x, lambda rows, valid, cols: R.binary_gemm_reference(rows, w[cols], scale[cols], None, valid),
                            n, kernel, strides, pads, dilations, group, masked=True)
    np.testing.assert_array_equal(run(model, x), want)


def test_shift_conv_is_exact():
    rng = np.random.default_rng(11)
    c, n, kernel = 4, 6, (3, 3)
    k = c * 9
    codes = R.shift_codes(R.shift_values()[rng.integers(0, 16, (n, k))])
    scale = (rng.random((n, 1)) * 0.01).astype(np.float32)
    x = rng.integers(0, 256, (1, c, 5, 5)).astype(np.uint8)
    constants = {"W": R.pack_nibbles(codes, R.padded_k(k), R.SHIFT_ZERO_CODE), "W_scale": scale,
                 "X_scale": np.array(0.02, np.float32), "X_zero_point": np.array(120, np.uint8)}
    attrs = conv_attributes(kernel, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    model = R.single_op_model("ShiftConv", x.shape, np.uint8, constants, K=k, N=n, **attrs)
    want = R.conv_reference(x, lambda rows, _v, cols: R.shift_matmul_reference(rows, codes[cols], scale[cols], None,
                                                                                np.float32(0.02), 120),
                            n, kernel, (1, 1), (1, 1, 1, 1), (1, 1), 1, pad_value=120)
    np.testing.assert_array_equal(run(model, x), want)


@pytest.mark.parametrize("dtype,size,pads", [(np.uint8, 35, 0), (np.uint8, 35, 17), (np.uint8, 12, 10),
                                              (np.float32, 50, 0), (np.float32, 50, 25), (np.float32, 12, 10)])
def test_shift_depthwise_with_sums_too_large_for_float_is_exact(dtype, size, pads):
    # Taps of weight 64 (every seventh 1) against inputs at the largest integer they can be (255 from
    # the zero point, or 127 once a float patch is quantized): sums pass 2^24 with odd parts, so only
    # the depthwise kernels' integer paths get them right; the small cases stay on the float paths.
    c, kernel = 2, (size, size)
    k = size * size
    values = np.where(np.arange(k) % 7 == 0, 1, 64)[None, :].repeat(c, axis=0)
    values[1] *= -1
    codes = R.shift_codes(values)
    scale = np.full((c, 1), 1e-6, np.float32)
    constants = {"W": R.pack_nibbles(codes, R.padded_k(k), R.SHIFT_ZERO_CODE), "W_scale": scale}
    if dtype == np.uint8:
        x = np.full((1, c, size, size), 255, np.uint8)
        constants.update({"X_scale": np.array(0.5, np.float32), "X_zero_point": np.array(0, np.uint8)})
        quantization = dict(x_scale=np.float32(0.5), x_zero=0)
    else:
        x = np.full((1, c, size, size), 1.5, np.float32)
        quantization = {}
    attrs = conv_attributes(kernel, (1, 1), (pads,) * 4, (1, 1), c)
    model = R.single_op_model("ShiftConv", x.shape, dtype, constants, K=k, N=c, **attrs)
    want = R.conv_reference(x, lambda rows, _v, cols: R.shift_matmul_reference(
        rows, codes[cols], scale[cols], None, quantization.get("x_scale"), quantization.get("x_zero", 0)),
        c, kernel, (1, 1), (pads,) * 4, (1, 1), c, pad_value=0)
    np.testing.assert_array_equal(run(model, x), want)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_int4_conv_with_weights_fed_at_run_time_is_exact(case, dtype):
    # W as a graph input rather than an initializer: the weights are laid out on every call, not
    # once per session, and must give the same bits.
    from onnx import helper, numpy_helper

    c, size, n, kernel, strides, pads, dilations, group = case
    rng = np.random.default_rng(21 + c)
    k = (c // group) * kernel[0] * kernel[1]
    codes, packed, scale, _ = int4_case(rng, n, k, 0, False)
    x, x_scale, x_zero = activations(rng, (1, c, size, size), dtype)
    constants = {"W": packed, "W_scale": scale}
    if x_scale is not None:
        constants.update({"X_scale": np.array(x_scale, np.float32), "X_zero_point": np.array(x_zero, dtype)})
    model = R.single_op_model("Int4Conv", x.shape, dtype, constants, K=k, N=n,
                              **conv_attributes(kernel, strides, pads, dilations, group))
    w_init = next(t for t in model.graph.initializer if t.name == "W")
    model.graph.input.append(helper.make_tensor_value_info("W", w_init.data_type, list(w_init.dims)))
    model.graph.initializer.remove(w_init)
    got = nativelib.session(model.SerializeToString(), threads=2).run(None, {"X": x, "W": packed})[0]
    pad_value = 0 if x_scale is None else int(x_zero)
    want = R.conv_reference(x, lambda rows, _v, cols: R.int4_matmul_reference(
        rows, codes[cols], scale[cols], 0, None, None, x_scale, x_zero if x_scale is not None else 0),
        n, kernel, strides, pads, dilations, group, pad_value=pad_value)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), group=st.sampled_from([0, 32, 96]),
       asymmetric=st.booleans(), dtype=st.sampled_from([np.float32, np.uint8, np.int8]), seed=st.integers(0, 2**31))
def test_int4_fuzz(m, k, n, group, asymmetric, dtype, seed):
    got, want = int4_matmul(np.random.default_rng(seed), "Int4MatMul", (m, k), n, group, asymmetric, dtype, True)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 700), n=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_binary_fuzz(m, k, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = np.abs(w).mean(axis=1).astype(np.float32)
    model = R.single_op_model("BinaryGemm", x.shape, np.float32, {"W": R.pack_signs(w), "W_scale": scale}, K=k, N=n)
    np.testing.assert_array_equal(run(model, x), R.binary_gemm_reference(x, w, scale))


def test_bad_operator_input_is_a_clear_error():
    rng = np.random.default_rng(0)
    codes, packed, scale, _ = int4_case(rng, 4, 40, 0, False)
    model = R.single_op_model("Int4MatMul", (2, "k"), np.float32, {"W": packed, "W_scale": scale}, K=40, N=4)
    with pytest.raises(Exception, match="last dimension of X must be K=40"):
        nativelib.session(model.SerializeToString()).run(None, {"X": np.zeros((2, 41), np.float32)})
    bad_group = R.single_op_model("Int4MatMul", (2, 40), np.float32, {"W": packed, "W_scale": scale}, K=40, N=4,
                                  group_size=20)
    with pytest.raises(Exception, match="group_size must be 0"):
        nativelib.session(bad_group.SerializeToString())


@pytest.mark.parametrize("name, value, message", [
    ("strides", [0, 1], "strides must be positive"),
    ("dilations", [1, -1], "dilations must be positive"),
    ("pads", [0, -1, 0, 0], "pads must not be negative"),
    ("kernel_shape", [3, 0], "kernel_shape values must be positive"),
    ("group", 3, "N must be a multiple of group"),
])
def test_conv_attributes_are_checked_when_the_session_is_made(name, value, message):
    """Bad attributes fail the session with the node's name and the problem, before any kernel
    could divide by a zero stride or index through a negative pad."""
    rng = np.random.default_rng(0)
    _, packed, scale, _ = int4_case(rng, 4, 36, 0, False)
    attrs = {**conv_attributes((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), name: value}
    model = R.single_op_model("Int4Conv", (1, 4, 8, 8), np.float32, {"W": packed, "W_scale": scale}, K=36, N=4,
                              **attrs)
    with pytest.raises(Exception, match=message):
        nativelib.session(model.SerializeToString())


# --------------------------------------------------------------------------- IntLSTM

def int_lstm_model(params: rc.IntLstm, direction: str, states: bool):
    from onnx import TensorProto, helper, numpy_helper

    constants = rc.operator_inputs(params)
    names = ["X", *constants] + (["initial_h", "initial_c"] if states else [])
    hidden = params.directions[0].r.shape[1]
    node = helper.make_node("IntLSTM", names, ["Y", "Y_h", "Y_c"], domain="ptqcli", hidden_size=hidden,
                            x_scale=params.x_scale, cell_frac=params.cell_frac, direction=direction)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
              for n in ["X"] + (["initial_h", "initial_c"] if states else [])]
    graph = helper.make_graph([node], "int_lstm", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ptqcli", 1)])


def random_int_lstm(rng, dirs, hidden, features, fitted: bool) -> rc.IntLstm:
    """Parameters fitted on random data, or drawn at random over the whole integer ranges."""
    w = rng.integers(-127, 128, (dirs, 4 * hidden, features)).astype(np.int8)
    r = rng.integers(-127, 128, (dirs, 4 * hidden, hidden)).astype(np.int8)
    w_scale = (rng.random(4 * hidden) * 0.01 + 1e-4).astype(np.float32)
    r_scale = (rng.random(4 * hidden) * 0.01 + 1e-4).astype(np.float32)
    if fitted:
        bias = rng.normal(0, 0.5, (dirs, 8 * hidden)).astype(np.float32)
        xs = [rng.normal(0, 2, (6, 2, features)).astype(np.float32)]
        direction = "bidirectional" if dirs == 2 else "forward"
        return rc.fit(w, w_scale, r, r_scale, bias, xs, direction, segments=int(rng.integers(1, 20)))
    segments = int(rng.integers(1, 24))
    directions = []
    for _ in range(dirs):
        tables = []
        for _ in range(3):
            knots = np.sort(rng.choice(np.arange(-32768, 32768), segments + 1, replace=False))
            tables.append(rc.Pwl.of(knots, rng.integers(-32767, 32768, segments + 1)))
        directions.append(rc.IntLstmDirection(w[len(directions)], r[len(directions)],
                                              rng.integers(0, 2**31, 4 * hidden), rng.integers(0, 2**31, 4 * hidden),
                                              rng.integers(-2**44, 2**44, 4 * hidden), tuple(tables)))
    return rc.IntLstm(float(rng.random() * 0.1 + 1e-3), int(rng.integers(0, 16)), tuple(directions))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(direction=st.sampled_from(["forward", "reverse", "bidirectional"]), hidden=st.integers(1, 24),
       features=st.integers(1, 20), steps=st.integers(0, 9), batch=st.integers(1, 4), states=st.booleans(),
       fitted=st.booleans(), seed=st.integers(0, 2**31))
def test_int_lstm_fuzz(direction, hidden, features, steps, batch, states, fitted, seed):
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    params = random_int_lstm(rng, dirs, hidden, features, fitted)
    x = rng.normal(0, 3, (steps, batch, features)).astype(np.float32)
    feeds = {"X": x}
    if states:
        feeds["initial_h"] = rng.uniform(-1, 1, (dirs, batch, hidden)).astype(np.float32)
        feeds["initial_c"] = rng.normal(0, 2, (dirs, batch, hidden)).astype(np.float32)
    got = nativelib.session(int_lstm_model(params, direction, states).SerializeToString(), threads=2).run(None, feeds)
    expected = rc.int_lstm(params, x, feeds.get("initial_h"), feeds.get("initial_c"), direction)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_int_lstm_sums_over_more_hidden_units_than_one_int32_run_exactly():
    """520 hidden units with R at +127 and the state at +1 (32767 in Q0.15): the largest sums the
    kernel meets, past its 512-product int32 runs, against the reference's int64 arithmetic."""
    rng = np.random.default_rng(7)
    hidden, features = 520, 3
    params = random_int_lstm(rng, 1, hidden, features, fitted=False)
    direction = params.directions[0]
    params = replace(params, directions=(replace(direction, r=np.full_like(direction.r, 127)),))
    x = rng.normal(0, 3, (2, 1, features)).astype(np.float32)
    feeds = {"X": x, "initial_h": np.ones((1, 1, hidden), np.float32),
             "initial_c": rng.normal(0, 2, (1, 1, hidden)).astype(np.float32)}
    got = nativelib.session(int_lstm_model(params, "forward", True).SerializeToString(), threads=2).run(None, feeds)
    expected = rc.int_lstm(params, x, feeds["initial_h"], feeds["initial_c"], "forward")
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"cell_frac": 16}, "cell_frac must be 0-15"),
    ({"direction": "sideways"}, "direction must be forward, reverse or bidirectional"),
    ({"x_scale": 0.0}, "x_scale must be positive"),
])
def test_int_lstm_attributes_are_checked_when_the_session_is_made(change, message):
    params = random_int_lstm(np.random.default_rng(0), 1, 4, 3, fitted=False)
    model = int_lstm_model(params, "forward", False)
    for a in model.graph.node[0].attribute:
        if a.name in change:
            if a.name == "direction":
                a.s = change[a.name].encode()
            elif a.name == "x_scale":
                a.f = change[a.name]
            else:
                a.i = change[a.name]
    with pytest.raises(Exception, match=message):
        nativelib.session(model.SerializeToString())


def test_int_lstm_input_of_the_wrong_width_is_a_clear_error():
    params = random_int_lstm(np.random.default_rng(0), 1, 4, 3, fitted=False)
    sess = nativelib.session(int_lstm_model(params, "forward", False).SerializeToString())
    with pytest.raises(Exception, match="last dimension of X must be F=3"):
        sess.run(None, {"X": np.zeros((2, 1, 5), np.float32)})
