"""The integer LSTM's tables and arithmetic (ptqcli/recurrent.py): tables fitted on the values a
function meets beat tables on evenly spaced knots, and the integer LSTM follows the float one."""

import numpy as np

import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqcli import recurrent as rc


def _table_error(table, samples, f):
    codes = np.clip(np.rint(samples * 2.0**rc.GATE_FRAC), -32768, 32767)
    return np.sqrt(np.mean((rc.pwl_eval(table, codes) / 2.0**rc.OUT_FRAC - f(samples)) ** 2))


@pytest.mark.parametrize("name, draw", [
    ("sigmoid", lambda rng: rng.normal(0, 2, 50_000)),
    ("sigmoid", lambda rng: rng.standard_t(3, 50_000)),  # heavy tails: most knots still belong near 0
    ("tanh", lambda rng: rng.normal(0.5, 0.7, 50_000)),
])
def test_fitted_tables_beat_evenly_spaced_knots_on_the_data_they_were_fitted_to(name, draw):
    rng = np.random.default_rng(0)
    samples = draw(rng)
    f = (lambda x: 1 / (1 + np.exp(-x))) if name == "sigmoid" else np.tanh
    fitted = rc.fit_pwl(name, samples, rc.GATE_FRAC, 16)
    knots = np.linspace(samples.min(), samples.max(), 17)
    even = rc.Pwl.of(np.rint(knots * 2.0**rc.GATE_FRAC), np.rint(f(knots) * 2.0**rc.OUT_FRAC))
    held_out = draw(np.random.default_rng(1))
    assert _table_error(fitted, held_out, f) < 0.002
    assert _table_error(fitted, held_out, f) < 0.5 * _table_error(even, held_out, f)


def test_tables_hold_their_ends_outside_the_knots_and_stay_in_range():
    table = rc.fit_pwl("tanh", np.random.default_rng(0).normal(0, 1, 10_000), rc.GATE_FRAC, 8)
    outside = rc.pwl_eval(table, np.array([-40_000, int(table.knots[0]) - 1, int(table.knots[-1]) + 1, 40_000]))
    assert outside.tolist() == [table.values[0]] * 2 + [table.values[-1]] * 2
    assert np.all(np.diff(table.knots) > 0)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_integer_lstm_follows_the_float_lstm_with_the_same_int8_weights(direction):
    """From initial states as a decoder gets them from its encoder (cells far beyond what a zero
    start reaches): the fit sees them, so the cell format holds them."""
    rng = np.random.default_rng(0)
    dirs, hidden, features = (2 if direction == "bidirectional" else 1), 24, 10
    w = rng.normal(0, 0.3, (dirs, 4 * hidden, features)).astype(np.float32)
    r = rng.normal(0, 0.2, (dirs, 4 * hidden, hidden)).astype(np.float32)
    b = rng.normal(0, 0.2, (dirs, 8 * hidden)).astype(np.float32)
    w_scale, r_scale = np.abs(w).max(axis=(0, 2)) / 127, np.abs(r).max(axis=(0, 2)) / 127
    w_codes = np.rint(w / w_scale[None, :, None]).astype(np.int8)
    r_codes = np.rint(r / r_scale[None, :, None]).astype(np.int8)
    def start(n):
        return (rng.uniform(-0.9, 0.9, (dirs, n, hidden)).astype(np.float32),
                rng.normal(0, 6.0, (dirs, n, hidden)).astype(np.float32))

    xs, states = [rng.normal(0, 1, (16, 4, features)).astype(np.float32) for _ in range(3)], [start(4) for _ in range(3)]
    params = rc.fit(w_codes, w_scale, r_codes, r_scale, b, xs, direction, states=states)
    assert params.cell_frac <= 12  # room for |c| near 20
    x = rng.normal(0, 1, (16, 3, features)).astype(np.float32)
    h0, c0 = start(3)
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=hidden,
                            direction=direction)
    weights = [numpy_helper.from_array((w_codes * w_scale[None, :, None]).astype(np.float32), "W"),
               numpy_helper.from_array((r_codes * r_scale[None, :, None]).astype(np.float32), "R"),
               numpy_helper.from_array(b, "B")]
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                               for n in ("x", "h0", "c0")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "h0": h0, "c0": c0})
    got = rc.int_lstm(params, x, h0, c0, direction)
    for e, g in zip(expected, got):
        cosine = float(e.ravel() @ g.ravel() / (np.linalg.norm(e) * np.linalg.norm(g)))
        assert cosine > 0.999, cosine
        assert np.abs(e - g).max() < 0.05
