"""An erf GELU (and the bias Add that writes its input) stays float: ORT runs it as one Gelu kernel."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptqcli.calibrate.select import GELU_REASON, erf_gelus, select
from ptqcli.config import QuantConfig
from ptqcli.graph import Graph
from transformer_builders import encoder_model


def _ffn(half_first: bool, bias_read_elsewhere: bool = False):
    """x = h W1 + b -> GELU(x) -> (GELU) W2, as exporters write it, the 0.5 before or after the product."""
    rng = np.random.default_rng(0)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)  # noqa: E731
    n = helper.make_node
    tail = [n("Mul", ["x", "half"], ["xh"], name="half_x"), n("Mul", ["xh", "one_erf"], ["g"], name="gelu")] if half_first \
        else [n("Mul", ["x", "one_erf"], ["xg"], name="x_erf"), n("Mul", ["xg", "half"], ["g"], name="gelu")]
    nodes = [n("MatMul", ["h", "w1"], ["x_mm"], name="ffn_in"), n("Add", ["x_mm", "b1"], ["x"], name="ffn_bias"),
             n("Div", ["x", "sqrt2"], ["xs"], name="gelu_div"), n("Erf", ["xs"], ["e"], name="gelu_erf"),
             n("Add", ["e", "one"], ["one_erf"], name="gelu_add"), *tail,
             n("MatMul", ["g", "w2"], ["y"], name="ffn_out")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    if bias_read_elsewhere:
        nodes.append(n("Relu", ["x"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 16]))
    inits = [c("w1", rng.normal(0, 0.3, (8, 16))), c("b1", rng.normal(0, 0.1, 16)), c("sqrt2", 2 ** 0.5),
             c("one", 1.0), c("half", 0.5), c("w2", rng.normal(0, 0.3, (16, 8)))]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 8])],
                              outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_both_orders_of_the_product_are_found_with_their_bias_add():
    for half_first in (False, True):
        g = Graph(_ffn(half_first))
        assert set(erf_gelus(g)) == {"ffn_bias", "gelu_div", "gelu_erf", "gelu_add", "gelu", "half_x" if half_first else "x_erf"}


def test_a_bias_add_read_elsewhere_is_not_part_of_it():
    assert "ffn_bias" not in erf_gelus(Graph(_ffn(False, bias_read_elsewhere=True)))


def test_its_tensors_stay_float_and_the_gemm_inputs_are_quantized():
    sel = select(Graph(_ffn(False)), QuantConfig())
    assert {"h", "g"} <= set(sel.activations)  # the GEMMs' inputs
    assert not {"x", "xs", "e", "one_erf", "xg"} & set(sel.activations)
    assert sel.float_nodes["gelu_erf"] == GELU_REASON


def test_the_test_encoder_has_one():
    g = Graph(encoder_model())
    assert len([n for n in erf_gelus(g) if g.node_by_name[n].op_type == "Erf"]) == 1
