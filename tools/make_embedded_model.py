"""Build the small embedded default model and data shipped with ptqcli.

The assets are a compact Fashion-MNIST classifier plus matching calibration
and evaluation samples, so the tool can run a complete quantize-and-evaluate
round trip without any user-supplied files:

* ``fashion_cnn.onnx``   -- opset-13 CNN (three Conv-BN-ReLU stages, global
  average pooling, two Gemm layers). BatchNormalization is deliberately kept
  as separate nodes rather than folded into the convolutions, so that the
  BN-handling paths of the quantizer are exercised. Input ``input`` is
  float32 ``[N, 1, 28, 28]`` with pixel values scaled to ``[0, 1]``
  (``pixel / 255``); output ``logits`` is float32 ``[N, 10]``.
* ``fashion_calib.npz``  -- key ``input``: 512 training images, float32
  ``[512, 1, 28, 28]``. They are the last 512 images of the training set,
  which are held out from training.
* ``fashion_test.npz``   -- keys ``input`` (float32 ``[2000, 1, 28, 28]``)
  and ``labels`` (int64 ``[2000]``): the first 2000 images of the test set.

The data is Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, MIT licence) as
installed by the Debian package ``dataset-fashion-mnist`` under
``/usr/share/datasets/fashion-mnist``.

Training runs on the CPU with fixed seeds, deterministic algorithms and a
single thread, so repeated runs give the same weights. To regenerate the
assets (a few minutes on one core)::

    apt-get install dataset-fashion-mnist
    python tools/make_embedded_model.py --out-dir ptqcli/assets --epochs 15
"""

from __future__ import annotations

import argparse
import gzip
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SEED = 0
NUM_CALIB = 512
NUM_TEST_SLICE = 2000
BATCH_SIZE = 128
OPSET = 13
NUM_BN = 3


# --------------------------------------------------------------------------- data


