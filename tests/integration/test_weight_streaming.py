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


@pytest.mark.parametrize("extra, message", [
    (("--data", "CALIB"), "calibration data"),
    (("--rounding", "gptq"), "--rounding gptq"),
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
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], inits)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _float_reference(path, x, layers, width):
    """The float model's output, one weight read from disk at a time."""
    weights = np.memmap(path.parent / (path.name + ".data"), dtype=np.float32, mode="r",
                        shape=(layers, width, width))
    for i in range(layers):
        x = x + x @ np.asarray(weights[i])
    return x


@pytest.mark.slow
def test_a_model_over_2_gb_quantizes_in_less_than_half_its_size(tmp_path):
    layers, width = 36, 4096  # 36 x 64 MiB = 2.25 GiB
    model = _big_model(tmp_path / "big.onnx", layers, width)
    size = model.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert size > 2 * 2**30
    out = tmp_path / "big.int4.onnx"
    # The child's peak RSS, measured by a parent that does nothing else.
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
               "print(r.stderr[-2000:], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", measure, PTQ, "quantize", str(model), "--acts", "none", "--weights",
                        "int4", "--block-size", "32", "-o", str(out)], capture_output=True, text=True, timeout=900)
    code, peak = (int(v) for v in r.stdout.split())
    assert code == 0, r.stderr
    assert peak < size / 2, f"peak RSS {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    quantized = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in quantized.graph.node].count("MatMulNBits") == layers
    x = np.random.default_rng(1).standard_normal((1, width), dtype=np.float32)
    y = _run(out, {"x": x})
    reference = _float_reference(model, x, layers, width)
    cosine = float(np.sum(y * reference) / np.linalg.norm(y) / np.linalg.norm(reference))
    # 36 residual layers, each adding its int4 rounding error (about 20 dB of SQNR per weight)
    assert cosine > 0.9
