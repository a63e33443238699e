"""The install built the native operator library and ONNX Runtime accepts it.

This module is never skipped: a package whose native build failed (no compiler, no headers, a
runtime that refuses the library) fails here, with the reason the build or the runtime gave,
instead of passing quietly with the native tests skipped.
"""

import ctypes

from ptqcli import nativelib


def test_native_library_is_built():
    status = nativelib.status()
    assert status.available, f"the native operators cannot run: {status.reason}"
    assert status.api_version == 21 and status.isa in ("avx512-vnni", "avx2", "scalar")


# ---- the library's refusal of an older runtime, through a stand-in for ORT's OrtApiBase --------------

_CREATE_STATUS = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)
_GET_API = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
_VERSION = ctypes.CFUNCTYPE(ctypes.c_void_p)


class _OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", _GET_API), ("GetVersionString", _VERSION)]


def _register_with_runtime(newest_api: int, version: bytes) -> tuple[int | None, list, list]:
    """Call RegisterCustomOps with a runtime that serves C API 1..newest_api; its CreateStatus
    (the first entry of every OrtApi table) records what the library reports."""
    statuses, asked = [], []

    @_CREATE_STATUS
    def create_status(code, message):
        statuses.append((code, message.decode()))
        return 0x5EED

    table = (ctypes.c_void_p * 1)(ctypes.cast(create_status, ctypes.c_void_p).value)
    text = ctypes.create_string_buffer(version)

    @_GET_API
    def get_api(requested):
        asked.append(requested)
        return ctypes.addressof(table) if requested <= newest_api else None

    base = _OrtApiBase(get_api, _VERSION(lambda: ctypes.addressof(text)))
    lib = ctypes.CDLL(str(nativelib.require_library()))
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(_OrtApiBase)]
    return lib.RegisterCustomOps(None, ctypes.byref(base)), statuses, asked


def test_an_older_runtime_is_refused_in_one_line():
    result, statuses, asked = _register_with_runtime(20, b"1.20.1")
    assert asked[0] == nativelib.ort_api_version() == 21  # the version of the headers it was built with
    assert result == 0x5EED  # the failure status, not "registered"
    assert statuses == [(1, "ptqcli native operators need ONNX Runtime C API 21 (onnxruntime >= 1.21); "
                            "this runtime is 1.20.1")]  # 1 = ORT_FAIL


def test_registration_failure_is_a_one_line_error(monkeypatch):
    import onnxruntime as ort
    import pytest

    from ptqcli.errors import PtqError

    class Refusing:
        def register_custom_ops_library(self, path):
            raise ort.capi.onnxruntime_pybind11_state.Fail(
                "[ONNXRuntimeError] : 1 : FAIL : ptqcli native operators need ONNX Runtime C API 21 "
                "(onnxruntime >= 1.21); this runtime is 1.20.1")

    with pytest.raises(PtqError) as caught:
        nativelib.register(Refusing())
    assert str(caught.value) == (f"ONNX Runtime {ort.__version__} refused libptqcli_ops.so: ptqcli native operators "
                                 "need ONNX Runtime C API 21 (onnxruntime >= 1.21); this runtime is 1.20.1")
