"""How stages report progress: a context manager per stage, given a description and a total (None if
unknown), that yields an `advance(n, note=None)` callable. The CLI passes a rich one; library callers
get silence by default."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

Progress = Callable[[str, "int | None"], ContextManager[Callable[..., None]]]


@contextlib.contextmanager
def silent(description: str, total: int | None):
    yield lambda n, note=None: None
