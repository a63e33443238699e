"""Independent pieces of work run in this process, or as Ray tasks when the user asks (`--ray`).

Ray is an optional extra (`pip install 'ptqcli[ray]'`). Work is shipped as a module-level function
and small arguments (paths, names): a task reads the model and data itself, so a cluster's workers
need ptqcli installed and the run directory and data on a path they can read. (Layer-wise
rounding ships each layer's arrays instead: they come from a walk of the quantized prefix that
only the caller has made.) Results come back
in the order the pieces were given, whichever worker ran them, so a run on Ray writes the same
bytes as one in this process.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from .errors import PtqError

T = TypeVar("T")
R = TypeVar("R")

# The ORT sessions of a Ray task use this many threads (runtime.session_options reads it): each
# task holds one CPU of the cluster, and ORT would otherwise start a thread per core of its machine.
THREADS_VARIABLE = "PTQ_SESSION_THREADS"
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Workers:
    """Where independent work runs: `ray` None (this process), "auto" (a local Ray of `count`
    CPUs) or a running cluster's address (host:port or ray://host:port)."""

    ray: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise PtqError(f"--workers must be at least 1 (got {self.count})")


def run_all(work: Callable[[T], R], pieces: Sequence[T], workers: Workers,
            advance: Callable[[int], None] = lambda n: None) -> list[R]:
    """work(piece) for every piece, in order; `advance(1)` as each one finishes."""
    if workers.ray is None:
        results = []
        for piece in pieces:
            results.append(work(piece))
            advance(1)
        return results
    ray = _ray(workers)
    task = ray.remote(num_cpus=1)(work)
    pending = {task.remote(piece): i for i, piece in enumerate(pieces)}
    results: list = [None] * len(pieces)
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            results[pending[ref]] = ray.get(ref)
            advance(1)
    return results


def _ray(workers: Workers):
    """Ray, connected: a local instance of `workers.count` CPUs, or the cluster at the address."""
    try:
        import ray
    except ImportError:
        raise PtqError("--ray needs Ray, an optional extra: pip install 'ptqcli[ray]'") from None
    if ray.is_initialized():
        return ray
    env = {"env_vars": {THREADS_VARIABLE: "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}
    if workers.ray == "auto":
        ray.init(num_cpus=workers.count, include_dashboard=False, log_to_driver=False, runtime_env=env)
    else:
        _check_reachable(workers.ray)
        try:
            with _stderr_silenced():  # Ray's C++ client logs every retry to the terminal
                ray.init(address=workers.ray, log_to_driver=False, runtime_env=env)
        except Exception as exc:  # noqa: BLE001  (Ray raises several kinds; the user needs one line)
            raise PtqError(f"--ray {workers.ray}: cannot join the Ray cluster there: {str(exc).splitlines()[0]}") from None
    return ray


@contextmanager
def _stderr_silenced():
    """File descriptor 2 sent to /dev/null for the duration (C++ libraries write to it directly)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _check_reachable(address: str) -> None:
    """A cluster address that does not answer fails here, within seconds (Ray itself retries for
    a minute or more)."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise PtqError(f"--ray takes auto or a cluster address host:port (got {address!r})")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise PtqError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def session_threads() -> int:
    """Intra-op threads for ORT sessions: what a Ray task was given, else ORT's default (0)."""
    value = os.environ.get(THREADS_VARIABLE, "")
    return int(value) if value.isdigit() else 0
