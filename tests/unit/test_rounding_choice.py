"""`--rounding auto`: layer-wise rounding below 8 bits when there is data (GPTQ for models of
MatMul/Gemm layers, AdaRound otherwise), nearest otherwise; the plan records what it became and why."""

import pytest

from ptqcli.config import QuantConfig, Rounding
from ptqcli.prepare import prepare
from ptqcli.stages import resolved_rounding

from builders import conv_bn_relu_model
from transformer_builders import tiny_language_model


@pytest.mark.parametrize("build, options, has_data, expected", [
    (conv_bn_relu_model, {"weights": "int4"}, True, "adaround"),
    (conv_bn_relu_model, {"weights": "exp:3"}, True, "adaround"),
    (conv_bn_relu_model, {"weights": "int4", "acts": "none"}, True, "adaround"),  # convolutions: not GPTQ's
    (conv_bn_relu_model, {"weights": "int8"}, True, "nearest"),
    (conv_bn_relu_model, {"weights": "int8", "layer_weights": {"conv": "int4"}}, True, "adaround"),
    (conv_bn_relu_model, {"weights": "binary"}, True, "nearest"),
    (conv_bn_relu_model, {"weights": "int4", "acts": "none"}, False, "nearest"),
    (tiny_language_model, {"weights": "int4", "acts": "none", "block_size": 16}, True, "gptq"),
    (tiny_language_model, {"weights": "int4", "acts": "dynamic"}, True, "gptq"),
    (tiny_language_model, {"weights": "int4"}, True, "gptq"),  # static activations too: H from the quantized prefix
    (tiny_language_model, {"weights": "int4", "acts": "none", "block_size": 16}, False, "nearest"),
])
def test_auto_rounding_resolves_by_format_data_and_layers(build, options, has_data, expected):
    g = prepare(build())
    if "layer_weights" in options:  # name a real Conv of the model
        options = {**options, "layer_weights": {next(n.name for n in g.graph.node if n.op_type == "Conv"): "int4"}}
    quant, why = resolved_rounding(g, QuantConfig(**options), has_data)
    assert quant.rounding is Rounding(expected)
    assert why.startswith(f"auto: {expected}")


def test_a_rounding_the_user_set_is_kept():
    g = prepare(conv_bn_relu_model())
    quant, why = resolved_rounding(g, QuantConfig(weights="int4", rounding="nearest"), True)
    assert quant.rounding is Rounding.nearest and why == "set by the user"
