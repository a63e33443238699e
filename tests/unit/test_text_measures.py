"""What ptqcli reads from a text model and its data: token-id inputs and their vocabulary, the checks on
token ids, how outputs are compared (class scores, embeddings, pooled embeddings), and how the float
and quantized models take turns when timed."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import conv_bn_relu_model, text_encoder_model
from ptqcli.calibrate.data import embedding_vocabularies, iter_batches, model_inputs
from ptqcli.config import DataConfig
from ptqcli.errors import PtqError
from ptqcli.export.fidelity import CLASS_SCORES, EMBEDDING, VALUES, attention_mask_name, measure, output_kind
from ptqcli.export.measures import take_turns
from ptqcli.graph import Graph
from ptqcli.metrics import masked_mean_pool, sample_cosines
from ptqcli.plan import Plan
from ptqcli.prepare import prepare
from transformer_builders import VOCAB, token_data


def _ids_through_cast_and_reshape() -> onnx.ModelProto:
    """int32 ids cast to int64 and flattened before the Gather, as some exporters write them; a second,
    float input and an int64 input that never reaches a Gather."""
    table = numpy_helper.from_array(np.ones((7, 4), np.float32), "table")
    shape = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    n = helper.make_node
    nodes = [n("Cast", ["ids"], ["ids64"], to=TensorProto.INT64), n("Reshape", ["ids64", "flat"], ["ids_flat"]),
             n("Gather", ["table", "ids_flat"], ["vectors"]),
             n("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT), n("Mul", ["scale", "count_f"], ["scaled"])]
    graph = helper.make_graph(nodes, "ids", [
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 3]),
        helper.make_tensor_value_info("count", TensorProto.INT64, ["N", 1]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT, None)], [table, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_token_id_inputs_and_their_vocabulary_come_from_the_graph():
    assert embedding_vocabularies(Graph(text_encoder_model(vocab=23))) == {"input_ids": 23}
    assert embedding_vocabularies(Graph(_ids_through_cast_and_reshape())) == {"ids": 7}
    assert embedding_vocabularies(prepare(conv_bn_relu_model())) == {}
    specs = {s.name: s.vocabulary for s in model_inputs(Graph(text_encoder_model(vocab=23)))}
    assert specs == {"input_ids": 23, "attention_mask": None}


def _write(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _read_all(path, model=None):
    inputs = model_inputs(Graph(model or text_encoder_model()))
    return list(iter_batches(path, inputs, DataConfig(batch_size=16), limit=1000))


def test_token_ids_past_the_vocabulary_or_negative_are_refused(tmp_path):
    data = token_data(40, seed=3)
    too_big, negative = data["input_ids"].copy(), data["input_ids"].copy()
    too_big[5, 1], negative[7, 0] = VOCAB + 2, -3
    with pytest.raises(PtqError, match=rf"big.npz: input 'input_ids' holds token ids up to {VOCAB + 2}, beyond its "
                                       rf"vocabulary of {VOCAB} "):
        _read_all(_write(tmp_path, "big", input_ids=too_big, attention_mask=data["attention_mask"]))
    with pytest.raises(PtqError, match=rf"input 'input_ids' holds negative token id -3; its vocabulary of {VOCAB}"):
        _read_all(_write(tmp_path, "neg", input_ids=negative, attention_mask=data["attention_mask"]))
    # The last id of the table is still a valid one.
    edge = data["input_ids"].copy()
    edge[0, 0] = VOCAB - 1
    assert sum(len(b.feeds["input_ids"]) for b in _read_all(_write(tmp_path, "edge", input_ids=edge,
                                                                          attention_mask=data["attention_mask"]))) == 40


def test_float_ids_are_refused_and_narrower_integers_converted(tmp_path):
    data = token_data(20, seed=4)
    floats = _write(tmp_path, "floats", input_ids=data["input_ids"].astype(np.float32),
                    attention_mask=data["attention_mask"])
    with pytest.raises(PtqError, match=r"floats.npz: input 'input_ids' expects int64, data is float32"):
        _read_all(floats)
    narrow = _write(tmp_path, "narrow", input_ids=data["input_ids"].astype(np.int32),
                    attention_mask=data["attention_mask"].astype(np.int32))
    batches = _read_all(narrow)
    assert all(b.feeds["input_ids"].dtype == np.int64 and b.feeds["attention_mask"].dtype == np.int64 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.feeds["input_ids"] for b in batches]), data["input_ids"])


def test_output_kinds():
    scores, tokens = np.zeros((4, 10), np.float32), np.zeros((4, 8, 16), np.float32)
    assert output_kind(scores, text_model=False, labelled=False) == CLASS_SCORES  # as before, for CNNs
    assert output_kind(scores, text_model=True, labelled=False) == EMBEDDING
    assert output_kind(scores, text_model=True, labelled=True) == CLASS_SCORES
    assert output_kind(tokens, text_model=True, labelled=False) == EMBEDDING
    assert output_kind(tokens, text_model=False, labelled=False) == VALUES
    assert output_kind(np.zeros((4, 8), np.int64), text_model=True, labelled=False) == VALUES  # ids passed through
    assert output_kind(np.zeros((4, 1), np.float32), text_model=False, labelled=False) == VALUES


def test_attention_mask_is_the_zero_one_integer_input_that_is_not_token_ids():
    data = token_data(6, seed=5)
    assert attention_mask_name(data, {"input_ids"}) == "attention_mask"
    assert attention_mask_name({**data, "attention_mask": data["attention_mask"] * 2}, {"input_ids"}) is None
    as_float = {**data, "attention_mask": data["attention_mask"].astype(np.float32)}
    assert attention_mask_name(as_float, {"input_ids"}) is None
    binary_ids = {"input_ids": np.ones((2, 4), np.int64)}  # token ids that happen to be 0/1 are still ids
    assert attention_mask_name(binary_ids, {"input_ids"}) is None


def test_sample_cosines_and_masked_pooling():
    f = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    q = np.array([[1.0, 1.0], [0.0, 0.0], [-3.0, -4.0], [1.0, 0.0]])
    np.testing.assert_allclose(sample_cosines(f, q), [np.sqrt(0.5), 1.0, -1.0, 0.0])
    tokens = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(masked_mean_pool(tokens, mask), [[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(masked_mean_pool(tokens, None), tokens.mean(axis=1))


def _perturbed(model: onnx.ModelProto, row: int, noise: float) -> onnx.ModelProto:
    """A copy whose embedding row `row` is shifted: only samples holding that token change."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    table = next(t for t in out.graph.initializer if t.name == "embeddings")
    values = numpy_helper.to_array(table).copy()
    values[row] += noise
    table.CopyFrom(numpy_helper.from_array(values, "embeddings"))
    return out


