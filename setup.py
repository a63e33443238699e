"""Builds native/ (the ONNX Runtime custom operators) with CMake as part of the package install.

Without a compiler, CMake or the ONNX Runtime headers the package still installs; ptqcli then says
that native export is unavailable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIBRARY = "libptqcli_ops.so"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).parent / LIBRARY
        try:
            built = build_native(ROOT / "build" / "native")
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            detail = exc.stderr.decode(errors="replace")[-2000:] if getattr(exc, "stderr", None) else ""
            print(f"ptqcli: native operators not built ({exc}); native export will be unavailable\n{detail}",
                  file=sys.stderr)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / "ptqcli" / LIBRARY)]

    def copy_extensions_to_source(self) -> None:
        built = ROOT / "build" / "native" / "cmake" / LIBRARY
        if built.exists():
            shutil.copy2(built, ROOT / "ptqcli" / LIBRARY)


def build_native(build_dir: Path, sanitize: bool = False) -> Path:
    sys.path.insert(0, str(ROOT / "native"))
    from ort_headers import find

    include = find(build_dir)
    cmake_dir = build_dir / ("cmake-sanitize" if sanitize else "cmake")
    configure = ["cmake", "-S", str(ROOT / "native"), "-B", str(cmake_dir), f"-DORT_INCLUDE_DIR={include}",
                 f"-DPTQ_SANITIZE={'ON' if sanitize else 'OFF'}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(cmake_dir), "--parallel", str(os.cpu_count() or 1)], check=True,
                   capture_output=True)
    return cmake_dir / LIBRARY


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "native-sanitize":
    print(build_native(ROOT / "build" / "native", sanitize=True))
else:
    setup(ext_modules=[Extension("ptqcli._native", sources=[])], cmdclass={"build_ext": CMakeBuild})
