"""A model run piece by piece, so that each piece runs with the weights its predecessors were given.

Sequential methods (GPTQ, layer-wise rounding) want each layer's input as the already-quantized
prefix makes it. Running the prefix from the model's inputs again for every layer costs a number of
passes that grows with depth times depth; here the graph is cut once, in graph order, at each
target tensor, and every piece runs once over the calibration batches from the tensors the pieces
before it left behind (the residual stream of a transformer, a CNN's feature map, the mask and
position tensors that every block reads). A piece is built only when it is reached, with whatever
weights the caller holds at that moment.
"""

from __future__ import annotations

import tempfile
from collections import ChainMap
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

from ..graph import Graph, fragment, make_initializer, subgraph_reads, with_data
from ..runtime import session
from .moments import ChannelMoments, gram

@dataclass(frozen=True)
class Segment:
    """The nodes that run after the previous target is computed, up to and including the one that
    computes `target`; what they read from the tensors left behind, and what they leave behind for
    later segments."""

    target: str
    nodes: tuple[NodeProto, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    frees: tuple[str, ...]  # tensors no later segment reads: dropped once this one has run


# Tensors a walk's batch states hold in memory before new ones go to files: a CNN's early feature
# maps at a few hundred samples are several times this, and every batch's are held at once.
STATE_BYTES_IN_MEMORY = 256 << 20
# Smaller tensors always stay in memory (masks, positions, small states): files would cost more.
SPILL_AT_BYTES = 1 << 20


class _BatchTensors(MutableMapping):
    """One batch's own tensors, in memory while the store's budget allows, else each in a file of
    the store's scratch directory, read back memory-mapped."""

    def __init__(self, store: "BatchStates", tensors: dict[str, np.ndarray]):
        self.store, self.memory, self.files = store, {}, {}
        self.update(tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.memory:
            return self.memory[name]
        if name in self.files:
            return np.load(self.files[name], mmap_mode="r")
        raise KeyError(name)

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.pop(name, None)
        value = np.asarray(value)
        if value.nbytes < SPILL_AT_BYTES or self.store.held + value.nbytes <= self.store.budget:
            self.memory[name] = value
            self.store.held += value.nbytes
        else:
            self.files[name] = self.store.new_file()
            np.save(self.files[name], value)

    def __delitem__(self, name: str) -> None:
        if name in self.memory:
            self.store.held -= self.memory.pop(name).nbytes
        elif name in self.files:
            self.files.pop(name).unlink()
        else:
            raise KeyError(name)

    def __iter__(self):
        return iter([*self.memory, *self.files])

    def __len__(self) -> int:
        return len(self.memory) + len(self.files)


class BatchStates:
    """Every calibration batch's state during a walk (its feeds, then what each segment leaves for
    later ones) over the tensors all batches share (weights fed as inputs, activation gates), held
    once in `shared`. Past `budget` bytes of batch tensors, new ones go to files in a scratch
    directory: a walk over many batches of a wide model then holds about one batch's tensors at a
    time, whatever the number of batches. Each state is a mapping: its own tensors over the shared."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], shared: dict[str, np.ndarray] | None = None,
                 budget: int = STATE_BYTES_IN_MEMORY):
        self.shared, self.budget, self.held = dict(shared or {}), budget, 0
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._files = 0
        self._states = [ChainMap(_BatchTensors(self, dict(feed)), self.shared) for feed in feeds]

    def new_file(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="ptq-states-")
        self._files += 1
        return Path(self._scratch.name) / f"{self._files}.npy"

    @property
    def spilled(self) -> bool:
        return self._scratch is not None

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, index: int) -> ChainMap:
        return self._states[index]

    def __iter__(self) -> Iterator[ChainMap]:
        return iter(self._states)


def _node_reads(node: NodeProto) -> set[str]:
    return {*node.input, *subgraph_reads(node)} - {""}


def cut(graph: GraphProto, targets: Iterable[str]) -> list[Segment]:
    """The graph's nodes that the targets depend on, cut into one segment per target, in the order
    the graph computes them (targets read straight from the graph's inputs get empty segments)."""
    initializers = {t.name for t in graph.initializer}
    produced_at = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    targets = sorted(dict.fromkeys(targets), key=lambda t: produced_at.get(t, -1))
    needed, wanted = set(), set(targets)
    for i in reversed(range(len(graph.node))):
        node = graph.node[i]
        if wanted.intersection(node.output):
            needed.add(i)
            wanted.update(_node_reads(node))
    pieces, start = [], 0
    for target in targets:
        end = produced_at.get(target, -1) + 1
        pieces.append([graph.node[i] for i in range(start, max(end, start)) if i in needed])
        start = max(end, start)
    made_by = [{out for node in nodes for out in node.output if out} for nodes in pieces]
    state = {i.name for i in graph.input} | set().union(*made_by)
    reads = [sorted(({target} | {name for node in nodes for name in _node_reads(node)}) - made - initializers & state)
             for target, nodes, made in zip(targets, pieces, made_by)]
    last_read = {name: k for k, names in enumerate(reads) for name in names}
    segments = []
    for k, (target, nodes, made) in enumerate(zip(targets, pieces, made_by)):
        writes = sorted(name for name in made if last_read.get(name, -1) > k)
        frees = sorted(name for name in reads[k] if last_read[name] == k)
        segments.append(Segment(target, tuple(nodes), tuple(reads[k]), tuple(writes), tuple(frees)))
    return segments


def segment_model(g: Graph, segment: Segment, types: dict[str, int],
                  weight: Callable[[str], np.ndarray | None]) -> ModelProto:
    """The segment as a model: its reads as inputs (of the element types the state holds), its
    writes and its target as outputs. An initializer comes from `weight(name)` when that gives an
    array (the caller's current values), else from the model."""
    names = {name for node in segment.nodes for name in _node_reads(node)}
    initializers = [make_initializer(name, value) if (value := weight(name)) is not None
                    else with_data(g.initializers[name], g.weights_dir)
                    for name in sorted(names) if name in g.initializers]
    inputs = [helper.make_tensor_value_info(name, types[name], None) for name in segment.reads]
    # A tensor the model declares no type for is float (what the probe model's fake-quantizers add).
    outputs = [helper.make_tensor_value_info(name, g.value_types.get(name) or TensorProto.FLOAT, None)
               for name in dict.fromkeys([*segment.writes, segment.target]) if name not in segment.reads]
    return fragment(g.model, segment.nodes, inputs, outputs, initializers)


def segment_session(g: Graph, segment: Segment, state: dict[str, np.ndarray],
                    weight: Callable[[str], np.ndarray | None]):
    """A session of `segment_model`, its inputs typed as `state` holds them."""
    types = {name: helper.np_dtype_to_tensor_dtype(state[name].dtype) for name in segment.reads}
    return session(segment_model(g, segment, types, weight), spinning=False)


def advance(g: Graph, segment: Segment, states: "BatchStates | list[dict[str, np.ndarray]]",
            weight: Callable[[str], np.ndarray | None]) -> Iterator[np.ndarray]:
    """Run `segment` (built now, with the initializers `weight` gives: see segment_model) on every
    state in turn, updating each in place (what later segments read added, what none does dropped),
    and yield each state's value of the segment's target."""
    # A target the model reads as given needs no session (and ORT makes none without outputs).
    sess = segment_session(g, segment, states[0], weight) if segment.nodes else None
    outputs = [o.name for o in sess.get_outputs()] if sess else []
    for state in states:
        values = dict(zip(outputs, sess.run(outputs, {name: state[name] for name in segment.reads}))) if sess else {}
        target = values[segment.target] if segment.target in values else state[segment.target]
        state.update((name, values[name]) for name in segment.writes)
        for name in segment.frees:
            state.pop(name, None)
        yield target


def rest(segments: list[Segment], k: int) -> Segment:
    """Everything after segment k as one segment: it reads from the states segment k left what
    the later segments read and did not make, and computes the last segment's target."""
    later = segments[k + 1:]
    made = {out for seg in later for node in seg.nodes for out in node.output if out}
    reads = sorted({name for seg in later for name in seg.reads} - made)
    nodes = tuple(node for seg in later for node in seg.nodes)
    return Segment(later[-1].target, nodes, tuple(reads), (), ())


def run_piecewise(g: Graph, feeds: list[dict[str, np.ndarray]], outputs: list[str],
                  cuts: Iterable[str] = (), shared: dict[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
    """The model's `outputs` on each of `feeds` (and the inputs every run shares), computed segment by
    segment (cut at `cuts` as well), so that a session never holds more than one segment's weights:
    a language model run whole needs its weights again in ORT (and their packed copies) beside the
    caller's."""
    return [[found[name] for name in outputs] for found in outputs_piecewise(g, feeds, outputs, cuts, shared)]


def outputs_piecewise(g: Graph, feeds: Iterable[dict[str, np.ndarray]], outputs: list[str], cuts: Iterable[str] = (),
                      shared: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """As run_piecewise, each feed's {output: value} yielded as soon as the last segment computes
    it: the output computed last is never held for every feed at once (a language model's logits
    over many windows are gigabytes); those computed before it wait in the feeds' states, in
    files past the states' budget. Segments are built from the initializers `g` holds or refers to
    on disk, one at a time."""
    states = BatchStates(feeds, shared)
    segments = cut(g.graph, [*cuts, *outputs])
    kept = {name: f"{name}__piecewise_output" for name in outputs}
    for segment in segments[:-1]:
        for state, value in zip(states, advance(g, segment, states, lambda name: None)):
            if segment.target in kept:
                state[kept[segment.target]] = value
    last = segments[-1]
    for state, value in zip(states, advance(g, last, states, lambda name: None)):
        yield {name: value if name == last.target else state.pop(kept[name]) for name in outputs}


def moments_in_order(g: Graph, targets: Iterable[str], states: list[dict[str, np.ndarray]],
                     weight: Callable[[str], np.ndarray | None],
                     advance_progress: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, ChannelMoments]]:
    """Each target's Gram matrix (moments.gram, summed) and per-channel extremes over every state
    (one per calibration batch, starting as the batch's feeds), target after target in graph order.
    The segment that computes a target is built when it is reached, with the initializers
    `weight` gives then: a caller that changes weights between targets feeds each later segment
    the changed ones. `states` are advanced in place."""
    for segment in cut(g.graph, targets):
        total = lo = hi = None
        for target in advance(g, segment, states, weight):
            rows = target.reshape(-1, target.shape[-1])
            total = gram(rows) if total is None else np.add(total, gram(rows), out=total)
            lo = rows.min(axis=0) if lo is None else np.minimum(lo, rows.min(axis=0))
            hi = rows.max(axis=0) if hi is None else np.maximum(hi, rows.max(axis=0))
        advance_progress(1)
        lo, hi = lo.astype(np.float32), hi.astype(np.float32)
        yield segment.target, ChannelMoments(np.maximum(-lo, hi), lo, hi, total)


def channel_means_in_order(g: Graph, targets: dict[str, int], states: "BatchStates | list[dict[str, np.ndarray]]",
                           weight: Callable[[str], np.ndarray | None],
                           advance_progress: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, np.ndarray]]:
    """Each target's mean along its channel axis (`targets`: tensor -> axis) over every state, in
    graph order, float64; segments are built when reached, with the initializers `weight` gives
    then (as moments_in_order)."""
    for segment in cut(g.graph, targets):
        axis, total, count = targets[segment.target], None, 0
        for value in advance(g, segment, states, weight):
            axis_here = axis % value.ndim
            others = tuple(i for i in range(value.ndim) if i != axis_here)
            sums = np.sum(value, axis=others, dtype=np.float64)
            total = sums if total is None else total + sums
            count += value.size // max(value.shape[axis_here], 1)
        advance_progress(1)
        yield segment.target, total / max(count, 1)
