"""`ptq allocate --max-drop`: the fewest layers moved back to float, checked against brute force on
the embedded CNN (accuracy on its labels) and on an encoder block (output cosine), then re-measured
by `ptq export`; user metrics; one-line errors that leave the run as it was."""

import itertools
import json
import shutil
import textwrap

import numpy as np
import onnx
import pytest

from builders import encoder_model
from conftest import ASSETS
from ptqcli import stages
from ptqcli.allocate.fallback import Move, moved_to_float
from ptqcli.allocate.target import deployed
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.metrics import sample_cosines, top1
from ptqcli.plan import MOVED_TO_FLOAT
from ptqcli.rundir import BASE_PLAN, load_run
from ptqcli.runtime import session
from test_cli import assert_user_error, ptq

TEST = ASSETS / "fashion_test.npz"


@pytest.fixture(scope="module")
def calibrated_int3(tmp_path_factory):
    """The embedded CNN at W3A8, nearest rounding without bias correction: about 12 points below float."""
    run = tmp_path_factory.mktemp("fallback") / "run"
    stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(weights="int3", rounding="nearest", bias_correction=False),
                     DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
    return run


@pytest.fixture
def run(calibrated_int3, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(calibrated_int3, copy)
    return copy


def _fallback(run) -> dict:
    return json.loads((run / "fallback.json").read_text())


def _fewest_by_brute_force(run, drop_of) -> dict[int, float]:
    """The least drop at each number of layers moved, over every subset of the base plan's layers."""
    loaded = load_run(run, BASE_PLAN)
    layers = [Move("layer", layer.node) for layer in loaded.plan.layers]
    least = {}
    for size in range(len(layers) + 1):
        for subset in itertools.combinations(layers, size):
            model = deployed(loaded, moved_to_float(loaded.plan, subset))
            least[size] = min(least.get(size, np.inf), drop_of(session(model)))
    return least


def _smallest_meeting(least: dict[int, float], target: float) -> int:
    return min(size for size, drop in least.items() if drop <= target + 1e-9)


def _snapshot(run) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.iterdir())}


@pytest.mark.slow
def test_cnn_target_met_with_the_brute_force_fewest_layers_and_export_agrees(run, tmp_path):
    samples, target = 500, 2.0
    r = ptq("allocate", run, "--max-drop", target, "--move", "layers", "--eval-data", TEST,
            "--eval-samples", samples)
    assert r.returncode == 0, r.stderr
    found = _fallback(run)
    moved = [m["name"] for m in found["moved"]]
    assert found["drop_before"] > target + 2 and found["drop_after"] <= target and found["proven_fewest"]
    assert "moved to float to meet --max-drop 2" in r.stdout and moved[0] in r.stdout

    data = np.load(TEST)
    x, labels = data["input"][:samples], data["labels"][:samples]
    float_accuracy = np.mean(top1(session(load_run(run).graph.model).run(None, {"input": x})[0]) == labels)
    least = _fewest_by_brute_force(
        run, lambda sess: 100 * (float_accuracy - np.mean(top1(sess.run(None, {"input": x})[0]) == labels)))
    assert len(moved) == _smallest_meeting(least, target) >= 2

    # `ptq export` builds the written plan and measures the same drop on the same samples.
    out = tmp_path / "fallback.onnx"
    assert ptq("export", run, "-o", out, "--eval-data", TEST, "--eval-samples", samples).returncode == 0
    card = json.loads((tmp_path / "fallback.card.json").read_text())
    assert card["results"]["accuracy"]["drop_points"] == pytest.approx(found["drop_after"], abs=1e-6)
    assert {node: why for node, why in card["tradeoffs"]["float_nodes"].items() if node in moved} == {
        node: MOVED_TO_FLOAT for node in moved}
    assert [row["node"] for row in card["layers"] if row["node"] in moved] == []
    plan = json.loads((run / "plan.json").read_text())
    assert plan["config"]["fallback"]["moved"] == found["moved"]


@pytest.mark.slow
def test_encoder_cosine_target_met_with_the_brute_force_fewest_layers(tmp_path):
    model, calib, held_out = tmp_path / "encoder.onnx", tmp_path / "calib.npy", tmp_path / "eval.npy"
    onnx.save(encoder_model(), str(model))
    rng = np.random.default_rng(0)
    np.save(calib, rng.normal(0, 1, (64, 16, 32)).astype(np.float32))
    np.save(held_out, x := rng.normal(0, 1, (64, 16, 32)).astype(np.float32))
    run, target = tmp_path / "run", 3e-4
    assert ptq("calibrate", model, "--data", calib, "--weights", "int3", "-o", run).returncode == 0
    r = ptq("allocate", run, "--max-drop", target, "--move", "layers", "--eval-data", held_out)
    assert r.returncode == 0, r.stderr
    found = _fallback(run)
    assert found["measure"].startswith("1 - mean cosine to float (output y)")
    assert found["drop_after"] <= target < found["drop_before"] and found["proven_fewest"]

    reference = session(load_run(run).graph.model).run(None, {"x": x})[0]
    least = _fewest_by_brute_force(
        run, lambda sess: 1 - float(np.mean(sample_cosines(reference, sess.run(None, {"x": x})[0]))))
    assert len(found["moved"]) == _smallest_meeting(least, target) >= 2


