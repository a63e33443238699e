"""What the side-by-side benchmarks share: quantizers run as child processes under a memory limit
(wall time and peak RSS measured), latency timed with the models taking turns, and the machine and
source described the same way in every report."""

from __future__ import annotations

import os
import platform
import resource
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def thread_env(threads: int) -> dict:
    """The environment of a child: BLAS/OpenMP pools no larger than ORT's."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def spawn(cmd: list[str], log: Path, cwd: Path, threads: int, mem_limit_gb: float,
          timeout_s: int) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a child under an address-space limit; (result, wall s, peak RSS MB from os.wait4). Its
    output goes to `log` with the command line and the measurements."""
    limit = int(mem_limit_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out_path, err_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=thread_env(threads), cwd=cwd, stdout=out, stderr=err, text=True,
                                preexec_fn=cap)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        timer.cancel()
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    if elapsed >= timeout_s:
        stderr += f"\ntimeout after {timeout_s} s"
    log.write_text(f"$ {shlex.join(cmd)}\n[exit {code}, {elapsed:.1f}s, peak RSS {usage.ru_maxrss / 1024:.0f} MB]\n"
                   f"{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, code, stdout, stderr), elapsed, usage.ru_maxrss / 1024


def failure(proc: subprocess.CompletedProcess, mem_limit_gb: float, timeout_s: int) -> str:
    """A failed child's one-line reason."""
    text = proc.stdout + proc.stderr
    if "MemoryError" in text or "Unable to allocate" in text or "bad_alloc" in text or proc.returncode == -9:
        return f"OOM (> {mem_limit_gb:g} GB)"
    if "timeout after" in text:
        return f"timeout (> {timeout_s} s)"
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip() and not ln.startswith("[")), "")
    return last.removeprefix("error: ").removeprefix("internal error: ").split(" (set PTQ_DEBUG")[0] or \
        f"exit code {proc.returncode}"


def take_turns(runs: dict[str, Callable[[int], None]], samples: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each `runs[name](i)` over `samples` inputs: every round times every
    model on all samples, the model order rotating, so machine noise hits all alike."""
    names = list(runs)
    for name in names:
        for i in range(warmup):
            runs[name](i % samples)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            for i in range(samples):
                t0 = time.perf_counter()
                runs[name](i)
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def cpu_description() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == (platform.processor() or platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    return f"{name} ({os.cpu_count()} logical CPUs; {isa})"


def _git(*a: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()


def ptq_source() -> str:
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "ptqcli")
    state = f"with {len(dirty.splitlines())} uncommitted change(s) under ptqcli/" if dirty else "clean"
    return f"working tree at commit {head} ({state})"
