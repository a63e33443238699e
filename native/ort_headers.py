"""Find or fetch the ONNX Runtime C/C++ API headers the custom-operator library compiles against.

No PyPI wheel and no Debian 12 package ships them; Debian 13 (trixie) has libonnxruntime-dev. It is
downloaded with apt under a private configuration (own sources list, lists and cache inside the
build tree; the system's apt set-up is left untouched), its checksum is checked against the one
recorded here, and it is unpacked with dpkg-deb. ORT_INCLUDE_DIR overrides all of this.

Usage: python native/ort_headers.py BUILD_DIR   -> prints the include directory, exit 1 if none.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "libonnxruntime-dev"
VERSION = "1.21.0+dfsg-1"
SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MARKER = "onnxruntime_cxx_api.h"


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(build_dir: Path) -> Path:
    """Download, verify and unpack the headers under build_dir; returns the include directory."""
    include = build_dir / "ort" / "usr" / "include" / "onnxruntime"
    if (include / MARKER).exists():
        return include
    mirror = _system_mirror()
    if mirror is None or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("no apt-get/dpkg-deb or Debian mirror to fetch the ONNX Runtime headers from; "
                           "set ORT_INCLUDE_DIR")
    root = build_dir / "apt"
    for sub in ("lists/partial", "archives/partial", "download"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
    options = _apt_options(root)
    subprocess.run(["apt-get", *options, "update"], check=True, capture_output=True)
    download = root / "download"
    subprocess.run(["apt-get", *options, "download", f"{PACKAGE}={VERSION}"], check=True,
                   capture_output=True, cwd=download)
    debs = sorted(download.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download produced no {PACKAGE} package")
    digest = _sha256(debs[-1])
    if digest != SHA256:
        raise RuntimeError(f"{debs[-1].name}: sha256 {digest} does not match the recorded {SHA256}")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(build_dir / "ort")], check=True)
    if not (include / MARKER).exists():
        raise RuntimeError(f"{debs[-1].name} has no {MARKER}")
    return include


def find(build_dir: Path) -> Path:
    override = os.environ.get("ORT_INCLUDE_DIR")
    if override:
        path = Path(override)
        if not (path / MARKER).exists():
            raise RuntimeError(f"ORT_INCLUDE_DIR={override} has no {MARKER}")
        return path
    return fetch(build_dir)


if __name__ == "__main__":
    try:
        print(find(Path(sys.argv[1] if len(sys.argv) > 1 else "build/native").resolve()))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"ONNX Runtime headers unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
