"""Per-op facts as data: one registry that every stage consults instead of matching op names.

``weight_input``/``bias_input`` name the input slots that hold constant parameters;
``channel_axis`` says which weight axis indexes output channels (a function of the node,
because Gemm's depends on ``transB``). ``act_inputs`` are the input slots whose float values are
quantized; ``quantize_output`` says whether the op's output is quantized too. An op absent from
the registry is left in float and reported, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from onnx import NodeProto, TensorProto, helper, numpy_helper


def _plain(value: Any) -> Any:
    """An attribute value as numpy/Python data: strings decoded, tensors as arrays."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def node_attrs(node: NodeProto) -> dict[str, Any]:
    """A node's attributes as a dict: the one way attributes are read."""
    return {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    return node_attrs(node).get(name, default)


@dataclass(frozen=True)
class OpInfo:
    act_inputs: tuple[int, ...] | None = (0,)  # None: every input (variadic ops)
    quantize_output: bool = True
    weight_input: int | None = None
    bias_input: int | None = None
    channel_axis: Callable[[NodeProto], int] = lambda node: 0
    # Conv-like ops whose BatchNormalization successor can be folded into their weights.
    folds_batchnorm: bool = False
    # Ops ORT fuses into a quantized kernel when their output is quantized: their own float
    # output need not be quantized when it only feeds one of these.
    fusable_activation: bool = False
    # Output values are a subset of the input values (max, reshape): the output reuses the
    # input's scale, which lets ORT run the op on integers without requantizing.
    preserves_scale: bool = False
    # Multiply-accumulates are counted per input element (ConvTranspose) rather than per output.
    macs_per_input: bool = False
    # Which weight axis runs over input channels, and which axis of the activation input holds
    # them: together they turn a weight error into the output mean shift bias correction removes.
    weight_in_axis: Callable[[NodeProto], int] | None = None
    act_channel_axis: Callable[[NodeProto], int] | None = None
    # ORT's integer kernel can write float (MatMulIntegerToFloat, QGemm without an output scale):
    # quantizing the output buys nothing unless a reader of it runs on integers.
    float_output_kernel: bool = False
    # Between two activations (attention's QK^T and PV), ORT's 8-bit kernel is no faster than
    # float on CPU (both sides are quantized at run time, the matrices are small) and the
    # attention probabilities lose precision on a per-tensor grid: left in float for 8-bit
    # activations (16-bit QDQ targets quantize it).
    float_without_weight: bool = False
    # More constant weights beside `weight_input`, quantized like it: a recurrent layer's R.
    extra_weight_inputs: tuple[int, ...] = ()
    # ORT's integer kernel (QLinearAdd, QLinearMul) takes a quantized constant as either input: a
    # constant operand (the + 3 and / 6 of a decomposed HardSwish) is put on the activations'
    # grid so that the op stays on integers.
    quantize_constants: bool = False


# ORT's kernels that compute on integers: what the fidelity table lists as the kernel path.
ORT_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                   "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                   "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                   "QAttention")
# Ops that only a model quantized already holds (quantizing it again would stack a second grid on
# the first, where the float original is what calibration needs).
QUANTIZED_MODEL_OPS = frozenset(ORT_INTEGER_OPS + (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeLSTM", "GatherBlockQuantized"))

# The GEMM-class ops: weight rows, N:M layouts, native kernels and integer inputs are defined for them.
MATRIX_OPS = ("Conv", "Gemm", "MatMul")


def _gemm_axis(node: NodeProto) -> int:
    return 0 if attr(node, "transB", 0) else 1


_COMPUTE = {
    "Conv": OpInfo(weight_input=1, bias_input=2, folds_batchnorm=True,
                   weight_in_axis=lambda node: 1, act_channel_axis=lambda node: 1),
    "ConvTranspose": OpInfo(weight_input=1, bias_input=2, channel_axis=lambda node: 1, macs_per_input=True),
    "Gemm": OpInfo(weight_input=1, bias_input=2, channel_axis=_gemm_axis, folds_batchnorm=True, float_output_kernel=True,
                   weight_in_axis=lambda node: 1 - _gemm_axis(node),
                   act_channel_axis=lambda node: 0 if attr(node, "transA", 0) else 1),
    # MatMul's weight is input 1 when it is a constant [K, N]; two activations otherwise.
    "MatMul": OpInfo(act_inputs=(0, 1), weight_input=1, channel_axis=lambda node: -1, float_output_kernel=True,
                     float_without_weight=True,
                     weight_in_axis=lambda node: -2, act_channel_axis=lambda node: -1),
}

# Recurrent layers: W [directions, gates * hidden, input] and R [directions, gates * hidden, hidden]
# get one scale per gate row (axis 1). Stock ORT has no integer kernel reading their sequence input
# or the QDQ form, so the input stays float: the weights shrink, the math is the float LSTM's.
_RECURRENT = {
    op: OpInfo(act_inputs=(), quantize_output=False, weight_input=1, extra_weight_inputs=(2,),
               channel_axis=lambda node: 1)
    for op in ("LSTM", "GRU", "RNN")
}

_ELEMENTWISE = {
    "Add": OpInfo(act_inputs=(0, 1), quantize_constants=True),
    "Mul": OpInfo(act_inputs=(0, 1), quantize_constants=True),
    "Sub": OpInfo(act_inputs=(0, 1)),
}

_UNARY = {
    op: OpInfo()
    for op in (
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "LeakyRelu",
        "Softmax",
        "Resize",
    )
}

_SCALE_PRESERVING = {"MaxPool": OpInfo(preserves_scale=True)}

_FUSABLE = {op: OpInfo(act_inputs=(), fusable_activation=True) for op in ("Relu", "Clip")}

# Contrib ops of ORT's transformer optimizer that carry weights: the fused Attention's QKV weight
# [hidden, 3 * hidden] gets one scale per column, and the op becomes QAttention (its bias stays
# float; its input is quantized statically or at run time).
CONTRIB_OP_INFO: dict[tuple[str, str], OpInfo] = {
    ("com.microsoft", "Attention"): OpInfo(act_inputs=(0,), quantize_output=False, weight_input=1,
                                           channel_axis=lambda node: 1, float_output_kernel=True),
}

OP_INFO: dict[str, OpInfo] = {
    **_COMPUTE,
    **_RECURRENT,
    **_ELEMENTWISE,
    **_UNARY,
    **_FUSABLE,
    **_SCALE_PRESERVING,
    "Concat": OpInfo(act_inputs=None),
    "Sum": OpInfo(act_inputs=None),
}

# Ops that carry parameters worth quantizing (counted by `ptq inspect`, given bias correction).
WEIGHTED_OPS = tuple(op for op, info in OP_INFO.items() if info.weight_input is not None)

# Ops that only move or reshape data: left in float, they neither need nor block quantization.
LAYOUT_OPS = frozenset(
    {
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Dropout",
        "Shape",
        "Gather",
        "Slice",
        "Split",
        "Pad",
        "Cast",
        "Constant",
        "ConstantOfShape",
        "Expand",
        "Tile",
    }
)


@dataclass(frozen=True)
class Normalization:
    """A normalization whose last step is a per-channel affine map y = norm(x) * scale + bias over
    the last axis: smoothing folds per-channel factors into `scale_input`/`bias_input`."""
    scale_input: int
    bias_input: int | None


# (domain, op type) -> where its affine parameters are; ORT's fused forms included.
NORMALIZATIONS: dict[tuple[str, str], Normalization] = {
    ("", "LayerNormalization"): Normalization(1, 2),
    ("", "RMSNormalization"): Normalization(1, None),
    ("com.microsoft", "SkipLayerNormalization"): Normalization(2, 3),
    ("com.microsoft", "SimplifiedLayerNormalization"): Normalization(1, None),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): Normalization(2, None),
}


def normalization(node: NodeProto) -> Normalization | None:
    """Where the node's affine parameters are, if it is a normalization (a 1-D scale means the
    last axis alone is normalized: the caller checks)."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return NORMALIZATIONS.get((domain, node.op_type))


def op_info(op_type: str, domain: str = "") -> OpInfo | None:
    """The registry entry for the op, or None when the op stays in float."""
    if domain not in ("", "ai.onnx"):
        return CONTRIB_OP_INFO.get((domain, op_type))
    return OP_INFO.get(op_type)


def integer_layer_op(node: NodeProto) -> bool:
    """A weighted op whose integer kernel reads a quantized input: Conv, Gemm, MatMul, and the
    contrib Attention (QAttention)."""
    return (node.op_type in MATRIX_OPS and node.domain in ("", "ai.onnx")) or \
        (node.domain, node.op_type) in CONTRIB_OP_INFO


def activation_slots(node: NodeProto, info: OpInfo) -> list[int]:
    slots = range(len(node.input)) if info.act_inputs is None else info.act_inputs
    return [i for i in slots if i < len(node.input) and node.input[i]]


def preserves_scale(node: NodeProto) -> bool:
    """Layout ops and max-like ops: what comes out is some of what went in."""
    if node.op_type in LAYOUT_OPS and node.op_type not in ("Shape", "Cast", "Constant", "ConstantOfShape"):
        return True
    info = op_info(node.op_type, node.domain)
    return info is not None and info.preserves_scale


def groups(node: NodeProto) -> int:
    return int(attr(node, "group", 1))


def is_fusable_activation(node: NodeProto) -> bool:
    info = op_info(node.op_type, node.domain)
    return info is not None and info.fusable_activation


def channel_axis(node: NodeProto) -> int:
    info = op_info(node.op_type, node.domain)
    assert info is not None and info.weight_input is not None
    return info.channel_axis(node)
