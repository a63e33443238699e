"""--ray: calibration observed in shards, the allocation's sensitivity runs and the Pareto sweep's
evaluations as Ray tasks on a local Ray of two workers, with the same statistics, sensitivity,
plan bytes and Pareto points as in one process;
an address nobody answers at and a missing Ray are one-line errors."""

import shutil
import sys
import time

import pytest

from conftest import ASSETS
from test_cli import ptq


@pytest.fixture(autouse=True)
def no_ray_left_running():
    """Each test starts without a Ray connection in this process and leaves none behind."""
    yield
    if "ray" in sys.modules and sys.modules["ray"] is not None and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def _calibrated(tmp_path):
    run = tmp_path / "run"
    r = ptq("calibrate", ASSETS / "fashion_cnn.onnx", "--data", ASSETS / "fashion_calib.npz", "-o", run)
    assert r.returncode == 0, r.stderr
    return run


def test_sensitivity_on_two_local_ray_workers_gives_the_same_plan(tmp_path):
    here, there = _calibrated(tmp_path), tmp_path / "on_ray"
    shutil.copytree(here, there)
    args = ("--budget-bits", "5", "--weight-candidates", "8,4,3")
    assert ptq("allocate", here, *args).returncode == 0
    r = ptq("allocate", there, *args, "--ray", "auto", "--workers", "2")
    assert r.returncode == 0, r.stderr
    for name in ("plan.json", "sensitivity.json", "allocation.json"):
        assert (here / name).read_bytes() == (there / name).read_bytes(), name


def test_pareto_evaluations_on_two_local_ray_workers_give_the_same_points(tmp_path):
    here, there = _calibrated(tmp_path), tmp_path / "on_ray"
    shutil.copytree(here, there)
    args = ("--pareto", "--eval-data", ASSETS / "fashion_test.npz", "--eval-samples", 200, "--weight-candidates", "8,4")
    assert ptq("allocate", here, *args).returncode == 0
    r = ptq("allocate", there, *args, "--ray", "auto", "--workers", "2")
    assert r.returncode == 0, r.stderr
    points = (here / "pareto.csv").read_text()
    assert points.count("\n") > 4 and points == (there / "pareto.csv").read_text()


def test_calibration_in_four_shards_on_ray_writes_the_one_pass_statistics(tmp_path):
    """Four shards of whole batches (two workers), merged: histograms (entropy needs them) and the
    channel means bias correction reads (int4 weights) are those of one pass, bit for bit."""
    common = ("calibrate", ASSETS / "fashion_cnn.onnx", "--data", ASSETS / "fashion_calib.npz",
              "--weights", "int4", "--method", "entropy")
    assert ptq(*common, "-o", tmp_path / "one").returncode == 0
    r = ptq(*common, "-o", tmp_path / "shards", "--ray", "auto", "--workers", "2")
    assert r.returncode == 0, r.stderr
    for name in ("stats.npz", "plan.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "shards" / name).read_bytes(), name


def test_an_address_that_does_not_answer_fails_in_one_line_within_seconds(tmp_path):
    run = _calibrated(tmp_path)
    started = time.perf_counter()
    r = ptq("allocate", run, "--budget-bits", "5", "--ray", "127.0.0.1:9")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no Ray cluster answers there" in r.stderr
    assert time.perf_counter() - started < 30


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    run = _calibrated(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    r = ptq("allocate", run, "--budget-bits", "5", "--ray", "auto")
    assert r.returncode == 1 and "pip install 'ptqcli[ray]'" in r.stderr


def test_layers_sharing_an_input_round_on_two_local_ray_workers_to_the_same_plan(tmp_path):
    """An encoder's q/k/v (and its two feed-forward halves' inputs) are rounded side by side as Ray
    tasks; the plan is the one process's, bit for bit."""
    import json

    import numpy as np
    import onnx

    from builders import encoder_model

    model, data = tmp_path / "encoder.onnx", tmp_path / "x.npy"
    onnx.save(encoder_model(), str(model))
    np.save(data, np.random.default_rng(0).normal(0, 1, (32, 16, 32)).astype(np.float32))
    common = ("calibrate", model, "--data", data, "--num-samples", 32, "--weights", "int4", "--rounding", "adaround",
              "--iters", 100)
    assert ptq(*common, "-o", tmp_path / "one").returncode == 0
    r = ptq(*common, "-o", tmp_path / "ray", "--ray", "auto", "--workers", "2")
    assert r.returncode == 0, r.stderr
    for name in ("plan.json", "params.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    rounded = json.loads((tmp_path / "ray" / "rounding.json").read_text())["layers"]
    assert {"q_proj", "k_proj", "v_proj"} <= {row["node"] for row in rounded}
    assert all(row["loss_after"] <= row["loss_nearest"] for row in rounded)
