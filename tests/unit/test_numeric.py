"""The numpy reference operators: forward against ONNX Runtime, VJPs against finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, ValueInfoProto, helper, numpy_helper

from ptqcli.errors import PtqError
from ptqcli.graph import IR_FOR_OPSET
from ptqcli.numeric import REGISTRY, batch_stats, batch_stats_vjp, forward, vjp
from ptqcli.numeric.conv import OPS as CONV_OPS


@dataclass(frozen=True)
class R:
    """A random normal float input of this shape (``scale`` times a standard normal)."""

    shape: tuple[int, ...]
    scale: float = 1.0


@dataclass(frozen=True)
class P:
    """A random float input of this shape, uniform in [0.5, 2): variances, denominators."""

    shape: tuple[int, ...]


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


@dataclass
class Case:
    id: str
    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    opset: int = 13
    outputs: int = 1

    def arrays(self, seed: int) -> list:
        rng = np.random.default_rng(seed)
        made = []
        for spec in self.inputs:
            if isinstance(spec, R):
                made.append((spec.scale * rng.normal(size=spec.shape)).astype(np.float32))
            elif isinstance(spec, P):
                made.append(rng.uniform(0.5, 2.0, size=spec.shape).astype(np.float32))
            else:
                made.append(spec)
        return made


def conv(id, *inputs, **attrs):
    return Case(id, "Conv", list(inputs), attrs)


def convt(id, *inputs, **attrs):
    return Case(id, "ConvTranspose", list(inputs), attrs)


def gemm(id, *inputs, **attrs):
    return Case(id, "Gemm", list(inputs), attrs)


def pool(op, id, x, **attrs):
    return Case(id, op, [x], attrs)


CASES = [
    conv("conv-3x3-pad", R((2, 3, 7, 7)), R((4, 3, 3, 3)), R((4,)), pads=[1, 1, 1, 1]),
    conv("conv-stride2-nobias", R((2, 3, 8, 8)), R((5, 3, 3, 3)), strides=[2, 2]),
    conv("conv-dilation-asympads", R((1, 2, 9, 9)), R((3, 2, 3, 3)), R((3,)), dilations=[2, 2], pads=[2, 1, 0, 1]),
    conv("conv-groups", R((2, 4, 6, 6)), R((6, 2, 3, 3)), R((6,)), group=2, pads=[1, 1, 1, 1]),
    conv("conv-depthwise-x2", R((2, 4, 6, 6)), R((8, 1, 3, 3)), R((8,)), group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
    # depthwise (one output channel per input channel) runs tap by tap instead of as patches
    conv("conv-depthwise", R((2, 5, 7, 7)), R((5, 1, 3, 3)), R((5,)), group=5, pads=[1, 1, 1, 1]),
    conv("conv-depthwise-5x5-stride2", R((2, 4, 9, 8)), R((4, 1, 5, 5)), group=4, strides=[2, 2], pads=[2, 1, 2, 2]),
    conv("conv-depthwise-dilated", R((1, 3, 8, 8)), R((3, 1, 3, 3)), R((3,)), group=3, dilations=[2, 2],
         pads=[2, 1, 1, 2]),
    conv("conv-depthwise-same-upper", R((1, 3, 8, 7)), R((3, 1, 3, 3)), group=3, strides=[2, 2], auto_pad="SAME_UPPER"),
    conv("conv-depthwise-1d", R((2, 4, 11)), R((4, 1, 3)), R((4,)), group=4, strides=[2], pads=[1, 0]),
    conv("conv-same-upper", R((1, 3, 7, 7)), R((2, 3, 3, 3)), auto_pad="SAME_UPPER", strides=[2, 2]),
    conv("conv-same-lower", R((1, 3, 6, 6)), R((2, 3, 4, 4)), R((2,)), auto_pad="SAME_LOWER", strides=[2, 2]),
    conv("conv-same-upper-even-kernel", R((1, 2, 5, 6)), R((2, 2, 2, 4)), auto_pad="SAME_UPPER"),
    conv("conv-valid-rect", R((1, 3, 7, 8)), R((2, 3, 2, 3)), auto_pad="VALID", strides=[1, 2]),
    conv("conv-kernel-shape-attr", R((1, 2, 5, 5)), R((3, 2, 3, 3)), kernel_shape=[3, 3], strides=[2, 1]),
    conv("conv-1x1", R((2, 8, 5, 5)), R((4, 8, 1, 1)), R((4,))),
    conv("conv-1d", R((2, 3, 10)), R((4, 3, 3)), R((4,)), pads=[1, 1], strides=[2]),
    conv("conv-3d", R((1, 2, 4, 5, 5)), R((3, 2, 2, 3, 3)), pads=[0, 1, 1, 0, 1, 1]),
    convt("convt-plain", R((1, 2, 3, 3)), R((2, 3, 2, 2))),
    convt("convt-stride2-outpad", R((2, 3, 4, 4)), R((3, 5, 3, 3)), R((5,)), strides=[2, 2], pads=[1, 1, 1, 1],
          output_padding=[1, 1]),
    convt("convt-dilation", R((1, 2, 3, 4)), R((2, 2, 3, 3)), strides=[2, 1], dilations=[2, 2], pads=[0, 1, 1, 0]),
    convt("convt-groups", R((1, 4, 3, 3)), R((4, 2, 3, 3)), R((4,)), group=2, strides=[2, 2]),
    convt("convt-output-shape", R((1, 2, 4, 4)), R((2, 3, 3, 3)), strides=[2, 2], output_shape=[8, 8]),
    convt("convt-same-upper", R((1, 2, 4, 4)), R((2, 3, 3, 3)), strides=[2, 2], auto_pad="SAME_UPPER"),
    convt("convt-same-lower", R((1, 2, 4, 4)), R((2, 3, 3, 3)), strides=[2, 2], auto_pad="SAME_LOWER"),
    convt("convt-1d", R((2, 3, 5)), R((3, 2, 4)), R((2,)), strides=[3], pads=[1, 2]),
    gemm("gemm-plain", R((3, 4)), R((4, 5)), R((5,))),
    gemm("gemm-transA", R((4, 3)), R((4, 5)), R((1, 5)), transA=1, alpha=0.5, beta=2.0),
    gemm("gemm-transB", R((3, 4)), R((5, 4)), R((3, 1)), transB=1),
    gemm("gemm-transAB", R((4, 3)), R((5, 4)), R((3, 5)), transA=1, transB=1, alpha=1.5, beta=-0.5),
    gemm("gemm-scalar-c", R((3, 4)), R((4, 5)), R((1,)), beta=0.25),
    gemm("gemm-no-c", R((3, 4)), R((5, 4)), transB=1),
    Case("matmul-2d", "MatMul", [R((3, 4)), R((4, 5))]),
    Case("matmul-batched-by-2d", "MatMul", [R((2, 3, 4)), R((4, 5))]),
    Case("matmul-broadcast", "MatMul", [R((2, 1, 3, 4)), R((5, 4, 6))]),
    Case("matmul-vector-left", "MatMul", [R((4,)), R((2, 4, 3))]),
    Case("matmul-vector-right", "MatMul", [R((2, 3, 4)), R((4,))]),
    Case("bn-4d", "BatchNormalization", [R((2, 3, 4, 4)), R((3,)), R((3,)), R((3,)), P((3,))]),
    Case("bn-2d-eps", "BatchNormalization", [R((5, 3)), R((3,)), R((3,)), R((3,)), P((3,))], {"epsilon": 1e-3}),
    Case("bn-3d", "BatchNormalization", [R((2, 4, 5)), R((4,)), R((4,)), R((4,)), P((4,))]),
    Case("relu", "Relu", [R((2, 3, 4, 5))]),
    Case("leaky-relu", "LeakyRelu", [R((2, 3, 4))], {"alpha": 0.1}),
    Case("leaky-relu-default", "LeakyRelu", [R((3, 4))]),
    Case("sigmoid", "Sigmoid", [R((2, 3, 4), 4.0)]),
    Case("hard-sigmoid", "HardSigmoid", [R((2, 3, 4), 4.0)], {"alpha": 0.3, "beta": 0.4}),
    Case("hard-sigmoid-default", "HardSigmoid", [R((3, 20), 4.0)]),
    Case("hard-swish", "HardSwish", [R((3, 20), 4.0)], opset=14),
    Case("clip-both", "Clip", [R((2, 3, 4)), f32(-0.5), f32(0.7)]),
    Case("clip-max-only", "Clip", [R((2, 3, 4)), None, f32(0.5)]),
    Case("clip-none", "Clip", [R((2, 3, 4))]),
    Case("softmax-last", "Softmax", [R((2, 3, 5))]),
    Case("softmax-axis1", "Softmax", [R((2, 3, 5))], {"axis": 1}),
    Case("add-channel", "Add", [R((2, 3, 4, 5)), R((3, 1, 1))]),
    Case("add-row", "Add", [R((2, 3)), R((3,))]),
    Case("add-both-broadcast", "Add", [R((4, 1, 5)), R((3, 1))]),
    Case("sub-scalar", "Sub", [R((2, 3, 4)), R((1,))]),
    Case("sub-left-broadcast", "Sub", [R((3, 1)), R((2, 3, 4))]),
    Case("mul-channel", "Mul", [R((2, 3, 4, 5)), R((1, 3, 1, 1))]),
    Case("mul-outer", "Mul", [R((3, 1)), R((1, 4))]),
    Case("div-row", "Div", [R((2, 3, 4)), P((4,))]),
    Case("div-left-broadcast", "Div", [R((1,)), P((2, 3))]),
    pool("MaxPool", "maxpool-2x2", R((2, 3, 6, 6)), kernel_shape=[2, 2], strides=[2, 2]),
    pool("MaxPool", "maxpool-3x3-pad", R((1, 2, 5, 5)), kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    pool("MaxPool", "maxpool-ceil", R((1, 2, 6, 6)), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    pool("MaxPool", "maxpool-ceil-pad", R((1, 2, 7, 6)), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
         ceil_mode=1),
    pool("MaxPool", "maxpool-dilation", R((1, 2, 7, 7)), kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 2]),
    pool("MaxPool", "maxpool-same-upper", R((1, 2, 5, 5)), kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    pool("MaxPool", "maxpool-same-lower", R((1, 2, 5, 5)), kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    pool("MaxPool", "maxpool-1d", R((2, 3, 9)), kernel_shape=[3], strides=[2]),
    pool("MaxPool", "maxpool-3d", R((1, 2, 4, 4, 4)), kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
    pool("AveragePool", "avgpool-2x2", R((2, 3, 6, 6)), kernel_shape=[2, 2], strides=[2, 2]),
    pool("AveragePool", "avgpool-pad-exclude", R((1, 2, 5, 5)), kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    pool("AveragePool", "avgpool-pad-include", R((1, 2, 5, 5)), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
         count_include_pad=1),
    pool("AveragePool", "avgpool-asym-pad-include", R((1, 2, 5, 6)), kernel_shape=[2, 3], strides=[2, 2],
         pads=[1, 0, 0, 2], count_include_pad=1),
    pool("AveragePool", "avgpool-ceil-exclude", R((1, 2, 6, 6)), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    pool("AveragePool", "avgpool-ceil-include", R((1, 2, 6, 6)), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         ceil_mode=1, count_include_pad=1),
    pool("AveragePool", "avgpool-same-upper", R((1, 2, 5, 5)), kernel_shape=[3, 3], strides=[2, 2],
         auto_pad="SAME_UPPER"),
    pool("AveragePool", "avgpool-same-lower-include", R((1, 2, 5, 5)), kernel_shape=[2, 2], strides=[2, 2],
         auto_pad="SAME_LOWER", count_include_pad=1),
    pool("AveragePool", "avgpool-1d", R((2, 3, 9)), kernel_shape=[3], strides=[2], pads=[1, 1]),
    Case("gap-4d", "GlobalAveragePool", [R((2, 3, 4, 5))]),
    Case("gap-3d", "GlobalAveragePool", [R((2, 3, 7))]),
    Case("concat-axis1", "Concat", [R((2, 3, 4)), R((2, 1, 4)), R((2, 2, 4))], {"axis": 1}),
    Case("concat-last", "Concat", [R((2, 3)), R((2, 5))], {"axis": -1}),
    Case("reshape-zero-minus-one", "Reshape", [R((2, 3, 4)), i64(0, -1)]),
    Case("reshape-zero-middle", "Reshape", [R((2, 3, 4)), i64(4, 0, 2)]),
    Case("reshape-flat", "Reshape", [R((2, 3, 4)), i64(-1)]),
    Case("flatten-0", "Flatten", [R((2, 3, 4))], {"axis": 0}),
    Case("flatten-1", "Flatten", [R((2, 3, 4, 5))]),
    Case("flatten-2", "Flatten", [R((2, 3, 4, 5))], {"axis": 2}),
    Case("flatten-neg", "Flatten", [R((2, 3, 4, 5))], {"axis": -1}),
    Case("transpose-default", "Transpose", [R((2, 3, 4))]),
    Case("transpose-nhwc", "Transpose", [R((2, 3, 4, 5))], {"perm": [0, 2, 3, 1]}),
    Case("squeeze", "Squeeze", [R((2, 1, 3, 1)), i64(1, -1)]),
    Case("squeeze-all", "Squeeze", [R((2, 1, 3, 1))]),
    Case("unsqueeze", "Unsqueeze", [R((2, 3)), i64(0, -1)]),
    Case("pad-constant", "Pad", [R((2, 3, 4, 4)), i64(0, 0, 1, 2, 0, 0, 2, 1), f32(0.5)]),
    Case("pad-constant-default", "Pad", [R((3, 4)), i64(1, 0, 0, 2)]),
    Case("pad-reflect", "Pad", [R((2, 3, 4, 5)), i64(0, 0, 2, 1, 0, 0, 1, 3)], {"mode": "reflect"}),
    Case("pad-edge", "Pad", [R((2, 3, 4, 5)), i64(0, 0, 2, 1, 0, 0, 1, 3)], {"mode": "edge"}),
    Case("pad-negative", "Pad", [R((2, 3, 5, 5)), i64(0, 0, -1, 2, 0, 0, 1, -2)]),
    Case("pad-wrap", "Pad", [R((2, 4, 5)), i64(0, 1, 2, 0, 3, 1)], {"mode": "wrap"}, opset=19),
    Case("pad-axes", "Pad", [R((2, 3, 4, 4)), i64(1, 2, 2, 0), f32(-1.0), i64(-1, -2)], opset=18),
    Case("slice-axes", "Slice", [R((4, 5, 6)), i64(1, 0), i64(3, -1), i64(0, 2)]),
    Case("slice-steps", "Slice", [R((4, 5, 6)), i64(0, 5, 1), i64(4, -100, 2**62), i64(0, 1, 2), i64(2, -2, 3)]),
    Case("slice-reverse", "Slice", [R((4, 5)), i64(-1), i64(-2**62), i64(1), i64(-1)]),
    Case("identity", "Identity", [R((2, 3))]),
    Case("dropout", "Dropout", [R((2, 3))]),
    Case("dropout-mask", "Dropout", [R((2, 3))], outputs=2),
]


def _ort_outputs(case: Case, arrays: list) -> list[np.ndarray]:
    """Run the case as a one-node model in ONNX Runtime: floats as inputs, the rest as initializers."""
    while arrays and arrays[-1] is None:
        arrays = arrays[:-1]
    names = ["" if a is None else f"in{i}" for i, a in enumerate(arrays)]
    graph_inputs, inits = [], []
    for name, a in zip(names, arrays):
        if a is None:
            continue
        if a.dtype == np.float32:
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)))
        else:
            inits.append(numpy_helper.from_array(a, name))
    outputs = [f"out{k}" for k in range(case.outputs)]
    node = helper.make_node(case.op, names, outputs, **case.attrs)
    graph = helper.make_graph([node], case.id, graph_inputs,
                              [ValueInfoProto(name=o) for o in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = IR_FOR_OPSET[case.opset]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: a for n, a in zip(names, arrays) if a is not None and a.dtype == np.float32}
    return session.run(None, feeds)


def _differentiable(case: Case, arrays: list) -> list[int]:
    impl = REGISTRY[case.op]
    return [i for i, a in enumerate(arrays) if a is not None and a.dtype == np.float64 and impl.can_grad(i)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_onnxruntime(case):
    arrays = case.arrays(seed=len(case.id))
    expected = _ort_outputs(case, list(arrays))
    got = forward(case.op, arrays, case.attrs)[: case.outputs]
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vjp_matches_finite_differences(case):
    """<v, J u> by central differences against <J^T v, u>, per input, in float64."""
    arrays = [a.astype(np.float64) if a is not None and a.dtype == np.float32 else a
              for a in case.arrays(seed=len(case.id))]
    slots = _differentiable(case, arrays)
    rng = np.random.default_rng(7)
    y = forward(case.op, arrays, case.attrs)[0]
    v = rng.normal(size=y.shape)
    _, grads = vjp(case.op, arrays, case.attrs, v)
    eps = 1e-6
    for i in slots:
        u = rng.normal(size=arrays[i].shape)
        shifted = [list(arrays), list(arrays)]
        shifted[0][i] = arrays[i] + eps * u
        shifted[1][i] = arrays[i] - eps * u
        plus, minus = (float(np.vdot(v, forward(case.op, s, case.attrs)[0])) for s in shifted)
        numeric = (plus - minus) / (2 * eps)
        assert grads[i] is not None and grads[i].shape == arrays[i].shape, f"input {i}"
        analytic = float(np.vdot(grads[i], u))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-6), f"input {i}"


def test_every_required_op_is_registered():
    required = {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "LeakyRelu",
        "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Add", "Sub", "Div", "MaxPool", "AveragePool",
        "GlobalAveragePool", "Concat", "Reshape", "Flatten", "Transpose", "Pad", "Slice", "Identity",
        "Softmax", "Dropout", "Constant",
    }
    assert required <= set(REGISTRY)
    tested = {c.op for c in CASES} | {"Constant"}
    assert set(REGISTRY) <= tested


def test_vjp_computes_only_wanted_cotangents():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(1, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    _, grads = vjp("Conv", [x, w, b], {}, rng.normal(size=(1, 3, 3, 3)), wants=[False, True, False])
    assert grads[0] is None and grads[2] is None and grads[1].shape == w.shape


def test_conv_keeps_only_what_the_wanted_cotangents_need():
    """Data gradient only (synthetic data): the input activation is not kept; weight only: the
    weight is not kept."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(1, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3))
    _, ctx = CONV_OPS["Conv"].forward([x, w], {}, (True, False))
    assert ctx.x is None and ctx.w is w
    _, ctx = CONV_OPS["Conv"].forward([x, w], {}, (False, True))
    assert ctx.w is None and ctx.x is x


