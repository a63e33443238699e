"""Where the native build takes the ONNX Runtime headers from (native/ort_headers.py): each source
checked against the pinned digests, tried in order, and a clear error naming every source when
none gives them. Machines without a Debian mirror, apt or a cache are simulated here."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def headers(monkeypatch, tmp_path):
    """A fresh copy of the module, with an empty cache and every override unset."""
    spec = importlib.util.spec_from_file_location("ort_headers_under_test", ROOT / "native" / "ort_headers.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    for name in ("ORT_INCLUDE_DIR", "PTQ_ORT_HEADER_SOURCES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PTQ_ORT_CACHE", str(tmp_path / "cache"))
    return module


def no_mirror(module, monkeypatch):
    """A machine whose apt knows no Debian mirror."""
    monkeypatch.setattr(module, "_system_mirror", lambda: None)


def test_the_bundled_headers_are_the_pinned_release(headers):
    assert headers.mismatch(headers.TREE) is None
    assert headers.declared_api_version(headers.TREE) == headers.API_VERSION == 21
    assert sorted(p.name for p in headers.TREE.iterdir()) == sorted(headers.HEADERS)
    # ops.cpp includes only the C++ API header, which includes the other three
    assert '#include <onnxruntime_cxx_api.h>' in (ROOT / "native" / "src" / "ops.cpp").read_text()


def test_without_a_mirror_the_build_takes_the_bundled_copy(headers, monkeypatch, tmp_path):
    no_mirror(headers, monkeypatch)
    monkeypatch.setenv("PTQ_ORT_HEADER_SOURCES", "debian,tree")  # the download first: it fails, then the copy
    found = headers.find(tmp_path / "build")
    assert (found.source, found.api_version, found.ort_version) == ("tree", 21, "1.21.0")
    assert Path(found.include) == headers.TREE
    assert not (tmp_path / "build").exists()  # nothing was downloaded or unpacked


def test_no_source_is_one_error_naming_each_source(headers, monkeypatch, tmp_path):
    no_mirror(headers, monkeypatch)
    monkeypatch.setattr(headers, "TREE", tmp_path / "stripped")  # a tree without the bundled copy
    monkeypatch.setattr(headers.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(headers, "SYSTEM_PREFIXES", (str(tmp_path / "usr"),))  # no libonnxruntime-dev installed
    with pytest.raises(RuntimeError) as caught:
        headers.find(tmp_path / "build")
    message = str(caught.value)
    assert message.startswith("no source gave the ONNX Runtime 1.21.0 headers (tree: ")
    assert f"cache: {tmp_path / 'cache' / 'onnxruntime_c_api.h'} is missing" in message
    assert f"system: no include/onnxruntime under {tmp_path}, {tmp_path / 'usr'}" in message
    assert "debian: no Debian mirror configured in apt" in message
    assert message.endswith("set ORT_INCLUDE_DIR to headers you have")


def test_an_edited_copy_is_refused_and_the_cache_serves(headers, monkeypatch, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(headers.TREE, edited)
    with open(edited / "onnxruntime_c_api.h", "a") as f:
        f.write("\n// local change\n")
    monkeypatch.setattr(headers, "TREE", edited)
    monkeypatch.setenv("PTQ_ORT_HEADER_SOURCES", "tree,cache")
    with pytest.raises(RuntimeError, match=r"tree: .*onnxruntime_c_api.h has sha256 .*, not ONNX Runtime 1.21.0's"):
        headers.find(tmp_path / "build")
    headers.remember(ROOT / "native" / "third_party" / "onnxruntime" / "include")  # as a download would
    found = headers.find(tmp_path / "build")
    assert found.source == "cache" and Path(found.include) == tmp_path / "cache"
    assert headers.mismatch(tmp_path / "cache") is None


class FakeApt:
    """apt-get, apt-cache and dpkg-deb for a suite that lists `revisions`; `headers_of` gives the
    header directory each revision's package unpacks (None: the download fails)."""

    def __init__(self, module, revisions, headers_of):
        self.module, self.revisions, self.headers_of, self.calls = module, revisions, headers_of, []

    def __call__(self, command, **kwargs):
        self.calls.append(command[0] if command[0] != "apt-get" else f"apt-get {command[-1]}")
        import subprocess

        if command[0] == "apt-cache":
            rows = "".join(f"libonnxruntime-dev | {r} | mirror trixie/main amd64 Packages\n" for r in self.revisions)
            return subprocess.CompletedProcess(command, 0, rows, "")
        if command[0] == "apt-get" and command[-2] == "download":
            revision = command[-1].split("=", 1)[1]
            if revision not in self.revisions or self.headers_of(revision) is None:
                raise self.module.Skip(f"apt-get download {command[-1]} failed: E: Version '{revision}' not found")
            (Path(kwargs["cwd"]) / f"libonnxruntime-dev_{revision}_amd64.deb").write_bytes(revision.encode())
        if command[0] == "dpkg-deb":
            revision = Path(command[2]).name.split("_")[1]
            shutil.copytree(self.headers_of(revision), Path(command[3]) / "usr" / "include" / "onnxruntime")
        return subprocess.CompletedProcess(command, 0, "", "")


