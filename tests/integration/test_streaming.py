"""Models whose inputs are not all a batch of samples: a recurrent state [2, N, hidden] and a scalar
sample rate beside the samples, fed as each file gives them, and state feedback over a stream of
steps (each step's state is the float model's output of the step before)."""

import numpy as np
import onnx
import pytest

from builders import streaming_model
from ptqcli.calibrate.data import iter_batches, model_inputs
from ptqcli.config import DataConfig
from ptqcli.errors import PtqError
from ptqcli.graph import Graph
from ptqcli.rundir import load_run
from ptqcli.runtime import session
from test_cli import assert_user_error, ptq

RATE = np.array(16000, np.int64)


def _streams(folder, files=4, steps=5, seed=0):
    """Per-file streams: `steps` chunks of samples, a start state and the sample rate."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(files):
        np.savez(folder / f"stream{i}.npz", x=rng.normal(0, 1, (steps, 16)).astype(np.float32),
                 state=rng.normal(0, 0.1, (2, 1, 8)).astype(np.float32), sr=RATE)
    return folder


@pytest.fixture
def streaming(tmp_path):
    model = tmp_path / "streaming.onnx"
    onnx.save(streaming_model(), str(model))
    return model, _streams(tmp_path / "streams")


def test_inputs_without_a_sample_axis_are_told_from_the_signature():
    specs = {s.name: s for s in model_inputs(Graph(streaming_model()))}
    assert specs["x"].batched and not specs["state"].batched and not specs["sr"].batched
    assert specs["state"].sample_shape() == (2, None, 8) and specs["sr"].sample_shape() == ()


def test_given_inputs_are_fed_as_the_file_holds_them_one_sample_a_run(streaming):
    model, folder = streaming
    g = Graph(onnx.load(str(model)))
    batches = list(iter_batches(folder, model_inputs(g), DataConfig(batch_size=16), limit=100))
    assert len(batches) == 20 and all(b.size == 1 for b in batches)
    first = np.load(folder / "stream0.npz")
    np.testing.assert_array_equal(batches[0].feeds["x"], first["x"][:1])
    for b in batches[:5]:  # without feedback every step of a file gets the file's state
        np.testing.assert_array_equal(b.feeds["state"], first["state"])
        assert b.feeds["sr"].shape == () and b.feeds["sr"] == 16000
    sess = session(g.model)
    assert all(sess.run(None, b.feeds) for b in batches)


def test_feedback_steps_each_file_through_the_float_model(streaming):
    model, folder = streaming
    g = Graph(onnx.load(str(model)))
    cfg = DataConfig(feedback="next_state=state")
    batches = list(iter_batches(folder, model_inputs(g), cfg, limit=100, model=g.model))
    sess = session(g.model)
    for i in range(4):
        data = np.load(folder / f"stream{i}.npz")
        state = data["state"]
        for t in range(5):
            b = batches[5 * i + t]
            np.testing.assert_array_equal(b.feeds["x"], data["x"][t:t + 1])
            np.testing.assert_allclose(b.feeds["state"], state, rtol=0, atol=0)
            state = sess.run(["next_state"], {"x": data["x"][t:t + 1], "state": state, "sr": RATE})[0]
    # Skipping samples (held-out evaluation) skips steps, the stream still starts at the file's state.
    later = list(iter_batches(folder, model_inputs(g), cfg, limit=3, skip=7, model=g.model))
    for a, b in zip(later, batches[7:10]):
        np.testing.assert_array_equal(a.feeds["state"], b.feeds["state"])


def test_quantize_a_streaming_model_with_feedback(streaming, tmp_path):
    model, folder = streaming
    out = tmp_path / "q.onnx"
    r = ptq("quantize", model, "--data", folder, "--feedback", "next_state=state", "-o", out)
    assert r.returncode == 0, r.stderr
    run = load_run(tmp_path / "q.onnx.run")
    assert run.plan.data.feedback == ("next_state=state",)
    assert {layer.node for layer in run.plan.layers} == {"input_proj", "state_proj", "out_proj"}
    # The state GEMM saw the fed-back states (a zero state everywhere would leave it a zero range).
    s0 = run.plan.tensors["s0"]
    assert float(np.max(s0.scale)) > 1e-3
    q, f = session(onnx.load(str(out))), session(onnx.load(str(model)))
    data = np.load(folder / "stream0.npz")
    feeds = {"x": data["x"][:1], "state": data["state"], "sr": RATE}
    y_q, y_f = q.run(["y"], feeds)[0], f.run(["y"], feeds)[0]
    assert np.corrcoef(y_q.ravel(), y_f.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("feedback, message", [
    ("nothing=state", "--feedback nothing=state: the model has no output 'nothing' (outputs: y, next_state)"),
    ("next_state=h0", "--feedback next_state=h0: the model has no input 'h0' (inputs: x, state, sr)"),
    ("y=state", "--feedback y=state: output 'y' has shape (1, 4), input 'state' takes (2, ?, 8)"),
    ("next_state", "--feedback takes OUTPUT=INPUT pairs, comma-separated (got 'next_state')"),
])
def test_bad_feedback_is_one_line_and_writes_nothing(streaming, tmp_path, feedback, message):
    model, folder = streaming
    out = tmp_path / "q.onnx"
    assert_user_error(ptq("quantize", model, "--data", folder, "--feedback", feedback, "-o", out), message)
    assert not out.exists() and not (tmp_path / "q.onnx.run").exists()


def test_a_state_of_the_wrong_shape_is_one_line(streaming, tmp_path):
    model, _ = streaming
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 16), np.float32), state=np.zeros((2, 8), np.float32), sr=RATE)
    assert_user_error(ptq("quantize", model, "--data", bad, "-o", tmp_path / "q.onnx"),
                      "bad.npz: input 'state' expects (no sample axis: fed as given) shape (2, ?, 8), data has (2, 8)")
    assert not (tmp_path / "q.onnx.run").exists()
    with pytest.raises(PtqError, match="--feedback needs the model"):
        next(iter_batches(bad, model_inputs(Graph(streaming_model())), DataConfig(feedback="next_state=state"),
                          limit=1))


def test_run_feeds_each_step_the_state_the_model_itself_returned(streaming, tmp_path):
    """`ptq run --feedback`: the outputs are those of the model stepped over each stream, the state of
    step t being its own next_state of step t - 1 (checked by stepping it here)."""
    model, folder = streaming
    saved = tmp_path / "outputs.npz"
    r = ptq("run", model, "--data", folder, "--feedback", "next_state=state", "--save-outputs", saved)
    assert r.returncode == 0, r.stderr
    got = np.load(saved)["y"]
    sess = session(onnx.load(str(model)))
    expected = []
    for i in range(4):
        data = np.load(folder / f"stream{i}.npz")
        state = data["state"]
        for t in range(len(data["x"])):
            y, state = sess.run(["y", "next_state"], {"x": data["x"][t:t + 1], "state": state, "sr": RATE})
            expected.append(y)
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-5, atol=1e-6)
    without = ptq("run", model, "--data", folder, "--save-outputs", tmp_path / "plain.npz")
    assert without.returncode == 0 and not np.allclose(np.load(tmp_path / "plain.npz")["y"], got)
