"""The ONNX Runtime C/C++ API headers the custom-operator library compiles against.

The library is built against ORT's C API 21 (ONNX Runtime 1.21.0): at registration it asks the
runtime for that API table and refuses an older runtime (native/src/ops.cpp). The build reads four
headers, onnxruntime_cxx_api.h and what it includes; HEADERS pins the sha256 of each as ONNX
Runtime 1.21.0 ships them. Every source below is checked against those digests, so any place that
holds the same bytes will do, and a build never compiles against other headers by accident.

Sources, tried in this order until one gives the pinned headers (PTQ_ORT_HEADER_SOURCES=a,b,...
picks and orders them, e.g. `debian` to exercise the download, or `tree,cache` for a build that
must not touch the network):
  tree    native/third_party/onnxruntime/include, in this source tree and in the sdist. It exists
          so that the build needs no network, no particular OS and no mirror's good will: the
          day a package revision leaves a mirror, this still builds.
  cache   ~/.cache/ptqcli/ort-headers/1.21.0 (PTQ_ORT_CACHE overrides), filled by every build
          that took the headers from `system` or `debian`. It exists for trees without the bundled
          copy (a distribution strips bundled third-party files): one download, then offline.
  system  <prefix>/include/onnxruntime of this Python or the system (/usr, /usr/local): a
          libonnxruntime-dev the machine already has, used only when it is this exact release.
  debian  libonnxruntime-dev from Debian 13 (trixie), downloaded with apt under a private
          configuration inside the build tree (the system's apt set-up is left untouched) and
          unpacked with dpkg-deb. The recorded revision is tried first, with its package sha256;
          then any other revision of 1.21.0 the suite has, accepted on the header digests alone,
          so a rebuild (+dfsg-2, +deb13u1) keeps working when 1.21.0+dfsg-1 leaves the mirror.

There is no pip source: no PyPI package ships these headers. The onnxruntime wheels (1.21 to 1.32
looked at) carry the shared library and the Python bindings only, and the onnxruntime-extensions,
onnxruntime-genai and onnx-extended wheels no ORT C API header either.

ORT_INCLUDE_DIR=/path takes precedence over all of them: headers you have, of any release whose C
API is at least 21 (the library then asks the runtime for that version). They are not checked by
digest, since you chose them.

Usage: python native/ort_headers.py BUILD_DIR   -> prints the include directory, exit 1 if none.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ORT_VERSION = "1.21.0"
API_VERSION = 21
HEADERS = {
    "onnxruntime_c_api.h": "7783e9664bdb0b1b36145b5c8587dd1bc9a399aa000edf2e3dd03003cafc6882",
    "onnxruntime_cxx_api.h": "b3b27d6a6fced0725e3f188379cca008b1d7a456997684756374d4b388f2cf05",
    "onnxruntime_cxx_inline.h": "7f448e994c732eacd9e49900365fefa8f1ac998a6d6eb78e5f4aab1b8d9d8900",
    "onnxruntime_float16.h": "6c4db3d1954b266c4febe413351af86cac922e3448538e7e452e51d646e56a4a",
}
MARKER = "onnxruntime_cxx_api.h"
TREE = Path(__file__).resolve().parent / "third_party" / "onnxruntime" / "include"
SOURCES = ("tree", "cache", "system", "debian")
SYSTEM_PREFIXES = ("/usr", "/usr/local")

PACKAGE = "libonnxruntime-dev"
REVISION = "1.21.0+dfsg-1"
PACKAGE_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Headers:
    """Where the build found its headers: the include directory, the source, and the C API they declare."""

    include: str
    source: str
    api_version: int
    ort_version: str | None  # None for ORT_INCLUDE_DIR: a release we did not pin

    def to_dict(self) -> dict:
        return asdict(self)


class Skip(Exception):
    """One source could not give the headers; the message says why."""


def declared_api_version(include: Path) -> int | None:
    """The ORT_API_VERSION a header directory declares."""
    try:
        text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"^#define ORT_API_VERSION (\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def mismatch(include: Path) -> str | None:
    """Why a directory does not hold the pinned headers, or None when it does."""
    for name, digest in HEADERS.items():
        path = include / name
        if not path.is_file():
            return f"{path} is missing"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            return f"{path} has sha256 {actual[:12]}..., not ONNX Runtime {ORT_VERSION}'s {digest[:12]}..."
    return None


def _checked(include: Path) -> Path:
    why = mismatch(include)
    if why:
        raise Skip(why)
    return include


def cache_dir() -> Path:
    override = os.environ.get("PTQ_ORT_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ptqcli" / "ort-headers" / ORT_VERSION


def _tree(build_dir: Path) -> Path:
    return _checked(TREE)


def _cache(build_dir: Path) -> Path:
    return _checked(cache_dir())


def _system(build_dir: Path) -> Path:
    tried = []
    prefixes = tuple(dict.fromkeys((sys.prefix, *SYSTEM_PREFIXES)))
    for prefix in prefixes:
        include = Path(prefix) / "include" / "onnxruntime"
        if (include / MARKER).exists():
            why = mismatch(include)
            if why is None:
                return include
            tried.append(why)
    raise Skip("; ".join(tried) or f"no include/onnxruntime under {', '.join(prefixes)}")


def remember(include: Path) -> None:
    """Copy verified headers into the cache (best effort: a read-only home only loses the cache)."""
    target = cache_dir()
    if mismatch(target) is None:
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        for name in HEADERS:
            shutil.copy2(include / name, staging / name)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError:
        pass


# ---- Debian ----------------------------------------------------------------------------------------

def _system_mirror() -> str | None:
    """The Debian mirror the system already uses, so no host is hard-wired here."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[-2]:
                return next(p for p in parts[1:] if "://" in p)
    return None


