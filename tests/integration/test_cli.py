"""The `ptq` command as users run it: exit codes, one-line errors, nothing half-written, determinism."""

import json

import numpy as np
import onnx
import pytest

from cli_runner import run_in_process, run_installed


def ptq(*args, cwd=None):
    """`ptq ARGS` run inside the test process: the stdout, stderr and exit code of the installed command
    (tests/cli_runner.py; the entry-point tests below check that the two agree)."""
    return run_in_process(*args, cwd=cwd)


def assert_user_error(result, *fragments):
    assert result.returncode == 1, result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _same_as_in_process(result):
    again = run_in_process(*result.args[1:])
    assert (again.returncode, again.stdout, again.stderr) == (result.returncode, result.stdout, result.stderr)


def test_installed_entry_point_inspects_a_model(tiny_cnn):
    r = run_installed("inspect", tiny_cnn)
    assert r.returncode == 0, r.stderr
    assert "BatchNormalization" in r.stdout and "quantizable layers" in r.stdout
    _same_as_in_process(r)


def test_installed_entry_point_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    r = run_installed("inspect", bad)
    assert_user_error(r, "bad.onnx")
    _same_as_in_process(r)


def test_installed_entry_point_usage_error_exit_code_is_2(tiny_cnn):
    r = run_installed("calibrate", tiny_cnn, "--method", "magic", "-o", "x")
    assert r.returncode == 2 and "magic" in r.stderr
    _same_as_in_process(r)


def test_quantize_end_to_end_with_recipe(tmp_path, tiny_cnn, tiny_data):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[quant]\nmethod = "percentile"\npercentile = 99.9\n[data]\nnum_samples = 32\nbatch_size = 8\n')
    out = tmp_path / "q.onnx"
    r = ptq("quantize", tiny_cnn, "--data", tiny_data, "--recipe", recipe, "-o", out)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    plan = (tmp_path / "q.onnx.run" / "plan.json").read_text()
    assert '"method": "percentile"' in plan and '"samples_seen": 32' in plan
    assert "top-1 agreement" in r.stdout and (tmp_path / "q.onnx.run" / "fidelity.json").is_file()
    latency = json.loads((tmp_path / "q.card.json").read_text())["results"]["latency"]
    assert f"speed-up {latency['speedup']:.2f}x" in " ".join(r.stdout.split())


def test_an_export_slower_than_float_says_so(tmp_path, capsys):
    from ptqcli.cli import _print_latency

    out = tmp_path / "q.onnx"
    for speedup, warned in ((0.8, True), (1.3, False)):
        lat = {"cpu": "CPU", "batch": 1, "float_ms": 1.0, "quantized_ms": 1.0 / speedup, "speedup": speedup}
        (tmp_path / "q.card.json").write_text(json.dumps({"results": {"latency": lat}}))
        _print_latency(out)
        printed = " ".join(capsys.readouterr().out.split())
        assert f"speed-up {speedup:.2f}x" in printed and ("slower than float here" in printed) == warned


def test_calibrate_then_export_is_byte_identical_across_runs(tmp_path, tiny_cnn, tiny_data):
    outputs = []
    for i in range(2):
        run, out = tmp_path / f"run{i}", tmp_path / f"q{i}.onnx"
        assert ptq("calibrate", tiny_cnn, "--data", tiny_data, "--method", "entropy", "-o", run).returncode == 0
        assert ptq("export", run, "-o", out).returncode == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_inspect_lists_layers_and_batchnorm(tiny_cnn):
    r = ptq("inspect", tiny_cnn)
    assert r.returncode == 0, r.stderr
    assert "BatchNormalization" in r.stdout and "conv2" in r.stdout and "quantizable layers" in r.stdout


def test_missing_model(tmp_path, tiny_data):
    out = tmp_path / "q.onnx"
    assert_user_error(ptq("quantize", tmp_path / "nope.onnx", "--data", tiny_data, "-o", out), "model file not found")
    assert not out.exists()


def test_not_onnx(tmp_path, tiny_data):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    assert_user_error(ptq("inspect", bad), "bad.onnx")


