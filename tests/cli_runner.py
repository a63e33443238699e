"""Two ways to run the `ptq` command in tests, both returning a subprocess.CompletedProcess.

`run_installed(*args)` starts the installed console script, as a user would. Each run pays for a
fresh interpreter importing onnx, onnxruntime and numpy (about two seconds), so only a few tests
use it, to keep the entry point covered.

`run_in_process(*args)` does what that console script does, inside the test process: it sets
sys.argv, calls ptqcli.cli.main() and turns what ends it into an exit code the way the interpreter
does (SystemExit's code; an uncaught exception goes to sys.excepthook, which typer has set to print
its traceback, and gives 1). File descriptors 1 and 2, and sys.stdout and sys.stderr with them,
point at temporary files meanwhile, so stdout and stderr hold what the subprocess would have
written, output from ONNX Runtime's C++ side included. Python warnings are shown on that stderr
as a fresh interpreter would show them, not collected by pytest.
"""

from __future__ import annotations

import contextlib
import io
import locale
import os
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

PTQ = str(Path(sys.executable).parent / "ptq")


def run_installed(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PTQ] + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def run_in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    argv = [PTQ] + [str(a) for a in args]
    encoding = locale.getpreferredencoding(False)  # what subprocess.run(text=True) decodes with
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        with _redirected(1, out_file, "stdout", encoding, "strict"), \
                _redirected(2, err_file, "stderr", encoding, "backslashreplace"), \
                _fresh_interpreter_state(argv, cwd):
            code = _run_main()
        return subprocess.CompletedProcess(argv, code, _read(out_file, encoding), _read(err_file, encoding))


def _run_main() -> int:
    try:
        from ptqcli.cli import main

        raise SystemExit(main())  # the console script: sys.exit(main())
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:  # what an uncaught exception does to a process (Ctrl-C still stops pytest)
        sys.excepthook(*sys.exc_info())
        return 1


@contextlib.contextmanager
def _redirected(fd: int, file, name: str, encoding: str, errors: str):
    """Point file descriptor `fd` and sys.<name> at `file` (a binary temporary file)."""
    previous = getattr(sys, name)
    previous.flush()
    saved = os.dup(fd)
    os.dup2(file.fileno(), fd)
    stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=encoding, errors=errors,
                              write_through=True)
    setattr(sys, name, stream)
    try:
        yield
    finally:
        stream.flush()
        setattr(sys, name, previous)
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def _fresh_interpreter_state(argv: list[str], cwd):
    """sys.argv, __main__ (click names the program from both), the working directory, warning display
    and the excepthook as a new `ptq` process has them."""
    old_argv, old_main, old_hook, old_cwd = sys.argv, sys.modules["__main__"], sys.excepthook, os.getcwd()
    script = types.ModuleType("__main__")  # the console script: a file, not `python -m pytest`'s package
    script.__file__ = argv[0]
    sys.argv, sys.modules["__main__"] = argv, script
    if cwd is not None:
        os.chdir(cwd)
    try:
        with warnings.catch_warnings(), _consoles_on_pipes():
            _interpreter_warning_filters()
            warnings.showwarning = _show_warning
            yield
    finally:
        sys.argv, sys.modules["__main__"], sys.excepthook = old_argv, old_main, old_hook
        os.chdir(old_cwd)


def _interpreter_warning_filters() -> None:
    """The filters a new interpreter starts with (CPython's defaults, then -W and PYTHONWARNINGS in
    front), in place of pytest's; changing them also forgets which warnings were already shown."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)
    warnings._processoptions(sys.warnoptions)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _consoles_on_pipes():
    """ptqcli's rich consoles choose colours once, when created. A subprocess creates them on pipes;
    one created here on a terminal (`pytest -s`) is swapped, for the run, for one created now."""
    from rich.console import Console

    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "ptqcli" or name.startswith("ptqcli.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, Console) and value.color_system is not None:
                swapped.append((module, attr, value))
                setattr(module, attr, Console(stderr=value.stderr))
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


def _read(file, encoding: str) -> str:
    file.seek(0)
    # subprocess.run(text=True) reads with universal newlines
    return file.read().decode(encoding).replace("\r\n", "\n").replace("\r", "\n")
