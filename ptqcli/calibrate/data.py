"""Calibration and evaluation data: an iterator of input dicts, streamed from files.

Sources are a `.npy` (single-input models), a `.npz` keyed by input names, an image file folder,
or a folder of `.npy`/`.npz` files. The first axis of an array is the sample axis. Nothing is
read before it is needed and nothing is kept after it is fed, so memory does not grow with the
number of samples.

Some inputs have no sample axis: a recurrent state [2, batch, 128], a scalar sample rate, a
configuration tensor. Such an input is fed as the file gives it, the same value for every sample
of that file; the model then runs one sample at a time (where its batch sits in a state is the
model's business).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from onnx import ModelProto, TensorProto, helper

from ..config import DataConfig
from ..errors import PtqError
from ..graph import Graph
from ..runtime import feeds_for, run_session, session

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_SUFFIXES = {".npy", ".npz"}
LABEL_KEYS = ("labels", "label", "y")
_CHUNK = 256  # samples read from an array file at a time


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # per-sample dims included; None for a dynamic dim
    dtype: np.dtype
    # Token ids: the rows of the embedding table this integer input indexes (None for other inputs).
    vocabulary: int | None = None
    # Axis 0 indexes samples. False: the input is fed as the data gives it (states, scalars).
    batched: bool = True

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.batched and self.shape and isinstance(self.shape[0], int) else None

    def sample_shape(self) -> tuple:
        return tuple(self.shape[1:]) if self.batched else tuple(self.shape)


def model_inputs(g: Graph) -> list[InputSpec]:
    vocabularies = embedding_vocabularies(g)
    shapes = {}
    for vi in g.graph_inputs:
        tt = vi.type.tensor_type
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                for d in tt.shape.dim)
    batch_dim = _batch_dim(list(shapes.values()))
    return [InputSpec(vi.name, shapes[vi.name],
                      np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)),
                      vocabularies.get(vi.name),
                      batched=bool(shapes[vi.name]) and shapes[vi.name][0] == batch_dim and not _batch_named_later(vi))
            for vi in g.graph_inputs]


_BATCH_NAMES = frozenset({"batch", "batch_size", "batchsize", "n", "b", "num_batch"})


def _batch_named_later(vi) -> bool:
    """The exporter named a later dimension the batch (a time-major sequence [T, N, F], a state
    [layers, batch, hidden]) and not the first one."""
    names = [d.dim_param.strip().lower() if d.HasField("dim_param") else "" for d in vi.type.tensor_type.shape.dim]
    return bool(names) and names[0] not in _BATCH_NAMES and any(n in _BATCH_NAMES for n in names[1:])


def _batch_dim(shapes: list[tuple]) -> int | None:
    """The first dimension that marks an input as batched: dynamic (None) when any input's first
    dimension is, else the first input's fixed one. An input whose first dimension differs (a state
    [2, batch, 128] beside samples [batch, 512]) or that has none (a scalar) is not batched."""
    firsts = [shape[0] for shape in shapes if shape]
    if not firsts or None in firsts:
        return None
    return firsts[0]


def has_unbatched(inputs: list[InputSpec]) -> bool:
    return any(not spec.batched for spec in inputs)


# Ops that hand integer ids on unchanged (type or layout only): token ids may pass through them on
# the way to their embedding Gather (int32 casts, flattening to [N*T]).
_ID_PRESERVING_OPS = frozenset({"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def embedding_vocabularies(g: Graph) -> dict[str, int]:
    """Token-id inputs: each integer graph input whose values index a float embedding table through
    Gather (directly or through ops that only move ids), mapped to the number of rows of that table
    (the smallest one when it indexes several)."""
    found = {}
    for vi in g.graph_inputs:
        if np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).kind not in "iu":
            continue
        rows = _embedding_rows_reached(g, vi.name)
        if rows:
            found[vi.name] = min(rows)
    return found


def _embedding_rows_reached(g: Graph, name: str) -> list[int]:
    """Rows of the 2-D float tables that `name` (or an id-preserving copy of it) indexes through Gather."""
    rows, pending, seen = [], [name], {name}
    while pending:
        tensor = pending.pop()
        for node in g.consumers.get(tensor, []):
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[1] == tensor:
                table = g.initializers.get(node.input[0])
                if table is not None and table.data_type in _FLOAT_TYPES and len(table.dims) == 2:
                    rows.append(int(table.dims[_gather_axis(node) % len(table.dims)]))
            elif node.op_type in _ID_PRESERVING_OPS and node.input[0] == tensor:
                fresh = [out for out in node.output if out and out not in seen]
                seen.update(fresh)
                pending.extend(fresh)
    return rows


def _gather_axis(node) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)


@dataclass(frozen=True)
class Chunk:
    """Some consecutive samples: one array per model input, and labels when the source has them."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    # Inputs without a sample axis, as the file gives them: one value for all of `arrays`' samples.
    given: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 1


def iter_chunks(path: str | Path, inputs: list[InputSpec], cfg: DataConfig,
                model: ModelProto | None = None) -> Iterator[Chunk]:
    """Stream chunks of validated samples from a file or folder (with --feedback, one sample a
    chunk, each file a stream stepped through `model`)."""
    p = Path(path)
    if not p.exists():
        raise PtqError(f"data path not found: {p}")
    step = _feedback_step(model, inputs, cfg) if cfg.feedback else None
    files = _files_of(p)
    image_files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    array_files = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES]
    if image_files:
        yield from _image_chunks(image_files, inputs, cfg)
    for f in array_files:
        chunks = _array_chunks(f, inputs)
        yield from chunks if step is None else _stepped(chunks, cfg.feedback_pairs(), step, inputs, f)


Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _feedback_step(model: ModelProto | None, inputs: list[InputSpec], cfg: DataConfig) -> Step:
    """A float run of the model that returns the outputs fed back, after checking the pairs."""
    if model is None:
        raise PtqError("--feedback needs the model to step through")
    pairs = cfg.feedback_pairs()
    outputs = [o.name for o in model.graph.output]
    for input_name, output_name in pairs.items():
        if output_name not in outputs:
            raise PtqError(f"--feedback {output_name}={input_name}: the model has no output '{output_name}' "
                           f"(outputs: {', '.join(outputs)})")
        if input_name not in {spec.name for spec in inputs}:
            raise PtqError(f"--feedback {output_name}={input_name}: the model has no input '{input_name}' "
                           f"(inputs: {', '.join(spec.name for spec in inputs)})")
    sess, wanted = session(model), sorted(set(pairs.values()))
    return lambda feeds: dict(zip(wanted, run_session(sess, wanted, feeds)))


def _stepped(chunks: Iterator[Chunk], pairs: dict[str, str], step: Step, inputs: list[InputSpec],
             path: Path) -> Iterator[Chunk]:
    """The file's samples one at a time, in order, each fed the outputs of the step before."""
    specs = {spec.name: spec for spec in inputs}
    carried: dict[str, np.ndarray] = {}
    for chunk in chunks:
        for i in range(len(chunk)):
            one = _slice(chunk, i, i + 1)
            if carried:
                arrays = {**one.arrays, **{k: v for k, v in carried.items() if k in one.arrays}}
                given = {**one.given, **{k: v for k, v in carried.items() if k in one.given}}
                one = Chunk(arrays, one.labels, given)
            outputs = step({**one.arrays, **one.given})
            carried = {name: _fed_back(outputs[out], specs[name], out, path) for name, out in pairs.items()}
            yield one


def _fed_back(value: np.ndarray, spec: InputSpec, output: str, path: Path) -> np.ndarray:
    shape = spec.shape if not spec.batched else (1, *spec.sample_shape())
    if value.ndim != len(shape) or any(d is not None and d != v for d, v in zip(shape, value.shape)):
        raise PtqError(f"{path.name}: --feedback {output}={spec.name}: output '{output}' has shape "
                       f"{tuple(value.shape)}, input '{spec.name}' takes {shape_text(shape)}")
    return np.ascontiguousarray(value, dtype=spec.dtype)


def _files_of(p: Path) -> list[Path]:
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES | ARRAY_SUFFIXES:
            raise PtqError(f"unsupported data file {p.name}: expected .npy, .npz or an image")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
    if not files:
        raise PtqError(f"no images or .npy/.npz files in {p}")
    return files


