"""Accuracy-aware fallback: the fewest layers or activations moved back to float so that a plan
meets a target drop on the user's own measure.

Everything here works on plans and on a `drop_of(moves)` callable that the caller backs with real
evaluations (export, run in ONNX Runtime, score); nothing here runs a model. The search:

1. the drop with nothing moved (done if it meets the target) and with every candidate moved (if
   that misses, no plan meets it);
2. each candidate moved alone: its harm is the drop that moving it recovers; candidates are ranked
   by it;
3. candidates are moved in rank order until the target holds (the prefix length found by
   bisection), then each moved one, least harmful first, is put back where the target still holds
   without it;
4. every smaller set is tried, size by size, when that takes at most `proof_budget` evaluations;
   the result is then a smallest set that meets the target, proven so (if a smaller set than the
   one found meets it, the one of them with the least drop). Sets of one were all measured in step 2, so a result of two moves is always
   proven.

Evaluations are cached by set, so for n candidates the total is at most
2 + n + ceil(log2 n) + (moves) + proof_budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Callable, Iterable

import numpy as np

from ..calibrate.planner import quantize_weight
from ..errors import PtqError
from ..formats import QuantSpec
from ..plan import MOVED_TO_FLOAT, Plan
from ..quant import scale_zero_point
from ..progress import Progress, silent

KINDS = ("layers", "activations")
DESTINATIONS = ("float", "int16")
# Drops within this of the target meet it: a plan with nothing quantized scores float's own score
# up to rounding, and a target of 0 must accept it.
TOLERANCE = 1e-9
PROOF_BUDGET = 64


@dataclass(frozen=True, order=True)
class Move:
    """One candidate for float: a layer (its weights go back to float) or an activation tensor with
    the tensors that reuse its scale (a max-pool or reshape of a quantized tensor is already on its
    grid, so quantizing it again changes nothing: only moving them together does)."""

    kind: str  # "layer" | "activation"
    name: str  # the node, or the activation whose scale the group shares
    shared: tuple[str, ...] = ()  # activations that reuse `name`'s scale

    @property
    def tensors(self) -> tuple[str, ...]:
        return (self.name, *self.shared) if self.kind == "activation" else ()

    @property
    def label(self) -> str:
        return self.name + (f" (+{', '.join(self.shared)})" if self.shared else "")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, **({"shared": list(self.shared)} if self.shared else {})}


Moves = frozenset[Move]


def candidates(plan: Plan, kinds: Iterable[str] = KINDS) -> list[Move]:
    """The plan's layers and/or activation tensors, in plan order."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise PtqError(f"--move takes {' and/or '.join(KINDS)} (got {','.join(kinds) or 'nothing'})")
    moves = []
    if "layers" in kinds:
        moves += [Move("layer", layer.node) for layer in plan.layers]
    if "activations" in kinds:
        groups = scale_groups(plan)
        moves += [Move("activation", root, tuple(groups[root][1:])) for root in groups]
    if not moves:
        raise PtqError(f"the plan has no {' or '.join(kinds)} to move to float")
    return moves


def scale_groups(plan: Plan) -> dict[str, list[str]]:
    """The plan's activations grouped by the tensor whose scale they share (itself if none), in plan
    order."""
    acts = plan.of_role("activation")

    def root(name: str) -> str:
        seen = {name}
        while (source := acts[name].source.get("from")) in acts and source not in seen:
            seen.add(source)
            name = source
        return name

    groups: dict[str, list[str]] = {}
    for name in acts:
        groups.setdefault(root(name), []).append(name)
    return {r: sorted(members, key=lambda m: m != r) for r, members in groups.items()}