def _metric(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_user_metric_by_file_path_and_by_module_name(run, tmp_path):
    """Agreement with float on the top class, in percent: a measure without labels."""
    path = _metric(tmp_path, "agreement_metric_for_fallback", """
        import numpy as np

        def agreement(float_outputs, quant_outputs):
            f, q = float_outputs["logits"], quant_outputs["logits"]
            return 100.0 * float(np.mean(f.argmax(1) == q.argmax(1)))
    """)
    r = ptq("allocate", run, "--max-drop", 3, "--metric", f"{path}:agreement", "--move", "layers",
            "--eval-data", TEST, "--eval-samples", 200, "--proof-evals", 0)
    assert r.returncode == 0, r.stderr
    found = _fallback(run)
    assert found["measure"].startswith(f"--metric {path}:agreement") and found["moved"]
    assert found["drop_after"] <= 3 < found["drop_before"]
    assert found["evaluations"] <= 2 + 5 + 3 + len(found["moved"])  # ranking, bisection and pruning only

    # Re-measured independently on the written plan: 100 - agreement with float.
    loaded, x = load_run(run), np.load(TEST)["input"][:200]
    f = session(loaded.graph.model).run(None, {"input": x})[0]
    q = session(deployed(loaded, loaded.plan)).run(None, {"input": x})[0]
    assert 100 - 100 * np.mean(f.argmax(1) == q.argmax(1)) == pytest.approx(found["drop_after"])

    # The same module by name, from the current directory; a redo starts from the base plan.
    r = ptq("allocate", run, "--max-drop", 100, "--metric", "agreement_metric_for_fallback:agreement",
            "--eval-data", TEST, "--eval-samples", 200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _fallback(run)["moved"] == [] and "nothing moved" in r.stdout
    assert json.loads((run / "plan.json").read_text())["layers"] == json.loads(
        (run / "plan.base.json").read_text())["layers"]


@pytest.mark.parametrize("body, spec, message", [
    (None, "no_such_metric_module:score", "--metric no_such_metric_module:score: cannot import "
                                          "no_such_metric_module: ModuleNotFoundError"),
    ("import numpy as np\nnp.no_such_function()\n", "{path}:score", "cannot import"),
    ("def score(f, q):\n    return f['no such output'].mean()\n", "{path}:score", "raised KeyError"),
])
def test_a_metric_that_fails_is_one_line_and_writes_nothing(run, tmp_path, body, spec, message):
    path = _metric(tmp_path, "failing_metric", body) if body is not None else None
    before = _snapshot(run)
    r = ptq("allocate", run, "--max-drop", 1, "--metric", spec.format(path=path), "--eval-data", TEST,
            "--eval-samples", 50)
    assert_user_error(r, message)
    assert _snapshot(run) == before


def test_an_unreachable_target_names_the_best_drop_and_writes_nothing(run):
    before = _snapshot(run)
    r = ptq("allocate", run, "--max-drop", -50, "--move", "layers", "--eval-data", TEST, "--eval-samples", 200)
    assert_user_error(r, "--max-drop -50 cannot be met: the best reachable drop is", "points (every layer in float")
    assert _snapshot(run) == before


def test_max_drop_options_are_checked(run):
    assert_user_error(ptq("allocate", run, "--max-drop", 1, "--budget-bits", 4), "give --max-drop alone")
    assert_user_error(ptq("allocate", run, "--budget-bits", 4, "--metric", "m:f"), "go with --max-drop")
    assert_user_error(ptq("allocate", run, "--max-drop", 1, "--move", "weights", "--eval-data", TEST),
                      "--move takes layers and/or activations")


def test_moving_to_int16_meets_the_target_with_16_bit_tensors_that_ort_runs(run):
    """`--to int16`: the moved layers' weights and the moved activations go to symmetric int16 grids
    (opset 21), not to float; the model ORT runs holds int16 codes for exactly those."""
    r = ptq("allocate", run, "--max-drop", 1, "--to", "int16", "--eval-data", TEST, "--eval-samples", 200)
    assert r.returncode == 0, r.stderr
    assert "moved to int16" in r.stdout
    found = _fallback(run)
    assert found["to"] == "int16" and found["moved"] and found["drop_after"] <= 1 < found["drop_before"]
    loaded = load_run(run)
    model = deployed(loaded, loaded.plan)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int16_codes = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT16}
    int16_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"} & int16_codes
    moved_layers = [m["name"] for m in found["moved"] if m["kind"] == "layer"]
    moved_acts = [m["name"] for m in found["moved"] if m["kind"] == "activation"]
    assert len(int16_codes) >= len(moved_layers) + len(moved_acts) and len(int16_points) >= len(moved_acts)
    for name in moved_layers:  # still quantized (not in the float-node list), at 16 bits
        assert name not in loaded.plan.float_nodes
        assert loaded.plan.tensors[next(layer.weight for layer in loaded.plan.layers if layer.node == name)].spec.bits == 16
    # The drop the search recorded is the deployed model's: re-measured here.
    x, labels = np.load(TEST)["input"][:200], np.load(TEST)["labels"][:200]
    f = session(loaded.graph.model).run(None, {"input": x})[0]
    q = session(model).run(None, {"input": x})[0]
    accuracy = [100 * np.mean(top1(y) == labels) for y in (f, q)]
    assert accuracy[0] - accuracy[1] == pytest.approx(found["drop_after"], abs=1e-6)


def test_an_unknown_destination_is_one_line(run):
    assert_user_error(ptq("allocate", run, "--max-drop", 1, "--to", "int4", "--eval-data", TEST),
                      "--to takes float or int16 (got int4)")
    assert_user_error(ptq("allocate", run, "--budget-bits", 4, "--to", "int16"), "go with --max-drop")
