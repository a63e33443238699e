"""`ptq` on a text model: embedding fidelity in the table, fidelity.json and the card, bad token data
refused in one line with nothing written, and batch-1 latency in the card. The embedded image
classifier keeps its top-1 agreement."""

import json

import numpy as np
import onnx
import pytest

from builders import text_encoder_model
from conftest import ASSETS
from ptqcli.export.card import card_paths, read_card
from test_cli import assert_user_error, ptq
from transformer_builders import VOCAB, token_data


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The tiny text encoder, its data, and one `ptq quantize` of it (with latency, as by default)."""
    tmp = tmp_path_factory.mktemp("text")
    model = tmp / "text.onnx"
    onnx.save(text_encoder_model(), str(model))
    np.savez(tmp / "calib.npz", **token_data(64, seed=1))
    np.savez(tmp / "eval.npz", **token_data(48, seed=2))
    out = tmp / "text.q.onnx"
    result = ptq("quantize", model, "--data", tmp / "calib.npz", "--eval-data", tmp / "eval.npz", "-o", out)
    assert result.returncode == 0, result.stderr
    return tmp, model, out, result


def test_text_model_fidelity_is_embedding_cosine_not_top1(text):
    tmp, _, out, result = text
    outputs = json.loads((tmp / "text.q.onnx.run" / "fidelity.json").read_text())["outputs"]
    assert {name: o["kind"] for name, o in outputs.items()} == {"tokens": "embedding", "sentence": "embedding"}
    assert not any("top1_agreement" in o or "kl" in o for o in outputs.values())
    tokens, sentence = outputs["tokens"], outputs["sentence"]
    assert tokens["pooled_over"] == ["attention_mask"] and "pooled_cosine" not in sentence
    assert 0.99 < tokens["pooled_cosine_min"] <= tokens["pooled_cosine"] <= 1.0
    assert 0.99 < sentence["cosine_min"] <= sentence["cosine"] <= 1.0
    # The model's own mean-pooled output is the tokens pooled over the mask.
    assert sentence["cosine"] == pytest.approx(tokens["pooled_cosine"], abs=1e-5)
    assert "embedding" in result.stdout and "pooled" in result.stdout and "top-1" not in result.stdout
    assert "the tokens 'attention_mask' marks" in " ".join(result.stdout.split())
    card = read_card(card_paths(out)["json"])
    assert card["results"]["outputs"] == outputs
    md = card_paths(out)["md"].read_text()
    assert "- output `tokens` (embedding): cosine mean" in md and "pooled over the tokens 'attention_mask' marks" in md
    assert "top-1" not in md


def test_card_records_interleaved_batch1_latency(text):
    _, _, out, _ = text
    latency = read_card(card_paths(out)["json"])["results"]["latency"]
    assert latency["batch"] == 1 and latency["samples"] == 8 and latency["real_samples"] is True
    assert latency["float_ms"] > 0 and latency["quantized_ms"] > 0 and latency["runs"] >= 10
    assert latency["speedup"] == pytest.approx(latency["float_ms"] / latency["quantized_ms"])
    assert "speed-up" in card_paths(out)["md"].read_text()


def test_no_latency_leaves_it_unmeasured(text, tmp_path):
    tmp, _, _, _ = text
    out = tmp_path / "again.onnx"
    r = ptq("export", tmp / "text.q.onnx.run", "--eval-data", tmp / "eval.npz", "--no-latency", "-o", out)
    assert r.returncode == 0, r.stderr
    latency = read_card(card_paths(out)["json"])["results"]["latency"]
    assert latency["float_ms"] is None and latency["quantized_ms"] is None and latency["speedup"] is None
    assert "latency (batch 1, " in card_paths(out)["md"].read_text() and "not measured" in card_paths(out)["md"].read_text()


def _bad_data(tmp, kind):
    data = token_data(32, seed=3)
    ids = data["input_ids"]
    if kind == "float":
        ids = ids.astype(np.float32)
        fragments = ("input 'input_ids'", "expects int64", "data is float32")
    elif kind == "too-large":
        ids = ids.copy()
        ids[4, 1] = VOCAB + 7
        fragments = ("input 'input_ids'", f"token ids up to {VOCAB + 7}", f"vocabulary of {VOCAB}")
    else:
        ids = ids.copy()
        ids[2, 0] = -1
        fragments = ("input 'input_ids'", "negative token id -1", f"vocabulary of {VOCAB}")
    path = tmp / f"{kind}.npz"
    np.savez(path, input_ids=ids, attention_mask=data["attention_mask"])
    return path, fragments


KINDS = ("float", "too-large", "negative")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_calibration_tokens_are_refused_and_nothing_is_written(text, tmp_path, kind):
    _, model, _, _ = text
    data, fragments = _bad_data(tmp_path, kind)
    run = tmp_path / "run"
    assert_user_error(ptq("calibrate", model, "--data", data, "-o", run), data.name, *fragments)
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("kind", KINDS)
def test_bad_evaluation_tokens_are_refused_and_nothing_is_written(text, tmp_path, kind):
    tmp, model, _, _ = text
    data, fragments = _bad_data(tmp_path, kind)
    out = tmp_path / "q.onnx"
    assert_user_error(ptq("quantize", model, "--data", tmp / "calib.npz", "--eval-data", data, "-o", out),
                      data.name, *fragments)
    assert not out.exists() and not (tmp_path / "q.onnx.run").exists()
    fidelity = tmp / "text.q.onnx.run" / "fidelity.json"
    before = fidelity.read_bytes()
    assert_user_error(ptq("export", tmp / "text.q.onnx.run", "--eval-data", data, "-o", out), data.name, *fragments)
    assert fidelity.read_bytes() == before
    assert not out.exists() and not any(p.exists() for p in card_paths(out).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name]  # no temporary files either


def test_image_classifier_still_reports_top1_agreement(tmp_path):
    out = tmp_path / "cnn.onnx"
    r = ptq("quantize", ASSETS / "fashion_cnn.onnx", "--data", ASSETS / "fashion_calib.npz", "--num-samples", 64,
            "--eval-data", ASSETS / "fashion_test.npz", "--eval-samples", 200, "--no-latency", "-o", out)
    assert r.returncode == 0, r.stderr
    logits = read_card(card_paths(out)["json"])["results"]["outputs"]["logits"]
    assert logits["kind"] == "class_scores" and logits["top1_agreement"] > 0.9 and 0.9 < logits["cosine_min"] <= 1
    assert "top-1 agreement" in r.stdout and "class scores" in r.stdout
    assert "(class scores): top-1 agreement" in card_paths(out)["md"].read_text()
