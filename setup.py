"""Builds native/ (the ONNX Runtime custom operators) with CMake as part of the package install.

Without a compiler the package still installs, and says why: every build writes
`ptqcli/native_build.json` (built or not, the error, where the ONNX Runtime headers came from),
which `ptq doctor` reports and `tests/unit/test_native_build.py` fails on. PTQ_NATIVE_REQUIRED=1
makes a failed build fail the install instead. CMake and Ninja come from PyPI as build requirements
(pyproject.toml); the headers from native/ort_headers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIBRARY = "libptqcli_ops.so"
RECORD = "native_build.json"
BUILD_DIR = ROOT / "build" / "native"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        package = Path(self.get_ext_fullpath(ext.name)).parent
        package.mkdir(parents=True, exist_ok=True)
        (package / LIBRARY).unlink(missing_ok=True)  # a failed build must not leave an older library behind
        try:
            built, facts = build_native(BUILD_DIR)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            detail = (exc.stderr or exc.stdout or "") if isinstance(exc, subprocess.CalledProcessError) else ""
            error = _one_line(exc, detail)
            _write_record(package, {"built": False, "error": error})
            print(f"ptqcli: native operators not built: {error}; native export will be unavailable\n{detail[-2000:]}",
                  file=sys.stderr)
            if os.environ.get("PTQ_NATIVE_REQUIRED") == "1":
                raise SystemExit(f"ptqcli: PTQ_NATIVE_REQUIRED=1 and the native operators did not build: {error}")
            return
        shutil.copy2(built, package / LIBRARY)
        _write_record(package, {"built": True, "error": None, **facts})

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / "ptqcli" / name) for name in (LIBRARY, RECORD)]

    def copy_extensions_to_source(self) -> None:
        record = json.loads((BUILD_DIR / RECORD).read_text()) if (BUILD_DIR / RECORD).exists() else None
        built = BUILD_DIR / "cmake" / LIBRARY
        if record is not None:
            shutil.copy2(BUILD_DIR / RECORD, ROOT / "ptqcli" / RECORD)
        if record is not None and record["built"] and built.exists():
            shutil.copy2(built, ROOT / "ptqcli" / LIBRARY)
        elif record is not None:
            (ROOT / "ptqcli" / LIBRARY).unlink(missing_ok=True)


def _one_line(exc: BaseException, detail: str) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        lines = [line for line in detail.splitlines() if "error" in line.lower()] or detail.splitlines()
        return f"{Path(exc.cmd[0]).name} exited {exc.returncode}" + (f": {lines[0].strip()}" if lines else "")
    return str(exc)


def _write_record(package: Path, record: dict) -> None:
    text = json.dumps(record, indent=1) + "\n"
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    (BUILD_DIR / RECORD).write_text(text)
    (package / RECORD).write_text(text)


def _tool(name: str) -> str:
    """CMake and Ninja: from the build environment's PyPI packages, else from PATH."""
    try:
        module = __import__(name)
        path = Path(getattr(module, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR")) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name}: install the build requirements (pip installs them from pyproject.toml)")
    return found


def build_native(build_dir: Path, sanitize: bool = False) -> tuple[Path, dict]:
    """Configure and build the library; returns its path, and the headers and tools it was built with."""
    sys.path.insert(0, str(ROOT / "native"))
    from ort_headers import find

    headers = find(build_dir)
    cmake_dir = build_dir / ("cmake-sanitize" if sanitize else "cmake")
    cmake = _tool("cmake")
    configure = [cmake, "-S", str(ROOT / "native"), "-B", str(cmake_dir), f"-DORT_INCLUDE_DIR={headers.include}",
                 f"-DPTQ_SANITIZE={'ON' if sanitize else 'OFF'}"]
    tools = {"cmake": cmake}
    try:
        tools["ninja"] = _tool("ninja")
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}"]
        generator = "Ninja"
    except RuntimeError:
        generator = "Unix Makefiles"  # CMake's default
    cache = cmake_dir / "CMakeCache.txt"
    cached = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache.read_text(), re.MULTILINE) if cache.exists() else None
    if cached and cached.group(1) != generator:
        shutil.rmtree(cmake_dir)  # a build tree cannot switch generators
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run([cmake, "--build", str(cmake_dir), "--parallel", str(os.cpu_count() or 1)], check=True,
                   capture_output=True, text=True)
    return cmake_dir / LIBRARY, {"headers": headers.to_dict(), "tools": tools}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "native-sanitize":
    print(build_native(BUILD_DIR, sanitize=True)[0])
else:
    setup(ext_modules=[Extension("ptqcli._native", sources=[])], cmdclass={"build_ext": CMakeBuild})
