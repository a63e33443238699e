"""Weight-only quantization one tensor at a time (`ptq quantize --stream`, the default past 2 GiB):
the same weights as the in-memory path, and a model over 2 GB quantized in far less memory than
its size."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_runner import PTQ, run_in_process as ptq
from transformer_builders import tiny_language_model, token_data


def _external(model, path):
    """Saved with every tensor in `<name>.data`, as large models are."""
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def _nbits_tensors(path):
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: [inits[name] for name in n.input[1:]] for n in model.graph.node if n.op_type == "MatMulNBits"}


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("zeros", [(), ("--weight-zero-points",), ("--float-zero-points",)])
def test_streaming_writes_what_the_in_memory_path_writes(tmp_path, zeros):
    model = _external(tiny_language_model(), tmp_path / "lm.onnx")
    common = ("--acts", "none", "--weights", "int4", "--block-size", "16", "--keep", "lm_head=8", *zeros)
    streamed, held = tmp_path / "streamed.onnx", tmp_path / "held.onnx"
    r = ptq("quantize", model, *common, "--stream", "-o", streamed)
    assert r.returncode == 0, r.stderr
    r = ptq("quantize", model, *common, "--no-stream", "--no-latency", "-o", held)
    assert r.returncode == 0, r.stderr
    a, b = _nbits_tensors(streamed), _nbits_tensors(held)
    assert sorted(a) == sorted(b) == ["down_proj_MatMulNBits", "lm_head_MatMulNBits", "up_proj_MatMulNBits"]
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y)
    feeds = token_data(4, seed=3)
    np.testing.assert_array_equal(_run(streamed, feeds), _run(held, feeds))
    card = json.loads((tmp_path / "streamed.card.json").read_text())
    assert card["recipe"]["quant"]["block_size"] == 16 and card["results"]["kernel_ops"]["MatMulNBits"] == 3
    assert {row["node"]: row["bits"] for row in card["layers"]}["lm_head"] == 8
    assert not list(tmp_path.glob(".streamed.onnx.*"))  # the staging directory is gone
    # Same inputs, same bytes.
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "streamed.onnx"
    assert ptq("quantize", model, *common, "--stream", "-o", again).returncode == 0
    assert again.read_bytes() == streamed.read_bytes()
    assert (tmp_path / "again" / "streamed.onnx.data").read_bytes() == (tmp_path / "streamed.onnx.data").read_bytes()


def test_streamed_gptq_writes_what_the_in_memory_gptq_writes(tmp_path):
    """GPTQ with smoothing (the RMSNorm's outlier channels make the walk choose factors, folded into
    gamma with a restoring Mul for the residual), read and written a segment at a time."""
    model = _external(tiny_language_model(outlier_gain=20.0), tmp_path / "lm.onnx")
    np.savez(tmp_path / "calib.npz", **token_data(16, seed=1))
    common = ("--acts", "none", "--weights", "int4", "--block-size", "16", "--weight-zero-points",
              "--data", tmp_path / "calib.npz", "--rounding", "gptq")
    streamed, held = tmp_path / "streamed.onnx", tmp_path / "held.onnx"
    r = ptq("quantize", model, *common, "--stream", "-o", streamed)
    assert r.returncode == 0, r.stderr
    assert ptq("quantize", model, *common, "--no-stream", "--no-latency", "-o", held).returncode == 0
    plan = json.loads((tmp_path / "held.onnx.run" / "plan.json").read_text())
    assert plan["config"]["smoothing"]["x"]["alpha"] is not None  # factors were chosen and folded
    a, b = _nbits_tensors(streamed), _nbits_tensors(held)
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y)
    ops = [n.name for n in onnx.load(str(streamed), load_external_data=False).graph.node]
    assert "x__unsmoothed" in ops
    feeds = token_data(4, seed=3)
    np.testing.assert_array_equal(_run(streamed, feeds), _run(held, feeds))
    card = json.loads((tmp_path / "streamed.card.json").read_text())
    assert card["calibration"]["samples"] == 16
    assert {row["node"]: row["rounding"] for row in card["layers"]} == {"up_proj": "gptq", "down_proj": "gptq",
                                                                        "lm_head": "gptq"}
    assert {row["kernel"] for row in card["layers"]} == {"MatMulNBits"}
    held_card = json.loads((tmp_path / "held.card.json").read_text())
    # the rounded weights' own SQNR, the same either way
    assert [row["weight_sqnr_db"] for row in card["layers"]] == [row["weight_sqnr_db"] for row in held_card["layers"]]
    assert "bit-operations per sample: not counted" in (tmp_path / "streamed.card.md").read_text()
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "streamed.onnx"
    assert ptq("quantize", model, *common, "--stream", "-o", again).returncode == 0
    assert (tmp_path / "again" / "streamed.onnx.data").read_bytes() == (tmp_path / "streamed.onnx.data").read_bytes()


def test_streamed_quantization_measures_perplexity_as_the_in_memory_export_does(tmp_path):
    """--eval-data with --stream: the float model run segment by segment from disk, the written one
    whole; the same perplexities and KL as the in-memory export's fidelity pass, no layer SQNRs."""
    model = _external(tiny_language_model(outlier_gain=20.0), tmp_path / "lm.onnx")
    np.savez(tmp_path / "calib.npz", **token_data(16, seed=1))
    np.savez(tmp_path / "eval.npz", **token_data(8, seed=2))
    common = ("--acts", "none", "--weights", "int4", "--block-size", "16", "--data", tmp_path / "calib.npz",
              "--eval-data", tmp_path / "eval.npz")
    r = ptq("quantize", model, *common, "--stream", "-o", tmp_path / "streamed.onnx")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "per-layer output SQNR" not in r.stdout
    assert ptq("quantize", model, *common, "--no-stream", "--no-latency", "-o", tmp_path / "held.onnx").returncode == 0
    streamed, held = (json.loads((tmp_path / f"{name}.card.json").read_text())["results"]
                      for name in ("streamed", "held"))
    assert streamed["evaluation"] == {"source": str(tmp_path / "eval.npz"), "samples": 8, "held_out": True}
    a, b = streamed["outputs"]["logits"], held["outputs"]["logits"]
    assert a["tokens"] == b["tokens"] > 0
    for key in ("perplexity_float", "perplexity_quantized", "next_token_kl", "cosine"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert a["perplexity_quantized"] != a["perplexity_float"]


def test_streamed_evaluation_data_out_of_range_is_one_line(tmp_path):
    model = _external(tiny_language_model(), tmp_path / "lm.onnx")
    bad = token_data(4, seed=2)
    bad["input_ids"][0, 0] = 10_000
    np.savez(tmp_path / "eval.npz", **bad)
    out = tmp_path / "q.onnx"
    r = ptq("quantize", model, "--acts", "none", "--weights", "int4", "--block-size", "16", "--stream",
            "--eval-data", tmp_path / "eval.npz", "-o", out)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "input_ids" in r.stderr, r.stderr
    assert not out.exists() and not (tmp_path / "q.onnx.data").exists()


@pytest.mark.parametrize("extra, message", [
    (("--data", "CALIB", "--rounding", "adaround"), "--rounding adaround with calibration data"),
    (("--data", "CALIB", "--rounding", "nearest"), "--rounding nearest with calibration data"),
    (("--synthetic", "gaussian"), "--synthetic"),
    (("--rounding", "gptq"), "--rounding gptq without calibration data"),
    (("--weights", "int3"), "--weights int3"),
    (("--acts", "uint8"), "--acts uint8"),
    (("--format", "native"), "--format native"),
])
def test_what_streaming_cannot_do_is_one_line(tmp_path, extra, message):
    model = _external(tiny_language_model(), tmp_path / "lm.onnx")
    np.savez(tmp_path / "calib.npz", **token_data(8, seed=1))
    args = ["--acts", "none", "--weights", "int4", "--block-size", "16"]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = str(tmp_path / "calib.npz") if value == "CALIB" else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    out = tmp_path / "q.onnx"
    r = ptq("quantize", model, *args, "--stream", "-o", out)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not (tmp_path / "q.onnx.data").exists()


def _big_model(path, layers, width, seed=0):
    """x -> (x + x W_i) for each layer: random [width, width] weights written straight to the data
    file, so that the test never holds the model either."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes, x = [], [], "x"
    with open(path.parent / data_name, "wb") as data:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) * (0.5 / np.sqrt(width))).astype(np.float32)
            offset = data.tell()
            data.write(w.tobytes())
            t = TensorProto(name=f"w{i}", dims=[width, width], data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"),
                      helper.make_node("Add", [x, f"m{i}"], [f"h{i}"], name=f"residual{i}")]
            x = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["rows", width])], inits)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _float_reference(path, x, layers, width):
    """The float model's output, one weight read from disk at a time."""
    weights = np.memmap(path.parent / (path.name + ".data"), dtype=np.float32, mode="r",
                        shape=(layers, width, width))
    for i in range(layers):
        x = x + x @ np.asarray(weights[i])
    return x


def _peak_rss_run(*args) -> int:
    """`ptq args...` in a child; its peak RSS in bytes, measured by a parent that does nothing else."""
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
               "print(r.stderr[-2000:], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", measure, PTQ, *map(str, args)], capture_output=True, text=True,
                       timeout=1200)
    code, peak = (int(v) for v in r.stdout.split())
    assert code == 0, r.stderr
    return peak


