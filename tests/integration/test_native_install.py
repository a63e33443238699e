"""Installing ptqcli builds the native operators, or says loudly why it did not.

A source tree without the bundled headers, on a machine without a Debian mirror or a header cache,
cannot build them: the install still succeeds (or fails, with PTQ_NATIVE_REQUIRED=1), the build
record names every header source and why it gave nothing, and the never-skipped native test fails
with that reason. The sdist carries everything the build needs and builds on its own (slow).
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.cli_runner import run_in_process

ROOT = Path(__file__).resolve().parents[2]
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")

# setup.py build_ext on a machine whose apt knows no Debian mirror (ort_headers is imported first,
# so setup.py's own import finds this patched module).
NO_MIRROR_BUILD = """
import runpy, sys
sys.path.insert(0, "native")
import ort_headers
ort_headers._system_mirror = lambda: None
sys.argv = ["setup.py", "build_ext", "--build-lib", sys.argv[1], "--build-temp", sys.argv[2]]
runpy.run_path("setup.py", run_name="__main__")
"""


def stripped_tree(tmp_path: Path) -> Path:
    """This source tree as a distribution might repackage it: native/third_party removed."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "native", src / "native", ignore=shutil.ignore_patterns("third_party"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    return src


def build_without_headers(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    src = stripped_tree(tmp_path)
    environ = {**os.environ, "PTQ_ORT_CACHE": str(tmp_path / "empty-cache"),
               "PTQ_ORT_HEADER_SOURCES": "tree,cache,debian", **env}
    environ.pop("ORT_INCLUDE_DIR", None)
    return subprocess.run([sys.executable, "-c", NO_MIRROR_BUILD, str(tmp_path / "lib"), str(tmp_path / "temp")],
                          cwd=src, env=environ, capture_output=True, text=True, timeout=300)


def test_a_build_without_headers_is_recorded_and_fails_the_native_test(tmp_path, monkeypatch):
    result = build_without_headers(tmp_path)
    assert result.returncode == 0, result.stderr  # the package itself still installs
    package = tmp_path / "lib" / "ptqcli"
    record = json.loads((package / "native_build.json").read_text())
    assert record["built"] is False and not (package / "libptqcli_ops.so").exists()
    error = record["error"]
    assert error.startswith("no source gave the ONNX Runtime 1.21.0 headers (tree: ")
    assert "third_party/onnxruntime/include/onnxruntime_c_api.h is missing" in error
    assert f"cache: {tmp_path / 'empty-cache' / 'onnxruntime_c_api.h'} is missing" in error
    assert "debian: no Debian mirror configured in apt" in error
    assert f"ptqcli: native operators not built: {error}" in result.stderr

    # The never-skipped native test fails, and says why.
    library = package / "libptqcli_ops.so"
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "unit" / "test_native_build.py") + "::test_native_library_is_built"],
                          cwd=ROOT, env={**os.environ, "PTQ_NATIVE_LIB": str(library)}, capture_output=True, text=True,
                          timeout=300)
    assert test.returncode == 1
    assert f"the native operators cannot run: the build failed: {error}" in test.stdout

    # So does `ptq doctor`, and native export names the build's error.
    monkeypatch.setenv("PTQ_NATIVE_LIB", str(library))
    doctor = run_in_process("doctor")
    assert doctor.returncode == 1
    assert doctor.stderr.strip().startswith("error: native operators unavailable: the build failed: no source gave")
    from ptqcli import nativelib
    from ptqcli.errors import PtqError

    with pytest.raises(PtqError, match=r"native operators are not built .*\(the build said: no source gave"):
        nativelib.require_library()


def test_a_required_build_fails_the_install(tmp_path):
    result = build_without_headers(tmp_path, PTQ_NATIVE_REQUIRED="1")
    assert result.returncode != 0
    assert "PTQ_NATIVE_REQUIRED=1 and the native operators did not build: no source gave" in result.stderr


@pytest.mark.slow
def test_the_sdist_builds_the_library_on_its_own(tmp_path, monkeypatch):
    """sdist -> fresh venv -> pip install: headers from the bundled copy, CMake and Ninja from PyPI."""
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    sdist = next((tmp_path / "dist").glob("ptqcli-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "native/CMakeLists.txt", "native/ort_headers.py", "native/src/ops.cpp",
                   "native/src/kernels.cpp", "native/third_party/onnxruntime/LICENSE",
                   *(f"native/third_party/onnxruntime/include/{h}" for h in HEADERS)):
        assert needed in names, needed
    assert not [n for n in names if n.endswith(".so") or n.endswith("native_build.json")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    environ = {**os.environ, "PTQ_NATIVE_REQUIRED": "1", "PTQ_ORT_CACHE": str(tmp_path / "cache")}
    environ.pop("ORT_INCLUDE_DIR", None)
    environ.pop("PTQ_ORT_HEADER_SOURCES", None)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", str(sdist)], env=environ,
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    package = next(venv.glob("lib/python3*/site-packages/ptqcli"))
    record = json.loads((package / "native_build.json").read_text())
    assert record["built"] is True and record["headers"]["source"] == "tree"
    assert record["headers"]["api_version"] == 21 and record["headers"]["ort_version"] == "1.21.0"
    for tool in ("cmake", "ninja"):  # from the isolated build environment, not the system
        assert "pip-build-env" in record["tools"][tool], record["tools"]

    from ptqcli import nativelib

    monkeypatch.setenv("PTQ_NATIVE_LIB", str(package / "libptqcli_ops.so"))
    status = nativelib.status()
    assert status.available, status.reason
    assert status.api_version == 21 and status.build == record