def test_inputs_are_never_modified():
    rng = np.random.default_rng(0)
    for case in CASES:
        arrays = case.arrays(seed=1)
        before = [None if a is None else a.copy() for a in arrays]
        y = forward(case.op, arrays, case.attrs)[0]
        vjp(case.op, arrays, case.attrs, rng.normal(size=y.shape).astype(y.dtype))
        for a, b in zip(arrays, before):
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=case.id)


@pytest.mark.parametrize("unbiased", [False, True])
def test_batch_stats_and_their_vjp(unbiased):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 5, 5))
    mean, var = batch_stats(x, unbiased=unbiased)
    np.testing.assert_allclose(mean, x.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1))
    np.testing.assert_allclose(var, x.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=int(unbiased)))
    g_mean, g_var, u = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)

    def loss(t):
        m, v = batch_stats(t, unbiased=unbiased)
        return float(g_mean @ m + g_var @ v)

    eps = 1e-6
    numeric = (loss(x + eps * u) - loss(x - eps * u)) / (2 * eps)
    analytic = float(np.vdot(batch_stats_vjp(x, g_mean, g_var, unbiased=unbiased), u))
    assert analytic == pytest.approx(numeric, rel=1e-6)
    assert batch_stats_vjp(x, None, None).shape == x.shape


