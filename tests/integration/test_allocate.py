"""`ptq allocate` on the embedded model: mixed precision chosen by the ILP, measured after export."""

import csv
import json
import shutil

import pytest

from conftest import ASSETS
from ptqcli import stages
from ptqcli.allocate.pareto import best_at, sweep
from ptqcli.allocate.stage import AllocationConfig, load_context
from ptqcli.config import DataConfig, QuantConfig
from test_cli import assert_user_error, ptq

TEST = ASSETS / "fashion_test.npz"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    run = tmp_path_factory.mktemp("alloc") / "run"
    stages.calibrate(ASSETS / "fashion_cnn.onnx", QuantConfig(),
                     DataConfig(path=str(ASSETS / "fashion_calib.npz"), num_samples=256), run)
    return run


@pytest.fixture
def run(calibrated, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(calibrated, copy)
    return copy


def test_budget_bits_with_pinned_first_and_last(run, tmp_path):
    r = ptq("allocate", run, "--budget-bits", 4, "--keep", "first,last")
    assert r.returncode == 0, r.stderr
    assert "optimal" in r.stdout
    allocation = json.loads((run / "allocation.json").read_text())
    bits = {row["node"]: int(row["option"].split("/")[0][3:]) for row in allocation["layers"]}
    first = allocation["layers"][0]["node"]
    assert first == "conv2" and bits[first] == 8 and bits["fc2"] == 8  # conv1, the stem, stays float
    params = {row["node"]: row["params"] for row in allocation["layers"]}
    assert sum(bits[n] * params[n] for n in bits) <= 4 * sum(params.values())
    assert len(set(bits.values())) > 1  # a real mix
    out = tmp_path / "mix.onnx"
    assert ptq("export", run, "-o", out, "--eval-data", TEST, "--eval-samples", 200).returncode == 0
    card = json.loads((tmp_path / "mix.card.json").read_text())
    assert {row["node"]: row["bits"] for row in card["layers"]} == bits


def test_size_budget_and_reallocation_start_from_the_base_plan(run):
    assert ptq("allocate", run, "--budget", "20kB").returncode == 0
    first = json.loads((run / "allocation.json").read_text())
    assert first["cost"] <= 20_000
    assert ptq("allocate", run, "--budget", "40kB").returncode == 0
    second = json.loads((run / "allocation.json").read_text())
    assert all(row["option"] == "int8/A8" for row in second["layers"])  # everything fits at 8 bits


def test_infeasible_budget_names_the_smallest_feasible(run):
    r = ptq("allocate", run, "--budget", "1kB")
    assert_user_error(r, "budget 1,000 bytes is infeasible: the smallest possible is")


def test_exactly_one_budget(run):
    assert_user_error(ptq("allocate", run), "give exactly one of")
    assert_user_error(ptq("allocate", run, "--keep", "nosuchlayer", "--budget-bits", 4), "nosuchlayer")


@pytest.mark.slow
def test_ilp_beats_uniform_w4_and_greedy_at_the_w4_size(run):
    """Measured after export on the labelled test slice, not on the proxy."""
    points = sweep(load_context(run), AllocationConfig(), str(TEST), 2000, points=4)
    w4 = next(p for p in points if p.method == "uniform" and p.label == "int4")
    ilp, greedy = best_at(points, w4.size_bytes, "ilp"), best_at(points, w4.size_bytes, "greedy")
    assert ilp.quality > w4.quality + 1.0
    assert ilp.quality >= greedy.quality


@pytest.mark.slow
def test_pareto_writes_csv_and_png(run):
    r = ptq("allocate", run, "--pareto", "--eval-data", TEST, "--eval-samples", 300, "--weight-candidates", "8,4")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((run / "pareto.csv").open()))
    assert {row["method"] for row in rows} == {"ilp", "greedy", "uniform"}
    assert (run / "pareto.png").stat().st_size > 3000


def test_level_set_formats_join_the_candidates(run):
    r = ptq("allocate", run, "--budget-bits", 4, "--weight-candidates", "int8,int4,pow2:4,exp:3,ternary")
    assert r.returncode == 0, r.stderr
    damage = json.loads((run / "sensitivity.json").read_text())["damage"]
    assert set(damage["conv2"]) == {"int8/A8", "int4/A8", "pow2:4/A8", "exp:3/A8", "ternary/A8"}
    assert damage["conv2"]["int8/A8"] < damage["conv2"]["ternary/A8"]


def test_damage_measured_from_each_layers_input_equals_whole_model_runs(tmp_path):
    """Sensitivity walks the model once and runs only what follows each layer: on an encoder with
    residual branches (activation candidates gated too), every row equals the obvious measurement,
    the whole probe model run per layer and candidate."""
    import numpy as np
    import onnx

    from builders import encoder_model
    from ptqcli.allocate.sensitivity import candidates, fake_quant_weight, measure_damage, output_damage
    from ptqcli.calibrate.data import iter_batches, model_inputs
    from ptqcli.calibrate.probe import act_gate, gate_feeds, probe_model
    from ptqcli.runtime import session

    model = tmp_path / "encoder.onnx"
    onnx.save(encoder_model(), str(model))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).normal(size=(12, 16, 32)).astype(np.float32))
    stages.calibrate(model, QuantConfig(), DataConfig(path=str(data), num_samples=12, batch_size=4), tmp_path / "run")
    ctx = load_context(tmp_path / "run")
    batches = list(iter_batches(ctx.data.path, model_inputs(ctx.graph), ctx.data, limit=8, model=ctx.graph.model))
    options = candidates(["int8", "int4", "int2"], [8, 4])
    table = measure_damage(ctx.graph, ctx.plan, ctx.stats, ctx.quant, batches, options)

    g, plan = ctx.graph, ctx.plan
    gated = sorted({layer.activation for layer in plan.layers if layer.activation})
    sess = session(probe_model(g, plan, gated))
    output = g.output_names[0]
    base = {**{layer.weight: g.constant(layer.weight) for layer in plan.layers},
            **{k: v for t in gated for k, v in gate_feeds(t, False).items()}}
    refs = [sess.run([output], {**b.feeds, **base})[0] for b in batches]
    assert [layer.node for layer in plan.layers] == list(table) and len(table) >= 6
    for layer in plan.layers:
        for option in options:
            feeds = {**base, layer.weight: fake_quant_weight(g, layer.node, layer.weight, option.weights, ctx.quant)}
            if option.a_bits != 8:
                feeds.update(act_gate(layer.activation, option.a_bits, ctx.stats, ctx.quant))
            want = sum(output_damage(r, sess.run([output], {**b.feeds, **feeds})[0]) for b, r in zip(batches, refs)) / 8
            assert want > 0
            assert abs(table[layer.node][option.label] - want) <= 1e-4 * want, (layer.node, option.label)
