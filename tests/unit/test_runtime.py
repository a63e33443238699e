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