def moved_to_float(plan: Plan, moves: Iterable[Move]) -> Plan:
    """The plan with these layers and activations in float.

    A moved layer leaves the plan's layers: its weight and bias go back to the model's float values
    (a corrected bias was corrected for the quantized weights), and the float-node list says why.
    Its input activation stays quantized for its other readers, while the layer itself reads the
    float value (plan.FLOAT_INPUT_REASONS says why). A moved activation loses its quantizer; a layer
    reading it keeps its quantized weights, but an int32 bias needs an activation scale, so its
    bias stays float (keeping a bias correction's value)."""
    moves = set(moves)
    float_layers = {m.name for m in moves if m.kind == "layer"}
    float_acts = {t for m in moves for t in m.tensors}
    kept = [layer for layer in plan.layers if layer.node not in float_layers]
    still_read = {w for layer in kept for w in layer.weights} | {layer.bias for layer in kept}
    dropped = float_acts | {t for layer in plan.layers if layer.node in float_layers
                            for t in (*layer.weights, layer.bias) if t not in still_read}
    float_input_biases = {layer.bias for layer in kept if layer.activation in float_acts}
    tensors = {}
    for name, tq in plan.tensors.items():
        if name in dropped:
            continue
        if name in float_input_biases and tq.role == "bias":
            if tq.value is None:
                continue
            tq = replace(tq, role="value")
        tensors[name] = tq
    return replace(plan, tensors=tensors, layers=kept,
                   float_nodes={**plan.float_nodes, **{node: MOVED_TO_FLOAT for node in sorted(float_layers)}},
                   binary_inputs={k: v for k, v in plan.binary_inputs.items() if k not in float_layers})


def moved_to(plan: Plan, moves: Iterable[Move], destination: str,
             weight_of: Callable[[str], np.ndarray]) -> Plan:
    """The plan with these layers and activations moved to `destination` (DESTINATIONS)."""
    check_destination(destination)
    if destination == "float":
        return moved_to_float(plan, moves)
    return moved_to_int16(plan, moves, weight_of)


def check_destination(destination: str) -> None:
    if destination not in DESTINATIONS:
        raise PtqError(f"--to takes {' or '.join(DESTINATIONS)} (got {destination})")


def moved_to_int16(plan: Plan, moves: Iterable[Move], weight_of: Callable[[str], np.ndarray]) -> Plan:
    """The plan with these activations on a symmetric int16 grid over the range they were calibrated
    to, and these layers' weights on a symmetric per-channel int16 grid: for runtimes (NPUs) that
    run 16-bit tensors in integers, where float would leave the accelerator. A bias that would be
    int32 at the product of an int16 scale stays float, its value kept (int32 codes at such fine
    scales may overflow)."""
    moves = set(moves)
    layers = {m.name for m in moves if m.kind == "layer"}
    acts = {t for m in moves for t in m.tensors}
    int16 = QuantSpec(bits=16, signed=True, symmetric=True)
    tensors = dict(plan.tensors)
    for name in acts:
        tq = tensors[name]
        root = tq.source.get("from", name) if tq.source.get("method") == "shared" else name
        lo, hi = plan.tensors[root].source["range"]
        scale, zp = scale_zero_point(np.asarray(lo), np.asarray(hi), int16)
        tensors[name] = replace(tq, spec=int16, scale=scale, zero_point=zp)
    for layer in plan.layers:
        if layer.node in layers:
            for name in layer.weights:
                tensors[name] = quantize_weight(weight_of(name), replace(int16, axis=tensors[name].spec.axis))
        if (layer.node in layers or layer.activation in acts) and layer.bias in tensors \
                and tensors[layer.bias].role == "bias":
            bq = tensors[layer.bias]
            if bq.value is None:
                del tensors[layer.bias]
            else:
                tensors[layer.bias] = replace(bq, role="value")
    return replace(plan, tensors=tensors)


def meets(drop: float, target: float) -> bool:
    return drop <= target + TOLERANCE


@dataclass(frozen=True)
class Search:
    moved: tuple[Move, ...]  # most harmful first
    drop_before: float
    drop_after: float
    harm: dict[Move, float]  # the drop recovered by moving each candidate alone
    evaluations: int
    # Every smaller set was tried (or nothing needed moving); False when that would have taken
    # more evaluations than the proof budget.
    proven_fewest: bool


