"""The compiled custom-operator library (native/): where it is, whether it runs, and sessions that have it registered."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PtqError
from .formats import FORMATS
from .geometry import MATRIX_OPS

DOMAIN = "ptqcli"
# The operators the library registers: each weight format's kernel family (the format table), and
# Binary for binarized inputs, times each weighted op (the layer geometry); and the integer LSTM
# (ptqcli/recurrent.py). The library's own list (native/src/ops.cpp) is read by
# `library_operators`; a test holds the two equal.
BINARY_FAMILY = "Binary"
MATRIX_OPERATORS = tuple(f"{family}{op}"
                         for family in (*dict.fromkeys(f.native for f in FORMATS.values() if f.native), BINARY_FAMILY)
                         for op in MATRIX_OPS)
INT_LSTM = "IntLSTM"
OPERATORS = (*MATRIX_OPERATORS, INT_LSTM)
LIBRARY = "libptqcli_ops.so"
# Written by setup.py beside the library on every build: built or not, why not, which headers.
BUILD_RECORD = "native_build.json"
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


def build_record() -> dict | None:
    """What the build of native/ left beside the library (the package's, or PTQ_NATIVE_LIB's):
    {"built", "error", "headers"}, or None (no record)."""
    override = os.environ.get("PTQ_NATIVE_LIB")
    path = (Path(override).parent if override else Path(__file__).resolve().parent) / BUILD_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def require_library() -> Path:
    path = library_path()
    if path is None:
        raise PtqError(f"{UNAVAILABLE}{_build_error()}")
    return path


def _build_error() -> str:
    record = build_record()
    if not record or record.get("built") or not record.get("error"):
        return ""
    return f" (the build said: {record['error']})"


def ort_api_version() -> int:
    """The ONNX Runtime C API version the library was compiled against, and asks the runtime for."""
    import ctypes

    lib = ctypes.CDLL(str(require_library()))
    try:
        function = lib.PtqNativeOrtApiVersion
    except AttributeError:
        raise PtqError(f"{require_library()} predates PtqNativeOrtApiVersion: rebuild it (pip install .)") from None
    function.restype = ctypes.c_int
    return int(function())


@dataclass(frozen=True)
class Status:
    """Whether the operators can run here, and why not when they cannot."""

    available: bool
    library: Path | None
    reason: str | None
    api_version: int | None      # the C API the library asks for
    runtime: str                 # the installed onnxruntime version
    isa: str | None
    build: dict | None


def status() -> Status:
    """Load the library, ask it its API version and kernel path, and register it with ONNX Runtime."""
    import onnxruntime as ort

    record = build_record()
    path = library_path()
    if path is None:
        override = os.environ.get("PTQ_NATIVE_LIB")
        why = (f"the build failed: {record['error']}" if record and not record.get("built") else
               f"PTQ_NATIVE_LIB={override} does not exist" if override else
               f"no {LIBRARY} beside the package and no build record: the install did not build native/")
        return Status(False, None, why, None, ort.__version__, None, record)
    try:
        api = ort_api_version()
        isa = instruction_set()
        register(ort.SessionOptions())
    except (OSError, PtqError) as exc:
        return Status(False, path, str(exc), None, ort.__version__, None, record)
    return Status(True, path, None, api, ort.__version__, isa, record)


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
    """Make an onnxruntime.SessionOptions able to run the ptqcli operators; a runtime that refuses
    them (older than the library's C API) is a one-line PtqError."""
    path = require_library()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # ORT raises its own exception types
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[-1]) if lines else type(exc).__name__
        raise PtqError(f"ONNX Runtime {_runtime()} refused {path.name}: {why}") from None


def _runtime() -> str:
    import onnxruntime as ort

    return ort.__version__


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
