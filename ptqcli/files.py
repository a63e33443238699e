"""Writing files so that a failure never leaves a half-written output behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import PtqError


def _temp_beside(target: Path) -> tuple[int, str]:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise PtqError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise PtqError(f"output folder is not writable: {folder}")
    try:
        return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PtqError(f"cannot write to {folder}: {exc.strerror}") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_writable(target: str | os.PathLike) -> None:
    """Fail before hours of work, not after: create and remove a temp file where the output goes."""
    fd, tmp = _temp_beside(Path(target))
    os.close(fd)
    os.unlink(tmp)


def write_atomic(target: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """A temp file in the target's folder, renamed over the target only once it is complete. `data`
    is the bytes, or a function that writes them to the open file (large outputs need no copy in
    memory)."""
    path = Path(target)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise PtqError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