def read_idx(path: Path, magic: int, header_len: int) -> np.ndarray:
    """Read a gzipped IDX file (the original MNIST container format)."""
    raw = gzip.decompress(path.read_bytes())
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic {found:#x}, expected {magic:#x}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return images as float32 [N,1,28,28] in [0,1] and labels as int64 [N]."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz", 0x803, 16)
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz", 0x801, 8)
    images = images.reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    labels = labels.astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip plus a shift of up to 2 pixels.

    Garments are left/right symmetric enough that flipping keeps the label,
    and small shifts make up for the dataset's tight centring.
    """
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = 2
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    # One offset per batch keeps this a cheap slice; batches are small enough
    # that the variety across batches is plenty.
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


# -------------------------------------------------------------------------- model


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class FashionCNN(nn.Module):
    """28x28 -> 14x14 -> 7x7 feature maps, then GAP and a two-layer head.

    Conv biases are kept (even though BN would absorb them) so the graph has
    the ordinary Conv-with-bias form most exported models have.
    """

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = conv_block(1, 16, pool=True)
        self.block2 = conv_block(16, 32, pool=True)
        self.block3 = conv_block(32, 64, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = self.flatten(self.pool(x))
        return self.fc2(self.relu(self.fc1(x)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------- training


def set_determinism() -> torch.Generator:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    # One thread: reproducible reductions, and leaves the other cores free.
    torch.set_num_threads(1)
    return torch.Generator().manual_seed(SEED)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, gen: torch.Generator
) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total_loss, correct = 0.0, 0
        start = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            xb, yb = augment(xt[idx], gen), yt[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(xt):.4f} "
            f"train acc {correct / len(xt):.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )


@torch.no_grad()
def torch_predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i : i + 1000])) for i in range(0, len(x), 1000)]
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------- export


def export_onnx(model: nn.Module) -> onnx.ModelProto:
    """Export with BatchNormalization kept as separate inference-mode nodes.

    TrainingMode.EVAL would let the exporter fuse BN into the preceding Conv;
    PRESERVE with the model in eval() keeps the BN nodes, and since the model
    is in eval() they carry no training_mode flag. Constant folding is off
    because it is what performs that fusion.
    """
    model.eval()
    buf = io.BytesIO()
    # The TorchScript exporter is chosen on purpose (one plain node per layer,
    # BN kept via PRESERVE), so its deprecation notice is only noise here.
    warnings.filterwarnings(
        "ignore", "You are using the legacy TorchScript", DeprecationWarning
    )
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        buf,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=OPSET,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    return onnx.load_from_string(buf.getvalue())


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give nodes and intermediate tensors short, stable, readable names.

    The exporter names nodes after the module path (``/block1/block1.0/Conv``);
    rewriting them as ``block1.conv`` style names makes per-layer reports of
    the quantizer easier to read and keeps them identical across exports.
    """
    graph = model.graph
    if any(n.op_type in ("Identity", "Constant") for n in graph.node):
        raise RuntimeError("unexpected Identity/Constant nodes in exported graph")

    role = {
        "Conv": "conv",
        "BatchNormalization": "bn",
        "Relu": "relu",
        "MaxPool": "pool",
        "GlobalAveragePool": "gap",
        "Flatten": "flatten",
        "Gemm": "fc",
    }
    counts: dict[str, int] = {}
    renamed: dict[str, str] = {}
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        base = role.get(node.op_type, node.op_type.lower())
        counts[base] = counts.get(base, 0) + 1
        node.name = f"{base}{counts[base]}"
        node.doc_string = ""
        for i, out in enumerate(node.output):
            if out not in graph_outputs:
                single = len(node.output) == 1
                renamed[out] = node.name if single else f"{node.name}_{i}"
                node.output[i] = renamed[out]
    for node in graph.node:
        for i, inp in enumerate(node.input):
            node.input[i] = renamed.get(inp, inp)

    # Initializer names follow the PyTorch state_dict; map them onto the node
    # names so weights read as conv1.weight, bn1.running_mean, fc2.bias ...
    init_names = {}
    for node in graph.node:
        params = node.input[1:]
        suffixes = {
            "Conv": ["weight", "bias"],
            "Gemm": ["weight", "bias"],
            "BatchNormalization": ["scale", "bias", "mean", "var"],
        }.get(node.op_type, [])
        for name, suffix in zip(params, suffixes):
            init_names[name] = f"{node.name}.{suffix}"
    for init in graph.initializer:
        init.name = init_names.get(init.name, init.name)
    for node in graph.node:
        for i, inp in enumerate(node.input):
            node.input[i] = init_names.get(inp, inp)

    del graph.value_info[:]
    model.doc_string = ""
    graph.name = "fashion_cnn"
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def check_graph(model: onnx.ModelProto) -> None:
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if len(bns) != NUM_BN:
        raise RuntimeError(f"expected {NUM_BN} BN nodes, found {len(bns)}")
    for bn in bns:
        for attr in bn.attribute:
            if attr.name == "training_mode" and onnx.helper.get_attribute_value(attr):
                raise RuntimeError(f"{bn.name} is exported in training mode")
        if len(bn.output) != 1:
            raise RuntimeError(f"{bn.name} has training-only outputs")


def ort_predict(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    out = [session.run(["logits"], {"input": x[i : i + 1000]})[0]
           for i in range(0, len(x), 1000)]
    return np.concatenate(out)


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("ptqcli/assets"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    gen = set_determinism()

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")
    # Hold the calibration images out of training so that calibration sees
    # data the model has not memorised, as it would in real use.
    x_fit, y_fit = x_train[:-NUM_CALIB], y_train[:-NUM_CALIB]
    x_calib = x_train[-NUM_CALIB:]

    model = FashionCNN()
    print(f"parameters: {count_params(model)}")
    start = time.perf_counter()
    train(model, x_fit, y_fit, args.epochs, gen)
    print(f"training time: {time.perf_counter() - start:.0f}s")

    onnx_model = clean_graph(export_onnx(model))
    check_graph(onnx_model)
    session = make_session(onnx_model)

    ort_logits = ort_predict(session, x_test)
    diff = float(np.abs(ort_logits - torch_predict(model, x_test)).max())
    print(f"max |onnxruntime - torch| on test set: {diff:.2e}")
    if diff >= 1e-4:
        raise RuntimeError("onnxruntime output does not match torch")

    print(f"float top-1, full test set ({len(y_test)}): {top1(ort_logits, y_test):.4f}")
    n = NUM_TEST_SLICE
    print(f"float top-1, first {n} test images: {top1(ort_logits[:n], y_test[:n]):.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, args.out_dir / "fashion_cnn.onnx")
    np.savez_compressed(args.out_dir / "fashion_calib.npz", input=x_calib)
    np.savez_compressed(
        args.out_dir / "fashion_test.npz", input=x_test[:n], labels=y_test[:n]
    )
    for name in ("fashion_cnn.onnx", "fashion_calib.npz", "fashion_test.npz"):
        path = args.out_dir / name
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
