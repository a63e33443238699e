"""If branches quantized as models of their own: the branch the calibration data takes gets a QDQ
graph inside the If, the other stays float and the run says why; the model stays valid, and ORT
loads it (a DequantizeLinear feeding the If through a Transpose made ORT 1.32 abort)."""

import json
import subprocess
import sys

import numpy as np
import onnx

from builders import flagged_conv_model
from ptqcli.runtime import session


def _quantize(tmp_path, flag: bool):
    model, data, out = tmp_path / "branching.onnx", tmp_path / "calib", tmp_path / "q.onnx"
    onnx.save(flagged_conv_model(), str(model))
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        np.savez(data / f"s{i}.npz", x=rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32), flag=np.array(flag))
    # A process of its own: were ORT to abort on the model, the test fails instead of the test run.
    r = subprocess.run([sys.executable, "-m", "ptqcli.cli", "quantize", str(model), "--data", str(data), "-o",
                        str(out), "--no-latency", "--whole-feeds"], capture_output=True, text=True)
    return model, out, r


def _dq_nodes(graph) -> int:
    return sum(n.op_type == "DequantizeLinear" for n in graph.node)


def test_the_branch_calibration_takes_is_quantized_inside_the_if(tmp_path):
    model, out, r = _quantize(tmp_path, flag=True)
    assert r.returncode == 0, r.stderr
    outcome = json.loads((tmp_path / "q.onnx.run" / "branches.json").read_text())
    assert outcome == {"branch.then_branch": "quantized: 2 layers",
                       "branch.else_branch": "float: no calibration sample takes it"}
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    node = next(n for n in q.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in node.attribute}
    assert _dq_nodes(branches["then_branch"]) >= 3 and _dq_nodes(branches["else_branch"]) == 0
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    f, qs = session(onnx.load(str(model))), session(q)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        a, b = f.run(None, feeds)[0].ravel(), qs.run(None, feeds)[0].ravel()
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99, flag


def test_a_branch_no_sample_takes_stays_float_and_the_model_still_runs(tmp_path):
    model, out, r = _quantize(tmp_path, flag=False)
    assert r.returncode == 0, r.stderr
    outcome = json.loads((tmp_path / "q.onnx.run" / "branches.json").read_text())
    assert outcome["branch.then_branch"] == "float: no calibration sample takes it"
    assert outcome["branch.else_branch"] == "quantized: 1 layers"
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    assert any(k.startswith("branch/then_graph/") for k in plan["float_nodes"])  # listed as float
    assert any("then_branch of If 'branch' stays float: no calibration sample takes it" in n for n in plan["notes"])
    session(onnx.load(str(out))).run(None, {"x": np.zeros((1, 3, 8, 8), np.float32), "flag": np.array(True)})
