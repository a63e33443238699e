"""Calibration and evaluation data: an iterator of input dicts, streamed from files.

Sources are a `.npy` (single-input models), a `.npz` keyed by input names, an image file folder,
or a folder of `.npy`/`.npz` files. The first axis of an array is the sample axis. Nothing is
read before it is needed and nothing is kept after it is fed, so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from onnx import TensorProto, helper

from ..config import DataConfig
from ..errors import PtqError
from ..graph import Graph

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

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def sample_shape(self) -> tuple:
        return tuple(self.shape[1:])


def model_inputs(g: Graph) -> list[InputSpec]:
    vocabularies = embedding_vocabularies(g)
    specs = []
    for vi in g.graph_inputs:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
                               vocabularies.get(vi.name)))
    return specs


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

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def iter_chunks(path: str | Path, inputs: list[InputSpec], cfg: DataConfig) -> Iterator[Chunk]:
    """Stream chunks of validated samples from a file or folder."""
    p = Path(path)
    if not p.exists():
        raise PtqError(f"data path not found: {p}")
    files = _files_of(p)
    image_files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    array_files = [f for f in files if f.suffix.lower() in ARRAY_SUFFIXES]
    if image_files:
        yield from _image_chunks(image_files, inputs, cfg)
    for f in array_files:
        yield from _array_chunks(f, inputs)


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
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise PtqError(f"{path.name}: inputs have different sample counts {sorted(counts)}")
    total = counts.pop()
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
        chunk = {spec.name: _conform(arrays[spec.name][start:stop], spec, path) for spec in inputs}
        yield Chunk(chunk, None if labels is None else np.asarray(labels[start:stop]))


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
    if a.ndim == len(spec.shape) - 1:
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


def _conform(a: np.ndarray, spec: InputSpec, where: Path | str) -> np.ndarray:
    expected = spec.sample_shape()
    got = tuple(a.shape[1:])
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        shown = tuple("?" if e is None else e for e in expected)
        raise PtqError(
            f"{Path(str(where)).name}: input '{spec.name}' expects samples of shape {shown}, data has {got}"
        )
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


def count_samples(path: str | Path) -> int | None:
    """Samples available, read from file headers only (None when it cannot be told cheaply)."""
    p = Path(path)
    try:
        files = _files_of(p)
    except PtqError:
        return None
    total = 0
    for f in files:
        suffix = f.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            total += 1
        elif suffix == ".npy":
            total += len(open_npy(f))
        else:
            n = _npz_first_dim(f)
            if n is None:
                return None
            total += n
    return total


def _npz_first_dim(path: Path) -> int | None:
    try:
        arrays = open_npz(path)
    except Exception:
        return None
    for key, a in arrays.items():
        if key not in LABEL_KEYS:
            return a.shape[0] if a.shape else 1
    return None


@dataclass(frozen=True)
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


def iter_batches(
    path: str | Path, inputs: list[InputSpec], cfg: DataConfig, limit: int, skip: int = 0
) -> Iterator[Batch]:
    """Batches of `cfg.batch_size` samples (or the model's fixed batch), after skipping `skip` samples.

    A model with a fixed batch dimension is fed exactly that many samples per run; a remainder
    smaller than it is dropped.
    """
    fixed = {s.fixed_batch for s in inputs}
    fixed.discard(None)
    if len(fixed) > 1:
        raise PtqError(f"inputs have different fixed batch sizes {sorted(fixed)}")
    size = fixed.pop() if fixed else cfg.batch_size
    pending: list[Chunk] = []
    held, seen, emitted = 0, 0, 0
    for chunk in iter_chunks(path, inputs, cfg):
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


def _slice(chunk: Chunk, lo: int, hi: int) -> Chunk:
    return Chunk({k: v[lo:hi] for k, v in chunk.arrays.items()}, None if chunk.labels is None else chunk.labels[lo:hi])


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
    return Batch(feeds, labels), rest
