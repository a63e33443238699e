"""Plan JSON round-trip, and the data sources' contract (shapes, dtypes, streaming, hold-out)."""

import numpy as np
import pytest
from PIL import Image

from builders import conv_bn_relu_model
from ptqcli.calibrate.collect import collect
from ptqcli.calibrate.data import count_samples, iter_batches, model_inputs
from ptqcli.calibrate.planner import build_plan
from ptqcli.calibrate.select import select
from ptqcli.config import DataConfig, QuantConfig
from ptqcli.errors import PtqError
from ptqcli.plan import Plan
from ptqcli.prepare import prepare


def _plan(cfg=QuantConfig()):
    g = prepare(conv_bn_relu_model())
    sel = select(g, cfg)
    x = np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    from ptqcli.calibrate.data import Batch

    stats, _ = collect(g, sel.activations, [Batch({"input": x}, None)], cfg.bins)
    return build_plan(g, sel, stats, cfg, {"data": {}}), g


def test_plan_round_trips_exactly():
    plan, _ = _plan()
    back = Plan.from_json(plan.to_json())
    assert back.to_json() == plan.to_json()
    for name, tq in plan.tensors.items():
        np.testing.assert_array_equal(back.tensors[name].scale, tq.scale)
        np.testing.assert_array_equal(back.tensors[name].zero_point, tq.zero_point)
        assert back.tensors[name].spec == tq.spec


def test_plan_refuses_other_versions_and_garbage():
    plan, _ = _plan()
    with pytest.raises(PtqError, match="version"):
        Plan.from_json(plan.to_json().replace('"version": 1', '"version": 99'))
    with pytest.raises(PtqError, match="not valid JSON"):
        Plan.from_json("{")


def test_plan_covers_weights_biases_and_activations():
    plan, g = _plan()
    roles = {r: len(plan.of_role(r)) for r in ("weight", "bias", "activation")}
    assert roles == {"weight": 3, "bias": 3, "activation": 5}  # input, r1, r2, gap, flat
    # Conv outputs feeding only Relu are not quantized themselves: ORT fuses the Relu.
    assert "c2" not in plan.tensors and "r2" in plan.tensors
    bias = plan.tensors["b2"]
    np.testing.assert_allclose(bias.scale, plan.tensors["r1"].scale * plan.tensors["w2"].scale, rtol=1e-6)


def _inputs():
    return model_inputs(prepare(conv_bn_relu_model()))


def test_npz_npy_and_folder_stream_in_batches(tmp_path):
    x = np.arange(50 * 3 * 8 * 8, dtype=np.float32).reshape(50, 3, 8, 8)
    np.save(tmp_path / "a.npy", x[:20])
    np.savez(tmp_path / "b.npz", input=x[20:], labels=np.arange(30))
    cfg = DataConfig(batch_size=16)
    batches = list(iter_batches(tmp_path, _inputs(), cfg, limit=45))
    assert [len(b.feeds["input"]) for b in batches] == [16, 16, 13]
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"] for b in batches]), x[:45])
    assert count_samples(tmp_path) == 50


def test_skip_gives_held_out_samples(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(40))
    batches = list(iter_batches(tmp_path / "d.npz", _inputs(), DataConfig(batch_size=8), limit=100, skip=25))
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"] for b in batches]), x[25:])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(25, 40))


def test_fixed_batch_models_get_one_sample_at_a_time(tmp_path):
    model = conv_bn_relu_model(batch=1)
    inputs = model_inputs(prepare(model))
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 8, 8), np.float32))
    batches = list(iter_batches(tmp_path / "x.npy", inputs, DataConfig(batch_size=16), limit=5))
    assert [len(b.feeds["input"]) for b in batches] == [1] * 5


def test_float64_data_is_cast_but_wrong_shapes_and_kinds_are_refused(tmp_path):
    np.save(tmp_path / "f64.npy", np.zeros((2, 3, 8, 8)))
    batch = next(iter_batches(tmp_path / "f64.npy", _inputs(), DataConfig(), limit=2))
    assert batch.feeds["input"].dtype == np.float32
    np.save(tmp_path / "shape.npy", np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(PtqError, match=r"expects samples of shape \(3, 8, 8\), data has \(1, 8, 8\)"):
        list(iter_batches(tmp_path / "shape.npy", _inputs(), DataConfig(), limit=2))
    np.save(tmp_path / "ints.npy", np.zeros((2, 3, 8, 8), np.int64))
    with pytest.raises(PtqError, match="expects float32, data is int64"):
        list(iter_batches(tmp_path / "ints.npy", _inputs(), DataConfig(), limit=2))
    np.savez(tmp_path / "keys.npz", a=np.zeros((2, 3, 8, 8)), b=np.zeros((2, 3, 8, 8)))
    with pytest.raises(PtqError, match="no array for input"):
        list(iter_batches(tmp_path / "keys.npz", _inputs(), DataConfig(), limit=2))


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(PtqError, match="no images or .npy/.npz files"):
        list(iter_batches(tmp_path, _inputs(), DataConfig(), limit=2))


def test_image_folder_resize_crop_and_normalise(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 255  # red everywhere
    Image.fromarray(img).save(tmp_path / "red.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cfg = DataConfig(resize=10, mean=(127.0,), std=(128.0,))
    with pytest.raises(PtqError, match="cannot read image bad.jpg"):
        list(iter_batches(tmp_path, _inputs(), cfg, limit=2))
    (tmp_path / "bad.jpg").unlink()
    (x,) = [b.feeds["input"] for b in iter_batches(tmp_path, _inputs(), cfg, limit=2)]
    assert x.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(x[0, 0], (255 - 127) / 128)
    np.testing.assert_allclose(x[0, 1:], -127 / 128)


def test_npy_is_read_chunk_by_chunk(tmp_path, monkeypatch):
    """Streaming: only the samples that are fed are ever read into memory."""
    x = np.random.default_rng(4).normal(size=(1000, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    reads = []
    real_fromfile = np.fromfile

    def spy(*args, **kwargs):
        reads.append(kwargs["count"])
        return real_fromfile(*args, **kwargs)

    monkeypatch.setattr(np, "fromfile", spy)
    batch = next(iter_batches(tmp_path / "big.npy", _inputs(), DataConfig(batch_size=4), limit=4))
    np.testing.assert_array_equal(batch.feeds["input"], x[:4])
    assert reads == [256 * 3 * 8 * 8]  # one chunk of 256 samples, not 1000


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_is_streamed_not_loaded(tmp_path, save, monkeypatch):
    """Both kinds of .npz give exactly the saved samples, read chunk by chunk."""
    x = np.random.default_rng(3).normal(size=(700, 3, 8, 8)).astype(np.float32)
    save(tmp_path / "d.npz", input=x, labels=np.arange(700))
    monkeypatch.setattr("ptqcli.calibrate.data._CHUNK", 64)
    from ptqcli.calibrate.data import open_npz

    assert not isinstance(open_npz(tmp_path / "d.npz")["input"], np.ndarray)
    batches = list(iter_batches(tmp_path / "d.npz", _inputs(), DataConfig(batch_size=50), limit=600, skip=30))
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"] for b in batches]), x[30:630])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(30, 630))
    assert count_samples(tmp_path / "d.npz") == 700


def test_outputs_get_the_usual_file_permissions(tmp_path):
    import os

    from ptqcli.files import write_atomic

    write_atomic(tmp_path / "out.bin", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask
