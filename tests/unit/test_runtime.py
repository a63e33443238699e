import numpy as np

from ptqcli.runtime import session, truncated, with_outputs

from builders import encoder_model


def test_truncated_model_computes_the_early_tensor_alone():
    model = encoder_model()
    names = [n.output[0] for n in model.graph.node]
    early = names[len(names) // 3]
    x = np.random.default_rng(0).normal(size=(2, 16, 32)).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    full = session(with_outputs(model, [early])).run([early], feeds)[0]
    short = truncated(model, [early])
    assert len(short.graph.node) < len(model.graph.node)
    assert [o.name for o in short.graph.output] == [early]
    np.testing.assert_array_equal(session(short).run([early], feeds)[0], full)


def _with_value_info(model, name, dims):
    from onnx import TensorProto, helper

    from ptqcli.graph import clone

    copy = clone(model)
    copy.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    return copy


def test_an_output_whose_shapes_contradict_themselves_is_refused_unless_the_source_did_so():
    import pytest

    from ptqcli.errors import PtqError
    from ptqcli.graph import check_output

    model = encoder_model()
    first = model.graph.node[0].output[0]
    broken = _with_value_info(model, first, [3, 5, 7, 11, 13])  # a rank no op here writes
    check_output(model, model, "the exported model")
    with pytest.raises(PtqError, match="the exported model fails onnx.checker's shape inference"):
        check_output(broken, model, "the exported model")
    check_output(broken, broken, "the exported model")  # the source's own contradiction is not ours


def test_a_model_ort_refuses_is_named_in_one_line():
    import pytest
    from onnx import helper

    from ptqcli.errors import PtqError
    from ptqcli.graph import clone
    from ptqcli.runtime import optimized_model

    model = clone(encoder_model())
    model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.node[0].output[0]], ["dangling"],
                                             domain="no.such.domain"))
    model.opset_import.append(helper.make_opsetid("no.such.domain", 1))
    with pytest.raises(PtqError, match="^ONNX Runtime cannot load the exported model: "):
        optimized_model(model, "the exported model")