def debian_machine(module, monkeypatch, fake):
    monkeypatch.setattr(module, "_system_mirror", lambda: "http://mirror.invalid/debian")
    monkeypatch.setattr(module.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(module, "_run", fake)
    monkeypatch.setenv("PTQ_ORT_HEADER_SOURCES", "debian")


def test_debian_takes_another_revision_with_the_same_headers(headers, monkeypatch, tmp_path):
    """The recorded revision left the mirror; a rebuild of 1.21.0 with identical headers is used and cached."""
    fake = FakeApt(headers, ["1.21.0+dfsg-2"], lambda revision: headers.TREE)
    debian_machine(headers, monkeypatch, fake)
    found = headers.find(tmp_path / "build")
    assert found.source == "debian"
    assert Path(found.include) == tmp_path / "build" / "ort" / "1.21.0+dfsg-2" / "usr" / "include" / "onnxruntime"
    assert fake.calls == ["apt-get update", "apt-cache", "apt-get libonnxruntime-dev=1.21.0+dfsg-1",
                          "apt-get libonnxruntime-dev=1.21.0+dfsg-2", "dpkg-deb"]
    assert headers.mismatch(tmp_path / "cache") is None  # the next build needs no mirror


def test_debian_refuses_headers_that_differ(headers, monkeypatch, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(headers.TREE, other)
    (other / "onnxruntime_float16.h").write_text("// another release\n")
    fake = FakeApt(headers, [headers.REVISION, "1.21.0+dfsg-3"],
                   lambda revision: other if revision.endswith("3") else headers.TREE)
    debian_machine(headers, monkeypatch, fake)
    with pytest.raises(RuntimeError) as caught:
        headers.find(tmp_path / "build")
    message = str(caught.value)
    # the recorded revision's package is checked by its own sha256 as well (this fake one fails it)
    assert "1.21.0+dfsg-1_amd64.deb: sha256" in message and "is not the recorded 14f7d959d5de" in message
    assert "1.21.0+dfsg-3: " in message and "onnxruntime_float16.h has sha256" in message
    assert not (tmp_path / "cache").exists()


def test_include_dir_override_is_checked_for_its_api_version(headers, monkeypatch, tmp_path):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(headers.TREE))
    found = headers.find(tmp_path / "build")
    assert (found.source, found.api_version, found.ort_version) == ("ORT_INCLUDE_DIR", 21, None)
    old = tmp_path / "old"
    shutil.copytree(headers.TREE, old)
    text = (old / "onnxruntime_c_api.h").read_text().replace("#define ORT_API_VERSION 21", "#define ORT_API_VERSION 20")
    (old / "onnxruntime_c_api.h").write_text(text)
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(old))
    with pytest.raises(RuntimeError, match="declares C API 20; the library needs 21"):
        headers.find(tmp_path / "build")


def test_unknown_source_names_are_refused(headers, monkeypatch, tmp_path):
    monkeypatch.setenv("PTQ_ORT_HEADER_SOURCES", "tree,pip")
    with pytest.raises(RuntimeError, match="name sources from tree, cache, system, debian"):
        headers.find(tmp_path / "build")


def test_the_script_prints_the_include_directory(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "native" / "ort_headers.py"), str(tmp_path)],
                            capture_output=True, text=True, env={"PTQ_ORT_HEADER_SOURCES": "tree", "PATH": ""})
    assert result.returncode == 0 and Path(result.stdout.strip()) == ROOT / "native" / "third_party" / "onnxruntime" / "include"
