"""The accuracy-aware fallback: the search against brute force on drops with interactions, the plan
surgery (checked in ONNX Runtime), and the scores, user metrics included."""

import itertools
import math
import textwrap

import numpy as np
import pytest

from builders import conv_bn_relu_model
from ptqcli.allocate.fallback import (Move, brute_force, candidates, fewest_moves, meets,
                                      moved_to_float)
from ptqcli.allocate.scores import accuracy, cosine, user_metric
from ptqcli.calibrate.collect import collect
from ptqcli.calibrate.data import Batch
from ptqcli.calibrate.planner import build_plan
from ptqcli.calibrate.select import select
from ptqcli.config import QuantConfig
from ptqcli.errors import PtqError
from ptqcli.export.qdq import export_qdq
from ptqcli.plan import MOVED_TO_FLOAT
from ptqcli.prepare import prepare
from ptqcli.runtime import optimized_op_counts, session


def _interacting_drops(seed: int, n: int = 6):
    """A drop for every subset of n candidates: each recovers some drop alone, pairs interact (a
    max-pool and its input only help together), and a little noise breaks monotonicity."""
    rng = np.random.default_rng(seed)
    items = [Move("layer", f"l{i}") for i in range(n)]
    alone = rng.uniform(0, 3, n) * (rng.uniform(size=n) > 0.3)
    pairs = {frozenset(p): rng.uniform(0, 4) for p in itertools.combinations(range(n), 2) if rng.uniform() < 0.3}
    table = {}
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            recovered = alone[list(subset)].sum() + sum(v for p, v in pairs.items() if p <= set(subset))
            table[frozenset(items[i] for i in subset)] = max(0.0, 12.0 - recovered) + rng.uniform(0, 0.3)
    table[frozenset(items)] = 0.0
    return items, table


@pytest.mark.parametrize("seed", range(8))
def test_search_finds_the_brute_force_minimum(seed):
    items, table = _interacting_drops(seed)
    calls = []

    def drop_of(moves):
        calls.append(moves)
        return table[moves]

    for target in sorted(set(np.quantile(list(table.values()), [0.05, 0.2, 0.5]))):
        calls.clear()
        found = fewest_moves(items, drop_of, target)
        assert meets(found.drop_after, target) and found.drop_after == table[frozenset(found.moved)]
        assert found.proven_fewest
        assert len(found.moved) == brute_force(items, table.__getitem__, target)
        assert len(set(calls)) == len(calls) == found.evaluations  # each set measured once
        assert found.evaluations <= 2 + len(items) + math.ceil(math.log2(len(items))) + len(found.moved) + 64


def test_without_the_proof_the_result_still_meets_the_target_and_says_so():
    items, table = _interacting_drops(3)
    target = float(np.quantile(list(table.values()), 0.05))
    found = fewest_moves(items, table.__getitem__, target, proof_budget=0)
    assert meets(found.drop_after, target)
    assert len(found.moved) >= brute_force(items, table.__getitem__, target)
    assert found.proven_fewest == (len(found.moved) <= 2)  # sets of one are all measured anyway


def test_ranking_puts_back_what_the_target_does_not_need():
    """b recovers most alone, but a and c together recover everything: the greedy prefix b, a, c
    is pruned to a, c."""
    a, b, c = (Move("layer", n) for n in "abc")
    drops = {(): 10.0, (a,): 9.0, (b,): 5.0, (c,): 9.5, (a, b): 4.0, (b, c): 4.5, (a, c): 0.5, (a, b, c): 0.4}
    table = {frozenset(k): v for k, v in drops.items()}
    found = fewest_moves([a, b, c], table.__getitem__, 1.0)
    assert set(found.moved) == {a, c} and found.drop_after == 0.5 and found.proven_fewest
    assert found.harm == {a: 1.0, b: 5.0, c: 0.5}


def test_an_unreachable_target_names_the_best_drop():
    items, table = _interacting_drops(1)
    with pytest.raises(PtqError, match=r"--max-drop -1 cannot be met: the best reachable drop is 0 \(every layer in float"):
        fewest_moves(items, table.__getitem__, -1.0)


def test_a_target_that_already_holds_moves_nothing():
    items, table = _interacting_drops(2)
    found = fewest_moves(items, table.__getitem__, 100.0)
    assert found.moved == () and found.evaluations == 1


# ---- the plan with candidates moved to float, run in ORT -------------------------------------

def _tiny(weights: str):
    g = prepare(conv_bn_relu_model())
    cfg = QuantConfig(weights=weights, bias_correction=True)
    sel = select(g, cfg)
    x = np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    stats, _ = collect(g, sel.activations, [Batch({"input": x}, None)], cfg.bins)
    return g, build_plan(g, sel, stats, cfg, {"data": {}}), x


@pytest.fixture(scope="module")
def tiny():
    return _tiny("int3")


def _run(model, x):
    return session(model).run(None, {"input": x})[0]


def test_candidates_group_activations_that_share_a_scale(tiny):
    _, plan, _ = tiny
    moves = candidates(plan)
    assert [m.name for m in moves if m.kind == "layer"] == [layer.node for layer in plan.layers]
    # Flatten reuses the pooled tensor's scale: quantizing it alone would change nothing.
    assert Move("activation", "gap", ("flat",)) in moves
    assert sorted(t for m in moves for t in m.tensors) == sorted(plan.of_role("activation"))
    with pytest.raises(PtqError, match="--move takes layers and/or activations"):
        candidates(plan, ("weights",))