def test_truncated_model(tmp_path, tiny_cnn, tiny_data):
    cut = tmp_path / "cut.onnx"
    data = tiny_cnn.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "q.onnx"
    assert_user_error(ptq("quantize", cut, "--data", tiny_data, "-o", out), "cut.onnx")
    assert not out.exists() and not list(tmp_path.glob(".q.onnx*"))


def test_data_shape_mismatch(tmp_path, tiny_cnn):
    data = tmp_path / "wrong.npy"
    np.save(data, np.zeros((4, 3, 16, 16), np.float32))
    out = tmp_path / "q.onnx"
    assert_user_error(ptq("quantize", tiny_cnn, "--data", data, "-o", out), "expects samples of shape (3, 8, 8)")
    assert not out.exists()


def test_data_dtype_mismatch(tmp_path, tiny_cnn):
    data = tmp_path / "ints.npz"
    np.savez(data, input=np.zeros((4, 3, 8, 8), np.int32))
    assert_user_error(ptq("calibrate", tiny_cnn, "--data", data, "-o", tmp_path / "run"), "expects float32, data is int32")
    assert not (tmp_path / "run" / "plan.json").exists()


def test_empty_data_folder(tmp_path, tiny_cnn):
    (tmp_path / "empty").mkdir()
    assert_user_error(ptq("calibrate", tiny_cnn, "--data", tmp_path / "empty", "-o", tmp_path / "run"),
                      "no images or .npy/.npz files")


def test_unwritable_output(tmp_path, tiny_cnn, tiny_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = ptq("quantize", tiny_cnn, "--data", tiny_data, "--run-dir", tmp_path / "run", "-o", locked / "q.onnx")
        if r.returncode == 0:
            pytest.skip("running as a user that ignores directory permissions")
        assert_user_error(r, "not writable")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_output_on_a_read_only_filesystem(tmp_path, tiny_cnn, tiny_data):
    r = ptq("quantize", tiny_cnn, "--data", tiny_data, "--run-dir", tmp_path / "run", "-o", "/proc/q.onnx")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "/proc" in r.stderr


def test_unwritable_output_folder_that_does_not_exist(tmp_path, tiny_cnn, tiny_data):
    assert_user_error(ptq("quantize", tiny_cnn, "--data", tiny_data, "-o", tmp_path / "no" / "such" / "q.onnx"),
                      "output folder does not exist")


def test_export_from_a_non_run_directory(tmp_path):
    assert_user_error(ptq("export", tmp_path, "-o", tmp_path / "q.onnx"), "is not a run directory")


def test_bad_recipe_key(tmp_path, tiny_cnn, tiny_data):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[quant]\nbits = 3\n")
    assert_user_error(ptq("calibrate", tiny_cnn, "--data", tiny_data, "--recipe", recipe, "-o", tmp_path / "run"),
                      "unknown option(s) bits")


def test_a_recipe_switch_that_is_not_true_or_false(tmp_path, tiny_cnn, tiny_data):
    recipe = tmp_path / "r.toml"
    for section, line, key in (("quant", 'float_stem = "yes"', "float_stem"), ("data", "whole_feeds = 1", "whole_feeds")):
        recipe.write_text(f"[{section}]\n{line}\n")
        r = ptq("calibrate", tiny_cnn, "--data", tiny_data, "--recipe", recipe, "-o", tmp_path / "run")
        assert_user_error(r, f"{key} must be true or false")
        assert not (tmp_path / "run").exists()


def test_usage_error_exit_code_is_2(tiny_cnn):
    assert ptq("calibrate", tiny_cnn, "--method", "magic", "-o", "x").returncode == 2


def test_recipe_sets_one_layers_format_and_binarizes_its_input(tmp_path, tiny_cnn, tiny_data):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quant]\nbinary_acts = ["conv2"]\n[quant.layer_weights]\nconv2 = "binary"\n'
                      '[data]\nnum_samples = 32\n')
    out = tmp_path / "q.onnx"
    r = ptq("quantize", tiny_cnn, "--data", tiny_data, "--recipe", recipe, "-o", out)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "q.onnx.run" / "plan.json").read_text())
    assert plan["tensors"]["w2"]["spec"]["scheme"] == "binary" and plan["tensors"]["w1"]["spec"]["scheme"] == "int"
    assert list(plan["binary_inputs"]) == ["conv2"] and len(plan["binary_inputs"]["conv2"]) == 8
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Where" in ops and "Less" in ops  # sign(x - mean) feeds conv2
    card = json.loads((tmp_path / "q.card.json").read_text())
    assert [row["node"] for row in card["layers"] if row["binary_input"]] == ["conv2"]
    assert "binary (binary input)" in (tmp_path / "q.card.md").read_text()