def _empty_plan() -> Plan:
    """No quantized layers: measure compares the model outputs only."""
    return Plan(tensors={}, layers=[], float_nodes={}, config={})


def test_text_model_fidelity_reports_embeddings_and_pooled_cosine_not_top1():
    from ptqcli.calibrate.data import Batch

    model = text_encoder_model()
    data = token_data(32, seed=6)
    data["input_ids"][data["input_ids"] == 5] = 6
    data["input_ids"][9, 0] = 5  # token 5 only in sample 9, at a real position (every sample has 3 or more)
    batches = [Batch({k: v[i:i + 8] for k, v in data.items()}, None) for i in range(0, 32, 8)]
    fidelity = measure(model, _perturbed(model, 5, 0.8), _empty_plan(), batches, held_out=True)
    tokens, sentence = fidelity.outputs["tokens"], fidelity.outputs["sentence"]
    assert tokens["kind"] == sentence["kind"] == EMBEDDING
    assert "top1_agreement" not in tokens and "top1_agreement" not in sentence and not fidelity.accuracy
    assert tokens["pooled_over"] == ["attention_mask"] and "pooled_cosine" not in sentence
    # One sample of 32 differs: the minimum shows it, the mean barely does.
    assert tokens["cosine_min"] < 0.999 < tokens["cosine"] < 1.0
    # The model's own mean-pooled output is what pooling `tokens` over the mask gives.
    assert sentence["cosine_min"] == pytest.approx(tokens["pooled_cosine_min"], abs=1e-6)
    assert sentence["cosine"] == pytest.approx(tokens["pooled_cosine"], abs=1e-6)


