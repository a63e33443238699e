"""The compiled custom-operator library (native/): where it is, and sessions that have it registered."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PtqError
from .formats import FORMATS
from .geometry import MATRIX_OPS

DOMAIN = "ptqcli"
# The operators the library registers: each weight format's kernel family (the format table), and
# Binary for binarized inputs, times each weighted op (the layer geometry). The library's own list
# (native/src/ops.cpp, kOps) is read by `library_operators`; a test holds the two equal.
BINARY_FAMILY = "Binary"
OPERATORS = tuple(f"{family}{op}"
                  for family in (*dict.fromkeys(f.native for f in FORMATS.values() if f.native), BINARY_FAMILY)
                  for op in MATRIX_OPS)
LIBRARY = "libptqcli_ops.so"
UNAVAILABLE = ("native operators are not built (no C++ compiler, CMake or ONNX Runtime headers at install "
               "time); reinstall with them, or set ORT_INCLUDE_DIR to headers you have")


def library_path() -> Path | None:
    """PTQ_NATIVE_LIB overrides (e.g. a sanitizer build); else the library installed beside the package."""
    override = os.environ.get("PTQ_NATIVE_LIB")
    if override:
        return Path(override) if Path(override).exists() else None
    path = Path(__file__).resolve().parent / LIBRARY
    return path if path.exists() else None


def available() -> bool:
    return library_path() is not None


def require_library() -> Path:
    path = library_path()
    if path is None:
        raise PtqError(UNAVAILABLE)
    return path


def instruction_set() -> str:
    """The kernel path the library takes on this CPU: avx512-vnni, avx2 or scalar."""
    import ctypes

    lib = ctypes.CDLL(str(require_library()))
    lib.PtqNativeIsa.restype = ctypes.c_char_p
    return lib.PtqNativeIsa().decode()


def library_operators() -> tuple[str, ...]:
    """The operator names the compiled library registers."""
    import ctypes

    lib = ctypes.CDLL(str(require_library()))
    lib.PtqNativeOperators.restype = ctypes.c_char_p
    return tuple(lib.PtqNativeOperators().decode().split(","))


def register(options) -> None:
    """Make an onnxruntime.SessionOptions able to run the ptqcli operators."""
    options.register_custom_ops_library(str(require_library()))


def session_options(threads: int = 0):
    """SessionOptions with the library registered: the one place it is registered."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    register(options)
    if threads:
        options.intra_op_num_threads = threads
    return options


def session(model, threads: int = 0):
    """An ONNX Runtime CPU session with the ptqcli operators registered; model is a path or bytes."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