class _Evaluations:
    """drop_of, cached by set and counted; every set a phase asks for advances that phase's bar
    (`advance`, set per phase) with the set's size and drop."""

    def __init__(self, drop_of: Callable[[Moves], float], describe: Callable[[float], str]):
        self._drop_of, self._describe, self.cache = drop_of, describe, {}
        self.advance: Callable[..., None] = lambda n, note=None: None

    def __call__(self, moves: Iterable[Move]) -> float:
        key = frozenset(moves)
        if key not in self.cache:
            self.cache[key] = float(self._drop_of(key))
        self.advance(1, f"{len(key)} moved, drop {self._describe(self.cache[key])}")
        return self.cache[key]


def fewest_moves(items: list[Move], drop_of: Callable[[Moves], float], target: float,
                 progress: Progress = silent, proof_budget: int = PROOF_BUDGET,
                 describe: Callable[[float], str] = "{:.6g}".format) -> Search:
    """The smallest set of candidates whose move to float brings the drop within `target` (see the
    module doc); `describe` formats a drop for the error when no plan meets the target."""
    drop = _Evaluations(drop_of, describe)
    with progress(f"ranking {len(items)} candidates by harm", len(items) + 2) as drop.advance:
        before = drop(())
        if meets(before, target):
            return Search((), before, before, {}, 1, True)
        everything = drop(items)
        if not meets(everything, target):
            raise PtqError(f"--max-drop {target:g} cannot be met: the best reachable drop is {describe(everything)} "
                           f"(every {' and '.join(sorted({m.kind for m in items}, reverse=True))} in float; "
                           f"{describe(before)} with none)")
        harm = {m: before - drop({m}) for m in items}
    ranked = sorted(items, key=lambda m: -harm[m])  # stable: plan order among equals
    with progress("moving the most harmful first", math.ceil(math.log2(len(items)))) as drop.advance:
        moved = _grown(ranked, drop, target)
    with progress("putting back what the target does not need", len(moved)) as drop.advance:
        moved = _pruned(moved, harm, drop, target)
    smaller = sum(math.comb(len(items), size) for size in range(2, len(moved)))
    proven = smaller <= proof_budget
    if proven and smaller:
        with progress(f"trying every set of fewer than {len(moved)}", smaller) as drop.advance:
            moved = _smallest_meeting(ranked, len(moved), drop, target) or moved
    moved = sorted(moved, key=ranked.index)
    return Search(tuple(moved), before, drop(moved), harm, len(drop.cache), proven)


def _grown(ranked: list[Move], drop: _Evaluations, target: float) -> list[Move]:
    """A prefix of the ranking that meets the target while the one a candidate shorter does not,
    found by bisection: none of it meets nothing, all of it meets everything. Drops need not fall
    monotonically along the ranking, so it may not be the shortest such prefix; pruning follows."""
    misses, meets_at = 0, len(ranked)
    while meets_at - misses > 1:
        mid = (misses + meets_at) // 2
        if meets(drop(ranked[:mid]), target):
            meets_at = mid
        else:
            misses = mid
    return ranked[:meets_at]


def _pruned(moved: list[Move], harm: dict[Move, float], drop: _Evaluations, target: float) -> list[Move]:
    """Each moved candidate, least harmful first, put back where the target holds without it."""
    kept = list(moved)
    for m in sorted(moved, key=lambda m: harm[m]):
        without = [k for k in kept if k != m]
        if without and meets(drop(without), target):
            kept = without
    return kept


def _smallest_meeting(ranked: list[Move], size_found: int, drop: _Evaluations, target: float) -> list[Move] | None:
    """Among sets of two up to `size_found - 1` candidates, the smallest size that meets the target
    and, at that size, the set with the least drop; None if none does."""
    for size in range(2, size_found):
        meeting = [list(s) for s in combinations(ranked, size) if meets(drop(s), target)]
        if meeting:
            return min(meeting, key=drop)
    return None


def brute_force(items: list[Move], drop_of: Callable[[Moves], float], target: float) -> int | None:
    """The size of the smallest set that meets the target, over every subset: the reference for
    tests on small instances."""
    for size in range(len(items) + 1):
        if any(meets(drop_of(frozenset(s)), target) for s in combinations(items, size)):
            return size
    return None