def test_pooling_skips_the_positions_the_mask_leaves_out():
    from ptqcli.calibrate.data import Batch

    model = text_encoder_model()
    data = token_data(16, seed=8)
    assert (data["attention_mask"] == 0).any() and (data["input_ids"][data["attention_mask"] == 1] != 0).all()
    padding_changed = _perturbed(model, 0, 0.8)  # id 0 fills the padded tail only
    tokens = measure(model, padding_changed, _empty_plan(), [Batch(data, None)], held_out=True).outputs["tokens"]
    assert tokens["cosine_min"] < 0.999 and tokens["pooled_cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert tokens["pooled_over"] == ["attention_mask"]
    # A mask input holding 0/2 is no attention mask: every position is pooled, the padding included.
    doubled = {**data, "attention_mask": 2 * data["attention_mask"]}
    tokens = measure(model, padding_changed, _empty_plan(), [Batch(doubled, None)], held_out=True).outputs["tokens"]
    assert tokens["pooled_over"] == ["all positions"] and tokens["pooled_cosine_min"] < 0.9999


def test_labelled_text_data_makes_scores_class_scores_and_a_cnn_keeps_top1():
    from ptqcli.calibrate.data import Batch

    model = text_encoder_model()
    data = token_data(16, seed=7)
    labelled = measure(model, model, _empty_plan(), [Batch(data, np.zeros(16, np.int64))], held_out=True)
    assert labelled.outputs["sentence"]["kind"] == CLASS_SCORES and labelled.outputs["sentence"]["top1_agreement"] == 1.0
    assert labelled.outputs["tokens"]["kind"] == EMBEDDING
    cnn = prepare(conv_bn_relu_model()).model
    x = np.random.default_rng(0).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    scores = measure(cnn, cnn, _empty_plan(), [Batch({"input": x}, None)], held_out=True).outputs["logits"]
    assert scores["kind"] == CLASS_SCORES and scores["top1_agreement"] == 1.0
    assert scores["cosine_min"] == pytest.approx(1.0)


def test_timed_models_take_turns_on_the_same_samples():
    calls = []
    runners = {name: (lambda feeds, name=name: calls.append((name, feeds["i"]))) for name in ("float", "quantized")}
    samples = [{"i": i} for i in range(3)]
    times = take_turns(runners, samples, budget_s=0.0, min_runs=5, max_runs=100)
    assert {name: len(t) for name, t in times.items()} == {"float": 6, "quantized": 6}  # two whole rounds
    assert calls[:6] == [("float", 0), ("quantized", 0), ("quantized", 1), ("float", 1), ("float", 2),
                         ("quantized", 2)]
    assert [i for _, i in calls] == [0, 0, 1, 1, 2, 2] * 2  # each sample on both, back to back
    assert len(take_turns(runners, samples, budget_s=60.0, min_runs=1, max_runs=4)["float"]) == 6


def test_a_turn_runs_a_fast_model_several_times_in_a_row_and_records_the_time_per_run():
    calls = []
    runners = {name: (lambda feeds, name=name: calls.append(name)) for name in ("float", "quantized")}
    times = take_turns(runners, [{"i": 0}], budget_s=0.0, min_runs=2, max_runs=2, repeats=3)
    assert calls == ["float"] * 3 + ["quantized"] * 3 + ["quantized"] * 3 + ["float"] * 3
    assert {name: len(t) for name, t in times.items()} == {"float": 2, "quantized": 2}


def test_the_headline_quality_of_a_text_model_is_its_lowest_embedding_cosine():
    from ptqcli.export.fidelity import headline

    outputs = {"ids_copy": {"kind": "values", "cosine": 1.0},
               "tokens": {"kind": "embedding", "cosine": 0.997, "pooled_cosine": 0.996},
               "sentence": {"kind": "embedding", "cosine": 0.995}}
    assert headline({}, outputs) == (pytest.approx(99.5), "embedding cosine x100")
    scores = {"logits": {"kind": "class_scores", "cosine": 0.97, "top1_agreement": 0.958}}
    assert headline({}, scores) == (pytest.approx(95.8), "top-1 agreement")
    assert headline({"quantized": 0.866}, scores) == (pytest.approx(86.6), "top-1 accuracy")
    assert headline({}, {"y": {"kind": "values", "cosine": 0.99}, "z": {"kind": "values", "cosine": 0.98}}) == (
        pytest.approx(98.0), "output cosine x100")


def test_token_sequences_of_different_lengths_are_padded_per_batch(tmp_path):
    """A folder with one .npz per passage: each batch pads to its longest passage with id 0 and
    mask 0; the pooled output over the mask is what each passage gives alone."""
    import onnxruntime as ort

    from ptqcli.calibrate.data import iter_batches, model_inputs
    from ptqcli.config import DataConfig
    from ptqcli.graph import Graph
    from builders import text_encoder_model

    model = text_encoder_model(seq="T")  # any sequence length
    folder = tmp_path / "passages"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lengths = [3, 7, 5, 8, 2]
    for i, n in enumerate(lengths):
        np.savez(folder / f"{i:02d}.npz", input_ids=rng.integers(1, 30, (1, n)), attention_mask=np.ones((1, n), np.int64))
    inputs = model_inputs(Graph(model))
    batches = list(iter_batches(str(folder), inputs, DataConfig(batch_size=2), limit=10))
    assert [b.feeds["input_ids"].shape for b in batches] == [(2, 7), (2, 8), (1, 2)]
    assert batches[0].feeds["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    padded = np.concatenate([sess.run(["sentence"], b.feeds)[0] for b in batches])
    alone = np.concatenate([sess.run(["sentence"], dict(np.load(f)))[0] for f in sorted(folder.iterdir())])
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)


def test_the_samples_measured_are_input_samples_when_an_output_is_time_major():
    """An output [T, N, C] (a CTC recognizer's) has T rows per sample: the fidelity counts samples."""
    from ptqcli.calibrate.data import Batch

    n = helper.make_node
    graph = helper.make_graph(
        [n("Unsqueeze", ["x", "axes"], ["u"]), n("Tile", ["u", "reps"], ["seq"])], "time_major",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [5, "N", 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes"), numpy_helper.from_array(np.array([5, 1, 1], np.int64), "reps")])
    model = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).model
    x = np.random.default_rng(0).normal(0, 1, (6, 4)).astype(np.float32)
    fidelity = measure(model, model, _empty_plan(), [Batch({"x": x}, None)], held_out=True)
    assert fidelity.samples == 6  # not the output's rows, which are time steps


def test_the_ops_run_in_float_between_a_dequantize_and_a_quantize_are_counted():
    """DequantizeLinear -> HardSigmoid -> Mul (with the dequantized value) -> QuantizeLinear: both
    float ops sit between the two; a float op on the model input, before any DequantizeLinear, does not."""
    from ptqcli.export.measures import float_between_qdq

    n = helper.make_node
    nodes = [n("Relu", ["x"], ["r"]), n("QuantizeLinear", ["r", "s", "z"], ["q"]),
             n("DequantizeLinear", ["q", "s", "z"], ["d"]), n("HardSigmoid", ["d"], ["h"]),
             n("Mul", ["d", "h"], ["m"]), n("QuantizeLinear", ["m", "s", "z"], ["q2"]),
             n("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.uint8), "z")])
    assert float_between_qdq(helper.make_model(graph)) == {"HardSigmoid": 1, "Mul": 1}