@pytest.mark.parametrize("op, attrs, message", [
    ("MaxPool", {}, "kernel_shape"),
    ("Pad", {"mode": "mirror"}, "mode=mirror"),
    ("BatchNormalization", {"training_mode": 1}, "training_mode"),
])
def test_unsupported_attributes_are_one_line_errors(op, attrs, message):
    x = np.ones((1, 2, 4, 4), np.float32)
    inputs = {"Pad": [x, i64(0, 0, 1, 1, 0, 0, 1, 1)], "BatchNormalization": [x] + [np.ones(2, np.float32)] * 4}
    with pytest.raises(PtqError, match=message) as info:
        forward(op, inputs.get(op, [x]), attrs)
    assert "\n" not in str(info.value)


def test_unknown_op_is_an_error():
    with pytest.raises(PtqError, match="LayerNormalization"):
        forward("LayerNormalization", [np.ones(3)], {})


def test_max_pool_picks_the_first_of_equal_values_as_an_argmax_would():
    """The cotangent goes to the first maximum of each window in tap order, ties included (ReLU
    outputs are full of equal zeros), checked against a loop over the windows."""
    from ptqcli.numeric.pool import _max_pool_forward, _max_pool_vjp

    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 3, 6, 8)), 0).astype(np.float32)
    x[0, 0, :2, :2] = 1.5  # a window of four equal values
    (y,), ctx = _max_pool_forward([x], {"kernel_shape": [2, 2], "strides": [2, 2]}, (True,))
    g = rng.normal(size=y.shape).astype(np.float32)
    (dx,) = _max_pool_vjp(ctx, g, (True,))
    expected_y, expected_dx = np.zeros_like(y), np.zeros_like(x)
    for n, c, i, j in np.ndindex(*y.shape):
        window = x[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel()
        first = int(np.argmax(window))
        expected_y[n, c, i, j] = window[first]
        expected_dx[n, c, 2 * i + first // 2, 2 * j + first % 2] = g[n, c, i, j]
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(dx, expected_dx)