def _cosine(a, b) -> float:
    return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
def test_a_model_over_2_gb_quantizes_in_less_than_half_its_size(tmp_path):
    layers, width = 36, 4096  # 36 x 64 MiB = 2.25 GiB
    model = _big_model(tmp_path / "big.onnx", layers, width)
    size = model.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert size > 2 * 2**30
    out = tmp_path / "big.int4.onnx"
    peak = _peak_rss_run("quantize", model, "--acts", "none", "--weights", "int4", "--block-size", "32", "-o", out)
    assert peak < size / 2, f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    quantized = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == layers
    x = np.random.default_rng(1).standard_normal((1, width), dtype=np.float32)
    # 36 residual layers, each adding its int4 rounding error (about 20 dB of SQNR per weight)
    assert _cosine(_run(out, {"x": x}), _float_reference(model, x, layers, width)) > 0.9


@pytest.mark.slow
def test_gptq_on_a_model_over_2_gb_in_less_than_half_its_size(tmp_path):
    """GPTQ with calibration data, streamed (the default past 2 GiB): peak RSS below half the model,
    and on held-out inputs from the calibration data's distribution closer to float than nearest
    rounding."""
    layers, width = 144, 2048  # 144 x 16 MiB = 2.25 GiB
    model = _big_model(tmp_path / "big.onnx", layers, width)
    size = model.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert size > 2 * 2**30
    # Inputs in a low-dimensional subspace with a few loud channels, as a language model's are: what
    # GPTQ's Hessian sees and nearest rounding ignores.
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((64, width)).astype(np.float32)
    basis[:, :8] *= 10

    def inputs(n):
        return (rng.standard_normal((n, 64)).astype(np.float32) @ basis / 8).astype(np.float32)

    np.savez(tmp_path / "calib.npz", x=inputs(256))
    held_out = inputs(16)
    gptq, nearest = tmp_path / "gptq.onnx", tmp_path / "nearest.onnx"
    common = ("--acts", "none", "--weights", "int4", "--block-size", "128", "--weight-zero-points")
    peak = _peak_rss_run("quantize", model, *common, "--data", tmp_path / "calib.npz", "--batch-size", "64", "-o", gptq)
    assert peak < size / 2, f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    card = json.loads((tmp_path / "gptq.card.json").read_text())
    assert card["recipe"]["quant"]["rounding"] == "gptq" and card["calibration"]["samples"] == 256
    assert _peak_rss_run("quantize", model, *common, "-o", nearest) > 0
    reference = _float_reference(model, held_out, layers, width)
    errors = {name: float(np.linalg.norm(_run(path, {"x": held_out}) - reference) / np.linalg.norm(reference))
              for name, path in (("gptq", gptq), ("nearest", nearest))}
    # 0.06 against 0.58 when written: the inputs span 64 directions, which GPTQ's updates exploit
    assert errors["gptq"] < 0.5 * errors["nearest"], errors


def test_a_model_with_nothing_to_stream_is_one_line(tmp_path):
    """Only a Conv: streaming packs MatMul weights, so it refuses instead of copying the model."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((4, 3, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    model = _external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    out = tmp_path / "q.onnx"
    r = ptq("quantize", model, "--acts", "none", "--weights", "int4", "--block-size", "32", "--stream", "-o", out)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nothing to stream" in r.stderr, r.stderr
    assert not out.exists() and not (tmp_path / "q.onnx.data").exists()
