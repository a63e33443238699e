"""`ptq allocate` on a weight-only language model: block sizes among the candidates, bits per weight
that count the blocks' scales and zero points, damage from Gram matrices scaled by measured runs,
and GPTQ redone only where a format changed."""

import json

import numpy as np
import onnx
import pytest

from cli_runner import run_in_process as ptq
from ptqcli import rundir
from ptqcli.allocate.costs import block_stored_bits
from ptqcli.allocate.sensitivity import Candidate, measure_damage
from ptqcli.calibrate.data import iter_batches, model_inputs
from ptqcli.config import QuantConfig
from transformer_builders import tiny_language_model, token_data

CANDIDATES = "int4g16,int4g32,int2g16,int8"


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm_allocate")
    model = tmp / "lm.onnx"
    onnx.save(tiny_language_model(), str(model))
    np.savez(tmp / "calib.npz", **token_data(32, seed=1))
    np.savez(tmp / "eval.npz", **token_data(32, seed=2))
    run = tmp / "run"
    r = ptq("calibrate", model, "--data", tmp / "calib.npz", "--acts", "none", "--weights", "int4", "--block-size", "16",
            "--weight-zero-points", "--rounding", "gptq", "-o", run)
    assert r.returncode == 0, r.stderr
    return tmp, run


def test_overhead_is_what_matmul_nbits_stores_per_weight():
    node = onnx.helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")
    zeros = QuantConfig(weights="int4", acts="none", block_size=32, weight_symmetric=False)
    assert block_stored_bits(node, [64, 8], "int4", zeros) == pytest.approx(4 + (32 + 4) / 32)
    assert block_stored_bits(node, [64, 8], "int2g16", zeros) == pytest.approx(2 + (32 + 2) / 16)
    # no 3-bit type in MatMulNBits or DequantizeLinear: int3 codes and zero points sit in 4 bits
    assert block_stored_bits(node, [64, 8], "int3g16", zeros) == pytest.approx(4 + (32 + 4) / 16)
    floats = QuantConfig(weights="int4", acts="none", block_size=32, weight_symmetric=False, float_zero_points=True)
    assert block_stored_bits(node, [256, 8], "int4g128", floats) == pytest.approx(4 + 64 / 128)
    assert block_stored_bits(node, [256, 8], "int8g128", floats) == pytest.approx(8 + 40 / 128)  # int zeros at 8 bits
    symmetric = QuantConfig(weights="int4", acts="none", block_size=64)
    assert block_stored_bits(node, [64, 8], "int4", symmetric) == pytest.approx(4 + 32 / 64)
    assert block_stored_bits(node, [64, 8], "int4", QuantConfig(weights="int4")) is None


def test_weight_only_allocation_mixes_block_sizes_within_the_budget(gptq_run):
    tmp, run = gptq_run
    base = json.loads((run / "rounding.json").read_text())
    assert {row["node"] for row in base["layers"]} == {"up_proj", "down_proj", "lm_head"}
    r = ptq("allocate", run, "--budget-bits", "5.6", "--weight-candidates", CANDIDATES, "--samples", "8")
    assert r.returncode == 0, r.stderr
    allocation = json.loads((run / "allocation.json").read_text())
    params = {row["node"]: row["params"] for row in allocation["layers"]}
    chosen = {row["node"]: row["option"].split("/")[0] for row in allocation["layers"]}
    quant = QuantConfig(weights="int4", acts="none", block_size=16, weight_symmetric=False)
    node = onnx.helper.make_node("MatMul", ["a", "w"], ["y"])
    spent = sum(params[n] * block_stored_bits(node, [64, 8], fmt, quant) for n, fmt in chosen.items())
    assert spent == pytest.approx(allocation["cost"]) and spent <= 5.6 * sum(params.values())
    assert len(set(chosen.values())) > 1  # the budget sits between the uniform choices
    # Only the layers whose grid changed were rounded again, by GPTQ, from the float weights.
    redone = json.loads((run / "rounding.allocate.json").read_text())
    assert redone["method"] == "gptq"
    assert {row["node"] for row in redone["layers"]} == {n for n, fmt in chosen.items() if fmt not in ("int4", "int4g16")}
    out = tmp / "mix.onnx"
    r = ptq("export", run, "-o", out, "--eval-data", tmp / "eval.npz", "--no-latency")
    assert r.returncode == 0, r.stderr
    blocks = {n.name.removesuffix("_MatMulNBits"): {a.name: a.i for a in n.attribute}
              for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"}
    for name, fmt in chosen.items():
        bits, _, block = fmt[3:].partition("g")
        assert blocks[name]["bits"] == int(bits) and blocks[name]["block_size"] == int(block or 16)


def test_gram_scaled_damage_is_measured_at_each_layers_middle_candidate(gptq_run):
    """The candidate with the median output error of each layer carries the damage a whole-model
    run measures; the others' damage is ordered as their Gram errors."""
    _, run = gptq_run
    assert ptq("allocate", run, "--budget-bits", "6", "--weight-candidates", CANDIDATES, "--samples", "8").returncode == 0
    doc = json.loads((run / "sensitivity.json").read_text())
    assert doc["key"]["measure"] == "gram-scaled"
    ctx = rundir.load_run(run, rundir.BASE_PLAN)
    batches = list(iter_batches(ctx.data.path, model_inputs(ctx.graph), ctx.data, limit=8, model=ctx.graph.model))
    for node, row in doc["damage"].items():
        middle = sorted(row, key=row.get)[len(row) // 2]
        direct = measure_damage(ctx.graph, ctx.plan, ctx.stats, ctx.quant, batches,
                                {l.node: [Candidate.parse(middle)] for l in ctx.plan.layers})[node][middle]
        assert row[middle] == pytest.approx(direct, rel=1e-6)
        assert row["int8/A8"] < row["int4g16/A8"] < row["int2g16/A8"]


def test_a_block_size_that_is_not_a_power_of_two_is_one_line(gptq_run):
    _, run = gptq_run
    r = ptq("allocate", run, "--budget-bits", "5", "--weight-candidates", "int4g24,int4")
    assert r.returncode == 1 and "power of two" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_weight_only_convolutions_are_measured_for_every_candidate(tmp_path):
    """A weight-only CNN: its Gemm layers go by their Gram matrices, its Conv layers (4-D weights,
    no Gram of their patches) by a whole-model run per candidate; every layer gets every candidate."""
    from conftest import ASSETS

    run = tmp_path / "run"
    r = ptq("calibrate", ASSETS / "fashion_cnn.onnx", "--data", ASSETS / "fashion_calib.npz", "--num-samples", "64",
            "--acts", "none", "--weights", "int4", "-o", run)
    assert r.returncode == 0, r.stderr
    r = ptq("allocate", run, "--budget-bits", "6", "--weight-candidates", "8,4,2", "--samples", "16")
    assert r.returncode == 0, r.stderr
    damage = json.loads((run / "sensitivity.json").read_text())["damage"]
    assert set(damage) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert all(set(row) == {"int8/A8", "int4/A8", "int2/A8"} for row in damage.values())
    assert all(row["int8/A8"] < row["int4/A8"] < row["int2/A8"] for row in damage.values())
