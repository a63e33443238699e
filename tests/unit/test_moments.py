"""The shared moments pass: Gram matrices computed inside the session equal X^T X of the tensors
themselves, and the light shape inference and size estimate agree with ONNX's own."""

import numpy as np
import onnx
import pytest

from ptqcli.calibrate.data import Batch
from ptqcli.calibrate.moments import channel_moments
from ptqcli.graph import Graph, approximate_bytes, model_bytes_or_path
from ptqcli.prepare import infer_shapes, prepare
from ptqcli.runtime import session, with_outputs

from builders import encoder_model, text_encoder_model


def _batches(model, n=6, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 16, 32)).astype(np.float32)
    name = model.graph.input[0].name
    return [Batch({name: x[i:i + 2]}, None) for i in range(0, n, 2)], {name: x}


def test_gram_matrices_from_the_session_equal_the_tensors_own_products():
    g = prepare(encoder_model())
    gemms = [n for n in g.graph.node if n.op_type == "MatMul" and n.input[1] in g.initializers]
    tensors = list(dict.fromkeys(n.input[0] for n in gemms))[:3]
    batches, feeds = _batches(g.model)
    moments, seen = channel_moments(g, tensors[:1], batches, set(tensors))
    assert seen == 6
    values = session(with_outputs(g.model, tensors)).run(tensors, feeds)
    for name, value in zip(tensors, values):
        rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(moments[name].gram, rows.T @ rows, rtol=1e-4, atol=1e-3)
    first = values[0].reshape(-1, values[0].shape[-1])
    np.testing.assert_allclose(moments[tensors[0]].absmax, np.abs(first).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(moments[tensors[0]].lo, first.min(axis=0), rtol=1e-6)
    assert moments[tensors[1]].absmax.size == 0  # asked for its Gram matrix alone


@pytest.mark.parametrize("build", [encoder_model, text_encoder_model])
def test_shape_inference_without_weight_data_gives_onnx_own_types(build):
    model = build()
    expected = onnx.shape_inference.infer_shapes(model, data_prop=True)
    ours = infer_shapes(model)
    assert {vi.name: vi.type for vi in ours.graph.value_info} == {vi.name: vi.type for vi in expected.graph.value_info}
    assert [o.type for o in ours.graph.output] == [o.type for o in expected.graph.output]
    assert [t.raw_data for t in ours.graph.initializer] == [t.raw_data for t in model.graph.initializer]


def test_size_estimate_is_close_to_the_serialized_size(tmp_path):
    for model in (encoder_model(), text_encoder_model()):
        exact = model.ByteSize()
        assert exact <= approximate_bytes(model) <= exact + 4096 + 64 * len(model.graph.initializer)


def test_large_models_reach_ort_through_a_file_with_their_weights_beside_it(tmp_path, monkeypatch):
    """Past SESSION_BYTES_LIMIT a session's model (and its output or truncated variants) is written
    as a weightless graph plus external data, and computes exactly what the in-memory model does."""
    import ptqcli.graph as graph
    from ptqcli.runtime import truncated

    model = encoder_model()
    assert isinstance(model_bytes_or_path(model, tmp_path), bytes)
    names = [n.output[0] for n in model.graph.node]
    early, late = names[len(names) // 3], names[2 * len(names) // 3]
    feeds = {model.graph.input[0].name: np.random.default_rng(0).normal(size=(2, 16, 32)).astype(np.float32)}
    outputs = [o.name for o in model.graph.output]
    expected = session(with_outputs(model, [early])).run(outputs + [early], feeds)
    expected_short = session(truncated(model, [late])).run([late], feeds)
    monkeypatch.setattr(graph, "SESSION_BYTES_LIMIT", 1)
    assert isinstance(model_bytes_or_path(model, tmp_path), str)
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    for got, want in zip(session(model, outputs=[early]).run(outputs + [early], feeds), expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(session(model, outputs=[late], only=True).run([late], feeds)[0], expected_short[0])


def test_moments_need_samples():
    from ptqcli.errors import PtqError

    g = Graph(encoder_model())
    with pytest.raises(PtqError, match="no samples"):
        channel_moments(g, [g.graph.node[0].output[0]], [], set())