def test_a_moved_layer_goes_back_to_float_and_keeps_its_input_quantized(tiny):
    g, plan, x = tiny
    layer = plan.layers[1]
    moved = moved_to_float(plan, [Move("layer", layer.node)])
    assert layer.node not in [l.node for l in moved.layers] and moved.float_nodes[layer.node] == MOVED_TO_FLOAT
    assert layer.weight not in moved.tensors and layer.bias not in moved.tensors
    assert layer.activation in moved.tensors
    model = export_qdq(g, moved)
    inputs = {n.name: list(n.input) for n in model.graph.node}[layer.node]
    # The float input and the model's own float weight: between a DequantizeLinear and a
    # QuantizeLinear ORT would quantize the weight itself and run an integer kernel.
    assert inputs[:2] == [layer.activation, layer.weight]
    assert any(layer.activation in n.input and n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert not np.allclose(_run(model, x), _run(export_qdq(g, plan), x))


def test_layers_moved_to_float_run_in_float_in_ort():
    g, plan, _ = _tiny("int8")
    layers = [m for m in candidates(plan) if m.kind == "layer"]
    gemm_kernels = {"QLinearConv", "QGemm", "ConvInteger", "MatMulInteger", "QLinearMatMul"}
    assert gemm_kernels & set(optimized_op_counts(export_qdq(g, plan)))
    kernels = optimized_op_counts(export_qdq(g, moved_to_float(plan, layers)))
    assert not gemm_kernels & set(kernels), kernels
    assert kernels["Conv"] == 2


def test_a_moved_activation_leaves_its_readers_bias_in_float(tiny):
    g, plan, _ = tiny
    reader = plan.layers[1]
    group = next(m for m in candidates(plan, ("activations",)) if m.name == reader.activation)
    moved = moved_to_float(plan, [group])
    assert reader.activation not in moved.tensors and reader.weight in moved.tensors
    bias = moved.tensors.get(reader.bias)
    assert bias is None or (bias.role == "value" and bias.value is not None)  # corrected values survive


def test_everything_moved_is_the_float_model(tiny):
    g, plan, x = tiny
    everything = moved_to_float(plan, candidates(plan))
    assert not everything.tensors and not everything.layers
    np.testing.assert_allclose(_run(export_qdq(g, everything), x), _run(g.model, x), rtol=1e-5, atol=1e-5)


# ---- scores -------------------------------------------------------------------------------------

def test_accuracy_drop_is_in_points_and_cosine_drop_is_one_minus_cosine():
    labels = np.array([0, 1, 1, 0])
    f = {"out": np.array([[2.0, 0], [0, 2], [0, 2], [2, 0]])}
    q = {"out": np.array([[2.0, 0], [0, 2], [2, 0], [2, 0]])}
    assert accuracy(labels, "out").drop_against(f)(q) == pytest.approx(25.0)
    assert cosine(["out"]).drop_against(f)(f) == pytest.approx(0.0, abs=1e-12)
    assert cosine(["out"]).drop_against(f)(q) == pytest.approx(0.25)  # one sample of four at cosine 0


def _metric_file(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_user_metric_from_a_file_or_from_the_current_directory(tmp_path, monkeypatch):
    path = _metric_file(tmp_path, "fallback_metric_ok", """
        import numpy as np

        def score(float_outputs, quant_outputs):
            return -float(np.abs(float_outputs["out"] - quant_outputs["out"]).max())
    """)
    f, q = {"out": np.zeros((2, 3))}, {"out": np.full((2, 3), 0.5)}
    assert user_metric(f"{path}:score").drop_against(f)(q) == pytest.approx(0.5)
    monkeypatch.chdir(tmp_path)
    assert user_metric("fallback_metric_ok:score").drop_against(f)(q) == pytest.approx(0.5)


@pytest.mark.parametrize("body, spec, message", [
    ("", "no_such_module_for_ptq:score", "cannot import no_such_module_for_ptq: ModuleNotFoundError"),
    ("def score(f, q) return 1\n", "{path}:score", "cannot import"),
    ("x = 1\n", "{path}:score", "has no function score"),
    ("def score(f, q):\n    raise ValueError('no labels here')\n", "{path}:score",
     "raised ValueError: no labels here"),
    ("def score(f, q):\n    return 'good'\n", "{path}:score", "returned str, not a number"),
    ("def score(f, q):\n    return float('nan')\n", "{path}:score", "returned nan; it must be finite"),
    ("def score(f, q):\n    f['out'][0] = 1\n    return 0.0\n", "{path}:score", "raised ValueError"),
    ("", "score", "takes module:function"),
])
def test_user_metric_errors_are_one_line(tmp_path, body, spec, message):
    path = _metric_file(tmp_path, "fallback_metric_bad", body)
    with pytest.raises(PtqError, match=message.replace("(", r"\(")) as info:
        user_metric(spec.format(path=path)).drop_against({"out": np.zeros((2, 3))})
    assert "\n" not in str(info.value)