def _array_chunks(path: Path, inputs: list[InputSpec]) -> Iterator[Chunk]:
    arrays, labels = _open_arrays(path, inputs)
    given = {spec.name: _conform_given(arrays[spec.name], spec, path) for spec in inputs if not spec.batched}
    counts = {len(arrays[spec.name]) for spec in inputs if spec.batched}
    if len(counts) > 1:
        raise PtqError(f"{path.name}: inputs have different sample counts {sorted(counts)}")
    total = counts.pop() if counts else 1
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
        chunk = {spec.name: _conform(arrays[spec.name][start:stop], spec, path) for spec in inputs if spec.batched}
        yield Chunk(chunk, None if labels is None else np.asarray(labels[start:stop]), given)


def _open_arrays(path: Path, inputs: list[InputSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        if path.suffix.lower() == ".npy":
            if len(inputs) != 1:
                names = ", ".join(s.name for s in inputs)
                raise PtqError(f"{path.name}: a .npy feeds a single-input model; this one has inputs {names} (use .npz)")
            return {inputs[0].name: _as_samples(open_npy(path), inputs[0], path)}, None
        npz = open_npz(path)
        keys = list(npz)
    except PtqError:
        raise
    except Exception as exc:
        raise PtqError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    data_keys = [k for k in keys if k != label_key]
    if len(inputs) == 1 and inputs[0].name not in keys and len(data_keys) == 1:
        mapping = {inputs[0].name: data_keys[0]}  # one array for one input: the name need not match
    else:
        missing = [s.name for s in inputs if s.name not in keys]
        if missing:
            raise PtqError(f"{path.name} has no array for input(s) {', '.join(missing)} (keys: {', '.join(keys)})")
        mapping = {s.name: s.name for s in inputs}
    arrays = {s.name: _as_samples(npz[mapping[s.name]], s, path) for s in inputs}
    return arrays, (npz[label_key][:] if label_key else None)


def _as_samples(a, spec: InputSpec, path: Path):
    """A lone sample (rank one less than the input) becomes a batch of one."""
    if spec.batched and a.ndim == len(spec.shape) - 1:
        return np.asarray(a[...])[None]
    return a


def open_npy(path: Path):
    with open(path, "rb") as fh:
        shape, fortran, dtype = _npy_header(fh)
        offset = fh.tell()
    if fortran or dtype == object:
        return np.load(path)
    return _FileArray(path, offset, shape, dtype)


class _FileArray:
    """An uncompressed array on disk whose sample slices are read when asked for.

    Plain reads rather than a memory map: mapped pages would count as the process's memory
    and grow with every sample read.
    """

    def __init__(self, path: Path, offset: int, shape: tuple, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __getitem__(self, index):
        if not isinstance(index, slice) or not self.shape:
            return np.fromfile(self.path, dtype=self.dtype, count=int(np.prod(self.shape)),
                               offset=self.offset).reshape(self.shape)[index]
        start, stop, _ = index.indices(len(self))
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        values = np.fromfile(self.path, dtype=self.dtype, count=(stop - start) * row,
                             offset=self.offset + start * row * self.dtype.itemsize)
        return values.reshape((stop - start, *self.shape[1:]))


def open_npz(path: Path) -> dict:
    """The arrays of an .npz without reading them: stored members are read by offset,
    compressed ones forward as slices are asked for."""
    arrays = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as fh:
                shape, fortran, dtype = _npy_header(fh)
                header_len = fh.tell()
            key = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED and not fortran and dtype != object:
                arrays[key] = _FileArray(path, _member_data_offset(path, info) + header_len, shape, dtype)
            else:
                arrays[key] = _ForwardNpy(path, info.filename, shape, dtype, header_len, fortran)
    return arrays


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


class _ForwardNpy:
    """A compressed .npy member read sequentially: slices must move forward through the samples."""

    def __init__(self, path: Path, member: str, shape: tuple, dtype: np.dtype, header_len: int, fortran: bool):
        self.path, self.member, self.shape, self.dtype = path, member, shape, dtype
        self.header_len, self.fortran = header_len, fortran
        self.ndim = len(shape)
        self._zip = self._fh = None
        self._pos = 0

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def _whole(self) -> np.ndarray:
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)

    def __getitem__(self, index):
        if self.fortran or not isinstance(index, slice) or not self.shape:
            return self._whole()[index]
        start, stop, _ = index.indices(len(self))
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self._fh is None or start < self._pos:
            self._open()
        if start > self._pos:
            self._read((start - self._pos) * row)
        data = self._read((stop - start) * row)
        self._pos = stop
        if self._pos >= len(self):
            self._fh.close()
            self._zip.close()
            self._fh = self._zip = None
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def _open(self) -> None:
        self._zip = zipfile.ZipFile(self.path)
        self._fh = self._zip.open(self.member)
        self._fh.read(self.header_len)
        self._pos = 0

    def _read(self, n: int) -> bytes:
        chunks, left = [], n
        while left > 0:
            chunk = self._fh.read(left)
            if not chunk:
                raise PtqError(f"{self.path.name}: array '{self.member[:-4]}' is truncated")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def shape_text(dims: tuple) -> str:
    """A shape as the messages print it, dynamic dimensions as '?': (2, ?, 128)."""
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + (",)" if len(dims) == 1 else ")")


def _conform(a: np.ndarray, spec: InputSpec, where: Path | str) -> np.ndarray:
    expected = spec.sample_shape()
    got = tuple(a.shape[1:])
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        what = "samples of shape" if spec.batched else "(no sample axis: fed as given) shape"
        raise PtqError(f"{Path(str(where)).name}: input '{spec.name}' expects {what} {shape_text(expected)}, "
                       f"data has {got}")
    if a.dtype != spec.dtype:
        same_kind = (a.dtype.kind == "f" and spec.dtype.kind == "f") or (
            a.dtype.kind in "iu" and spec.dtype.kind in "iu"
        )
        if not same_kind:
            ids = " (token ids: whole numbers)" if spec.vocabulary is not None else ""
            raise PtqError(f"{Path(str(where)).name}: input '{spec.name}' expects {spec.dtype}, data is {a.dtype}{ids}")
    if spec.vocabulary is not None:
        _check_token_ids(a, spec, where)
    return np.ascontiguousarray(a, dtype=spec.dtype)


def _conform_given(a, spec: InputSpec, where: Path) -> np.ndarray:
    """An input without a sample axis: the file's array is the value fed, checked against the whole
    input shape."""
    return _conform(np.asarray(a[...])[None], spec, where)[0, ...]


def _check_token_ids(ids: np.ndarray, spec: InputSpec, where: Path | str) -> None:
    """Ids past the embedding table stop ORT mid-run with a message about Gather indices; negative
    ids are valid ONNX (counted from the table's end) but no tokenizer writes them: both are bad data."""
    if ids.size == 0:
        return
    smallest, largest = int(np.min(ids)), int(np.max(ids))
    size, file = spec.vocabulary, Path(str(where)).name
    if largest >= size:
        raise PtqError(f"{file}: input '{spec.name}' holds token ids up to {largest}, beyond its vocabulary of "
                       f"{size} (the rows of the embedding table it indexes: ids 0..{size - 1})")
    if smallest < 0:
        raise PtqError(f"{file}: input '{spec.name}' holds negative token id {smallest}; its vocabulary of "
                       f"{size} takes ids 0..{size - 1}")


def _image_chunks(files: list[Path], inputs: list[InputSpec], cfg: DataConfig) -> Iterator[Chunk]:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise PtqError("image folders feed models with a single 4-D image input; use .npz for this model")
    spec = inputs[0]
    layout = _layout(spec, cfg)
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    height, width = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    if not all(isinstance(v, int) for v in (channels, height, width)):
        raise PtqError(f"input '{spec.name}' has dynamic image dims {spec.shape}; image folders need fixed ones")
    color = cfg.color if cfg.color != "auto" else ("gray" if channels == 1 else "rgb")
    mean = _per_channel(cfg.mean, channels, "--mean")
    std = _per_channel(cfg.std, channels, "--std")
    for start in range(0, len(files), _CHUNK):
        batch = [_load_image(f, color, height, width, cfg.resize) for f in files[start : start + _CHUNK]]
        x = (np.stack(batch).astype(np.float32) - mean) / std  # N, H, W, C
        if layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        yield Chunk({spec.name: _pixels_as_input(x, spec)})


def _pixels_as_input(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Normalised pixels in the input's dtype. An integer input takes them only when the cast loses
    nothing (e.g. uint8 pixels with --mean 0 --std 1): anything else would be truncated silently."""
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if np.any(x != np.round(x)) or x.min() < info.min or x.max() > info.max:
            raise PtqError(f"input '{spec.name}' expects {spec.dtype}, images give float32 values from "
                           f"{x.min():g} to {x.max():g} after --mean/--std (whole numbers in the {spec.dtype} range "
                           f"are needed: e.g. --mean 0 --std 1 for 0..255 pixels)")
    return np.ascontiguousarray(x, dtype=spec.dtype)


def _layout(spec: InputSpec, cfg: DataConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if spec.shape[1] in (1, 3, 4):
        return "NCHW"
    if spec.shape[3] in (1, 3, 4):
        return "NHWC"
    raise PtqError(f"cannot tell the layout of input '{spec.name}' {spec.shape}; pass --layout NCHW or NHWC")


def _per_channel(values: tuple, channels: int, flag: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise PtqError(f"{flag} has {len(values)} values; the model's images have {channels} channels")
    return np.asarray(values, dtype=np.float32)


def _load_image(path: Path, color: str, height: int, width: int, resize: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if color == "gray" else "RGB")
            if resize:
                scale = resize / min(img.size)
                img = img.resize((max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale))),
                                 Image.BILINEAR)
                left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
                img = img.crop((left, top, left + width, top + height))
            else:
                img = img.resize((width, height), Image.BILINEAR)
            a = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise PtqError(f"cannot read image {path.name}: {exc}") from None
    if a.ndim == 2:
        a = a[..., None]
    return a[..., ::-1] if color == "bgr" else a


def count_samples(path: str | Path, inputs: list[InputSpec] | None = None, cfg: DataConfig | None = None) -> int | None:
    """Samples available, read from file headers only (None when it cannot be told cheaply). With
    the model's inputs, samples are counted along an input that has a sample axis; a model with
    none (or --whole-feeds) takes one feed per file."""
    p = Path(path)
    try:
        files = _files_of(p)
    except PtqError:
        return None
    if inputs is not None and cfg is not None and cfg.whole_feeds:
        inputs = [replace(spec, batched=False) for spec in inputs]
    batched = None if inputs is None else [spec.name for spec in inputs if spec.batched]
    total = 0
    for f in files:
        suffix = f.suffix.lower()
        if suffix in IMAGE_SUFFIXES or batched == []:
            total += 1
        elif suffix == ".npy":
            total += len(open_npy(f))
        else:
            n = _npz_first_dim(f, batched)
            if n is None:
                return None
            total += n
    return total


def _npz_first_dim(path: Path, keys: list[str] | None) -> int | None:
    try:
        arrays = open_npz(path)
    except Exception:
        return None
    for key, a in arrays.items():
        if key not in LABEL_KEYS and (keys is None or key in keys or len(keys) == 1 and len(arrays) == 1):
            return a.shape[0] if a.shape else 1
    return None


@dataclass(frozen=True)
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    given: frozenset[str] = frozenset()  # inputs without a sample axis, fed as the data gave them

    @property
    def size(self) -> int:
        """Samples in the batch."""
        batched = [v for k, v in self.feeds.items() if k not in self.given]
        return len(batched[0]) if batched and batched[0].ndim else 1

    def rows(self, lo: int, hi: int) -> "Batch":
        """Samples lo..hi (inputs without a sample axis go with every slice)."""
        return Batch({k: v if k in self.given else v[lo:hi] for k, v in self.feeds.items()},
                     None if self.labels is None else self.labels[lo:hi], self.given)


def iter_batches(
    path: str | Path, inputs: list[InputSpec], cfg: DataConfig, limit: int, skip: int = 0,
    model: ModelProto | None = None,
) -> Iterator[Batch]:
    """Batches of `cfg.batch_size` samples (or the model's fixed batch), after skipping `skip` samples.

    A model with a fixed batch dimension is fed exactly that many samples per run; a remainder
    smaller than it is dropped. A model with inputs that have no sample axis, or with --feedback,
    runs one sample at a time; `model` is the float model --feedback steps through.
    """
    if cfg.whole_feeds:
        inputs = [replace(spec, batched=False) for spec in inputs]
    fixed = {s.fixed_batch for s in inputs}
    fixed.discard(None)
    if len(fixed) > 1:
        raise PtqError(f"inputs have different fixed batch sizes {sorted(fixed)}")
    size = fixed.pop() if fixed else 1 if has_unbatched(inputs) or cfg.feedback else cfg.batch_size
    pending: list[Chunk] = []
    held, seen, emitted = 0, 0, 0
    for chunk in iter_chunks(path, inputs, cfg, model):
        lo = max(0, skip - seen)
        seen += len(chunk)
        if lo >= len(chunk):
            continue
        if lo:
            chunk = _slice(chunk, lo, len(chunk))
        pending.append(chunk)
        held += len(chunk)
        while held >= size and emitted < limit:
            take = min(size, limit - emitted)
            batch, pending = _pop(pending, take)
            held -= take
            emitted += take
            if take == size or not fixed:
                yield batch
        if emitted >= limit:
            return
    if held and emitted < limit and not fixed:
        take = min(held, limit - emitted)
        batch, _ = _pop(pending, take)
        yield batch


# What one run's outputs may take (calibration's observed activations, fidelity's model and layer
# outputs): 16 images of 640x640 with every activation, or a language model's logits for 16
# sequences, would take gigabytes. ORT keeps each session's arena at its largest run, so this
# bounds the arenas too: EfficientNet-Lite0's export with fidelity on 500 images peaked at 0.81 GB
# at 64 MB against 1.95 GB at 256 MB, and ran faster (61 s against 73 s).
RUN_BYTES = 64 * 2**20


def bounded_runs(batches: Iterable[Batch], rows: Callable[[], int | None]) -> Iterator[Batch]:
    """The batches cut into runs of at most rows() samples; until rows() knows (None), one sample
    a run, to measure."""
    for batch in batches:
        n = batch.size
        start = 0
        while start < n:
            stop = min(n, start + (rows() or 1))
            yield batch.rows(start, stop)
            start = stop


def runs_within_memory(g: Graph, batches: list[Batch], tensors: list[str]) -> list[Batch]:
    """The batches cut into runs whose `tensors` take at most RUN_BYTES together, as one sample of the
    float model measures them: a walk that keeps what each run leaves behind (calibrate/segments.py)
    then holds runs of that size in ORT's arenas, not whole batches of a wide network's early maps."""
    if not batches or not tensors:
        return batches
    sess = session(g.model, outputs=tensors, only=True)
    first = batches[0].rows(0, 1)
    rows = rows_within(sess.run(tensors, feeds_for(sess, first.feeds)), 1)
    return list(bounded_runs(batches, lambda: rows))


def rows_within(outputs, samples: int) -> int:
    """Samples a run may hold when `samples` of them produced these outputs (arrays; the sequences
    and maps of ai.onnx.ml classifiers count as nothing)."""
    run_bytes = sum(getattr(v, "nbytes", 0) for v in outputs)
    return max(1, RUN_BYTES * samples // max(1, run_bytes))


def _slice(chunk: Chunk, lo: int, hi: int) -> Chunk:
    return Chunk({k: v[lo:hi] for k, v in chunk.arrays.items()}, None if chunk.labels is None else chunk.labels[lo:hi],
                 chunk.given)


def padded_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Samples joined into one batch; where their shapes differ (token sequences or audio of
    different lengths, read from a folder of per-sample files) each is padded at the end with
    zeros to the longest: token id 0 and attention mask 0, which the model's mask ignores."""
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) == 1:
        return np.concatenate(arrays)
    longest = tuple(max(dims) for dims in zip(*shapes))
    return np.concatenate([np.pad(a, [(0, 0)] + [(0, m - d) for m, d in zip(longest, a.shape[1:])]) for a in arrays])


def _pop(pending: list[Chunk], n: int) -> tuple[Batch, list[Chunk]]:
    parts, rest, need = [], [], n
    for chunk in pending:
        if need == 0:
            rest.append(chunk)
        elif len(chunk) <= need:
            parts.append(chunk)
            need -= len(chunk)
        else:
            parts.append(_slice(chunk, 0, need))
            rest.append(_slice(chunk, need, len(chunk)))
            need = 0
    feeds = {k: padded_concat([c.arrays[k] for c in parts]) for k in parts[0].arrays}
    has_labels = all(c.labels is not None for c in parts)
    labels = np.concatenate([c.labels for c in parts]) if has_labels else None
    given = parts[0].given
    return Batch({**feeds, **given}, labels, frozenset(given)), rest