def test_binary_inputs_need_binary_weights(tmp_path, tiny_cnn, tiny_data):
    assert_user_error(ptq("calibrate", tiny_cnn, "--data", tiny_data, "--weights", "int4", "--binary-acts", "conv2",
                          "-o", tmp_path / "run"), "conv2 has int4 weights")
    assert_user_error(ptq("calibrate", tiny_cnn, "--data", tiny_data, "--weights", "binary", "--binary-acts", "nope",
                          "-o", tmp_path / "run"), "--binary-acts names nope")
    assert not (tmp_path / "run" / "plan.json").exists()


def test_export_after_the_source_model_moved(tmp_path, tiny_cnn, tiny_data):
    run = tmp_path / "run"
    assert ptq("calibrate", tiny_cnn, "--data", tiny_data, "-o", run).returncode == 0
    tiny_cnn.rename(tmp_path / "moved.onnx")
    r = ptq("export", run, "-o", tmp_path / "q.onnx")
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "q.card.json").read_text())
    assert card["model"]["input"]["path"] == str(tiny_cnn.resolve()) and card["model"]["input"]["bytes"] > 0


def test_two_processes_with_different_string_hashing_write_the_same_run(tmp_path):
    """Same inputs, same bytes, whatever order Python's sets come out in: two installed `ptq`
    processes whose string hashing differs (PYTHONHASHSEED) calibrate an encoder, whose attention
    leaves activations no integer kernel reads (recorded in the plan)."""
    import os
    import subprocess

    import numpy as np
    import onnx

    from builders import encoder_model
    from cli_runner import PTQ

    model, data = tmp_path / "encoder.onnx", tmp_path / "x.npy"
    onnx.save(encoder_model(), str(model))
    np.save(data, np.random.default_rng(0).normal(0, 1, (32, 16, 32)).astype(np.float32))
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        for args in (["calibrate", str(model), "--data", str(data), "--num-samples", "32", "-o", str(tmp_path / f"run{seed}")],
                     ["export", str(tmp_path / f"run{seed}"), "-o", str(tmp_path / f"q{seed}.onnx"), "--no-latency"]):
            r = subprocess.run([PTQ, *args], capture_output=True, text=True, timeout=600, env=env)
            assert r.returncode == 0, r.stderr
    assert (tmp_path / "q1.onnx").read_bytes() == (tmp_path / "q2.onnx").read_bytes()
    plan = (tmp_path / "run1" / "plan.json").read_text()
    assert "no integer kernel reads or writes it" in plan
    written = sorted(p.name for p in (tmp_path / "run1").iterdir() if p.suffix in (".json", ".npz") and p.name != "run.json")
    assert "plan.json" in written and "stats.npz" in written
    for name in written:
        assert (tmp_path / "run1" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes(), name


def test_a_model_quantized_already_is_refused_in_one_line(tmp_path, tiny_cnn, tiny_data):
    """Its own QDQ export, the same with the pairs folded into ORT's integer ops, and in a mask run."""
    import onnxruntime as ort

    run, qdq = tmp_path / "run", tmp_path / "q.onnx"
    assert ptq("quantize", tiny_cnn, "--data", tiny_data, "--run-dir", run, "-o", qdq).returncode == 0
    integer = tmp_path / "integer.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(integer)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # no CPU-specific layouts
    ort.InferenceSession(str(qdq), options, providers=["CPUExecutionProvider"])
    for model, ops in ((qdq, "DequantizeLinear x"), (integer, "QLinearConv x")):
        out = tmp_path / "again.onnx"
        r = ptq("quantize", model, "--data", tiny_data, "-o", out)
        assert_user_error(r, f"{model.name} is quantized already (", ops, "give it the float original")
        assert not out.exists() and not (tmp_path / "again.onnx.run").exists()
    assert_user_error(ptq("mask", qdq, "--nm", "2:4", "-o", tmp_path / "m"), "is quantized already")