def _apt_options(root: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={root / 'lists'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", f"Dir::Cache::Archives={root / 'archives'}",
        "-o", "Dir::Cache::pkgcache=",
        "-o", "Dir::Cache::srcpkgcache=",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise Skip(f"{' '.join(command[:1] + command[-2:])} failed: {detail[-1] if detail else exc.returncode}") from None


def _revisions(options: list[str]) -> list[str]:
    """The recorded revision first, then every other 1.21.0 revision the suite lists."""
    listed = _run(["apt-cache", *options, "madison", PACKAGE]).stdout
    found = [parts[1].strip() for parts in (line.split("|") for line in listed.splitlines()) if len(parts) > 2]
    others = [v for v in found if v.split("+")[0].split("-")[0] == ORT_VERSION and v != REVISION]
    return [REVISION, *dict.fromkeys(others)]


def _debian(build_dir: Path) -> Path:
    mirror = _system_mirror()
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing or mirror is None:
        raise Skip(f"no {', '.join(missing)} on this system" if missing else "no Debian mirror configured in apt")
    root = build_dir / "apt"
    for sub in ("lists/partial", "archives/partial", "download"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    options = _apt_options(root)
    _run(["apt-get", *options, "update"])
    download = root / "download"
    why = []
    for revision in _revisions(options):
        for old in download.glob("*.deb"):
            old.unlink()
        try:
            _run(["apt-get", *options, "download", f"{PACKAGE}={revision}"], cwd=download)
        except Skip as exc:
            why.append(f"{revision}: {exc}")
            continue
        deb = next(iter(sorted(download.glob(f"{PACKAGE}_*.deb"))), None)
        if deb is None:
            why.append(f"{revision}: apt-get download produced no package")
            continue
        if revision == REVISION:
            digest = hashlib.sha256(deb.read_bytes()).hexdigest()
            if digest != PACKAGE_SHA256:
                why.append(f"{deb.name}: sha256 {digest[:12]}... is not the recorded {PACKAGE_SHA256[:12]}...")
                continue
        unpacked = build_dir / "ort" / revision
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        include = unpacked / "usr" / "include" / "onnxruntime"
        problem = mismatch(include)
        if problem is None:
            return include
        why.append(f"{revision}: {problem}")
    raise Skip(f"{PACKAGE} from {SUITE}: " + "; ".join(why))


FETCHERS = {"tree": _tree, "cache": _cache, "system": _system, "debian": _debian}


def sources() -> tuple[str, ...]:
    text = os.environ.get("PTQ_ORT_HEADER_SOURCES")
    if text is None:
        return SOURCES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FETCHERS]
    if unknown or not names:
        raise RuntimeError(f"PTQ_ORT_HEADER_SOURCES={text!r}: name sources from {', '.join(SOURCES)}")
    return names


def find(build_dir: Path) -> Headers:
    """The headers to build with; RuntimeError naming every source tried and why it gave none."""
    override = os.environ.get("ORT_INCLUDE_DIR")
    if override:
        path = Path(override)
        if not (path / MARKER).exists():
            raise RuntimeError(f"ORT_INCLUDE_DIR={override} has no {MARKER}")
        api = declared_api_version(path)
        if api is None or api < API_VERSION:
            raise RuntimeError(f"ORT_INCLUDE_DIR={override} declares C API {api}; the library needs {API_VERSION} "
                               f"(ONNX Runtime {ORT_VERSION}) or newer")
        return Headers(str(path.resolve()), "ORT_INCLUDE_DIR", api, None)
    why = []
    for name in sources():
        try:
            include = FETCHERS[name](build_dir)
        except (Skip, OSError) as exc:
            why.append(f"{name}: {exc}")
            continue
        if name in ("system", "debian"):
            remember(include)
        return Headers(str(include.resolve()), name, API_VERSION, ORT_VERSION)
    raise RuntimeError(f"no source gave the ONNX Runtime {ORT_VERSION} headers ({'; '.join(why)}); "
                       "set ORT_INCLUDE_DIR to headers you have")


if __name__ == "__main__":
    try:
        found = find(Path(sys.argv[1] if len(sys.argv) > 1 else "build/native").resolve())
    except RuntimeError as exc:
        print(f"ONNX Runtime headers unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
    print(found.include)
