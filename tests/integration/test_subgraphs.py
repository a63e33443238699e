"""Control flow: an If whose branches hold MatMuls (one on a weight of its own, one on a weight the
main graph also quantizes). The main graph quantizes, the branches stay float and are listed, and
the exported model is valid and runs whichever branch is taken."""

import json

import numpy as np
import onnx
import pytest

from builders import branching_model
from ptqcli.runtime import session
from test_cli import ptq


@pytest.mark.parametrize("acts", ["uint8", "dynamic"])
def test_layers_inside_an_if_stay_float_and_are_listed(tmp_path, acts):
    model, data, out = tmp_path / "branching.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(branching_model(), str(model))
    rng = np.random.default_rng(1)
    np.save(data, rng.normal(0, 1, (64, 16)).astype(np.float32))
    r = ptq("quantize", model, "--data", data, "--acts", acts, "-o", out)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "q.card.json").read_text())
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    assert {layer["node"] for layer in plan["layers"]} == {"mm0", "mm_out", "mm_side"}
    inside = {k: v for k, v in plan["float_nodes"].items() if "/" in k}
    assert set(inside) == {"branch/then/then_mm", "branch/else/else_mm"}
    assert all("inside If 'branch'" in why for why in inside.values())
    assert set(inside) <= set(card["tradeoffs"]["float_nodes"])  # the card lists them too
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    f, q = session(onnx.load(str(model))), session(quantized)
    for sign in (1, -1):  # both branches
        x = np.abs(rng.normal(0, 1, (8, 16))).astype(np.float32) * sign
        for a, b in zip(f.run(None, {"x": x}), q.run(None, {"x": x})):
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
