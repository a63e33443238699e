"""Quantization cards (schema, rendering, replay) and `ptq gate` on the embedded model."""

import copy
import json

import pytest
from PIL import Image

from conftest import ASSETS
from ptqcli.errors import PtqError
from ptqcli.export.card import card_paths, read_card, validate_card
from ptqcli.export.gate import GateLimits, diff_cards, run_gate
from test_cli import assert_user_error, ptq

MODEL, CALIB, TEST = ASSETS / "fashion_cnn.onnx", ASSETS / "fashion_calib.npz", ASSETS / "fashion_test.npz"


def _quantize(tmp_path, name, *options):
    out = tmp_path / f"{name}.onnx"
    r = ptq("quantize", MODEL, "--data", CALIB, "--eval-data", TEST, "--eval-samples", 1000, "-o", out, *options)
    assert r.returncode == 0, r.stderr
    return out, card_paths(out)["json"]


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("w8a8"), "w8a8")


@pytest.fixture(scope="module")
def w2(tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("w2"), "w2", "--weights", "int2")


def test_card_files_are_written_and_valid(w8a8):
    out, card_json = w8a8
    paths = card_paths(out)
    card = read_card(card_json)
    assert card["model"]["output"]["bytes"] == out.stat().st_size
    assert card["tradeoffs"]["batchnorm_folded"] == 3
    assert [row["node"] for row in card["layers"]] == ["conv2", "conv3", "fc1", "fc2"]  # the stem Conv stays float
    assert all(row["bits"] == 8 and row["output_sqnr_db"] > 10 for row in card["layers"])
    assert card["calibration"] == {"kind": "real", "source": str(CALIB), "samples": 256, "method": "minmax"}
    assert card["results"]["evaluation"]["samples"] == 1000
    assert 3.5 < card["results"]["size"]["compression"] < 4.0  # int8 weights, float32 everything else
    assert card["results"]["latency"]["quantized_ms"] > 0
    md = paths["md"].read_text()
    assert "top-1 accuracy" in md and "| conv2 | Conv |" in md and paths["png"].name in md


def test_plot_renders(w8a8):
    png = card_paths(w8a8[0])["png"]
    with Image.open(png) as img:
        assert img.size[0] >= 640 and img.size[1] >= 300
        colours = img.convert("RGB").getcolors(maxcolors=100_000)
    assert png.stat().st_size > 3000 and len(colours) > 5  # not a blank canvas


def test_schema_rejects_missing_fields_and_wrong_types(w8a8):
    card = json.loads(w8a8[1].read_text())
    missing = copy.deepcopy(card)
    del missing["results"]["latency"]
    with pytest.raises(PtqError, match="at results: 'latency' is a required property"):
        validate_card(missing)
    wrong = copy.deepcopy(card)
    wrong["layers"][1]["bits"] = "eight"
    with pytest.raises(PtqError, match="at layers/1/bits: 'eight' is not of type 'integer'"):
        validate_card(wrong)


def test_cli_refuses_an_invalid_card(tmp_path, w8a8):
    card = json.loads(w8a8[1].read_text())
    card["card_version"] = 7
    bad = tmp_path / "bad.card.json"
    bad.write_text(json.dumps(card))
    assert_user_error(ptq("gate", bad, "--max-drop", 1), "at card_version")


def test_recipe_in_the_card_reproduces_the_model_byte_for_byte(tmp_path, w8a8):
    out, card_json = w8a8
    again = tmp_path / "again.onnx"
    r = ptq("quantize", MODEL, "--recipe", card_json, "--eval-samples", 10, "-o", again)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()


def test_gate_passes_w8a8_and_fails_two_bit_weights(w8a8, w2):
    ok = ptq("gate", w8a8[1], "--max-drop", 0.5, "--min-compression", 3.5)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "pass" in ok.stdout
    bad = ptq("gate", w2[1], "--max-drop", 0.5, "--min-compression", 3.5)
    assert_user_error(bad, "gate failed", "max-drop")
    assert "FAIL" in bad.stdout


def test_gate_detects_regression_against_a_baseline(tmp_path, w8a8, w2):
    r = ptq("gate", w2[1], "--baseline", w8a8[1], "--max-regression", 0.2)
    assert_user_error(r, "max-regression vs baseline")
    assert ptq("gate", w8a8[1], "--baseline", w8a8[1]).returncode == 0


def test_gate_limits_from_a_toml_file(tmp_path, w8a8):
    limits = tmp_path / "gate.toml"
    limits.write_text("[gate]\nmax-drop = 0.5\nmin-agreement = 99.99\n")
    assert_user_error(ptq("gate", w8a8[1], "--limits", limits), "min-agreement")
    # The command line overrides the file.
    assert ptq("gate", w8a8[1], "--limits", limits, "--min-agreement", 90).returncode == 0


def test_gate_needs_some_limit(w8a8):
    assert_user_error(ptq("gate", w8a8[1]), "no gate limits given")


def test_gate_limits_at_their_boundaries(w8a8):
    card = read_card(w8a8[1])
    card["results"]["accuracy"]["drop_points"] = 0.5
    card["results"]["size"]["compression"] = 3.5
    at_limit = run_gate(card, GateLimits(max_drop=0.5, min_compression=3.5))
    assert all(c.passed for c in at_limit)
    card["results"]["accuracy"]["drop_points"] = 0.51
    card["results"]["size"]["compression"] = 3.49
    beyond = run_gate(card, GateLimits(max_drop=0.5, min_compression=3.5))
    assert not any(c.passed for c in beyond)


def test_card_diff_names_what_changed(w8a8, w2):
    rows = {key: (a, b) for key, a, b in diff_cards(read_card(w8a8[1]), read_card(w2[1]))}
    assert rows["recipe/quant/weights"] == ("int8", "int2")
    assert rows["layers/conv2/bits"] == (8, 2)
    r = ptq("card", "diff", w8a8[1], w2[1])
    assert r.returncode == 0 and "recipe/quant/weights" in r.stdout


def test_gate_min_speedup(tmp_path, w8a8):
    card = read_card(w8a8[1])
    card["results"]["latency"].update(float_ms=3.0, quantized_ms=2.0, speedup=1.5)
    assert [c.passed for c in run_gate(card, GateLimits(min_speedup=1.5))] == [True]
    (check,) = run_gate(card, GateLimits(min_speedup=1.51))
    assert not check.passed and check.actual == "1.50x" and check.limit == ">= 1.51x"
    card["results"]["latency"].update(float_ms=None, quantized_ms=None, speedup=None)  # --no-latency
    (check,) = run_gate(card, GateLimits(min_speedup=0.5))
    assert not check.passed and check.actual == "not measured"
    # from the command line, against the speed-up the card measured
    measured = read_card(w8a8[1])["results"]["latency"]["speedup"]
    assert ptq("gate", w8a8[1], "--min-speedup", round(measured / 2, 3)).returncode == 0
    assert_user_error(ptq("gate", w8a8[1], "--min-speedup", round(measured * 2 + 1, 3)), "gate failed", "min-speedup")
    limits = tmp_path / "gate.toml"
    limits.write_text(f"[gate]\nmin-speedup = {measured * 2 + 1}\n")
    assert_user_error(ptq("gate", w8a8[1], "--limits", limits), "min-speedup")
