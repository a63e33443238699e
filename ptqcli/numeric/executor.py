"""Running an ONNX graph on the numpy operators, and its reverse pass.

A :class:`Program` is built once per model (attributes parsed, initializers and Constant nodes
converted) and run many times. ``record`` runs it while keeping, per node, only what the wanted
cotangents need; :meth:`Tape.backward` then walks the nodes in reverse, freeing each node's
saved values as soon as its cotangents are passed on. Forward values are freed after their last
reader in both modes, so memory follows the live tensors, not the whole graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from onnx import ModelProto, numpy_helper

from ..errors import PtqError
from ..graph import MIN_OPSET, clone, default_opset, set_opset
from .core import OpImpl
from .registry import node_attrs, op_impl


@dataclass(frozen=True)
class _Step:
    name: str
    op_type: str
    impl: OpImpl
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.op_type} node '{self.name}'" if self.name else f"{self.op_type} node"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_supported(model: ModelProto) -> None:
    """Refuse the model at its first node without a numpy implementation, in one line."""
    for node in model.graph.node:
        if op_impl(node.op_type, node.domain) is None:
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            where = f" (node '{node.name}')" if node.name else ""
            raise PtqError(f"the numpy executor does not support {op}{where}")


class Program:
    """A model ready to run on the numpy operators.

    ``dtype`` (e.g. ``np.float64`` for finite-difference checks) casts every float initializer,
    constant and feed; None keeps the model's own types.
    """

    def __init__(self, model: ModelProto, dtype: Any = None):
        if default_opset(model) < MIN_OPSET:
            # The ops implement opset-13 semantics (Clip/Pad/Slice bounds as inputs, Softmax axis).
            model = set_opset(clone(model), MIN_OPSET)
        _check_supported(model)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.constants: dict[str, np.ndarray] = {
            t.name: self._cast(numpy_helper.to_array(t)) for t in model.graph.initializer
        }
        self.inputs = [i.name for i in model.graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in model.graph.output]
        self.steps = self._compile(model)
        self._last_reader = self._last_readers()

    def _cast(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if self.dtype is not None and np.issubdtype(array.dtype, np.floating):
            return array.astype(self.dtype, copy=False)
        return array

    def _compile(self, model: ModelProto) -> tuple[_Step, ...]:
        steps = []
        for node in model.graph.node:
            impl = op_impl(node.op_type, node.domain)
            step = _Step(node.name, node.op_type, impl, tuple(node.input), tuple(node.output), node_attrs(node))
            if any(node.output[impl.n_outputs:]):
                raise PtqError(f"numpy {step.label}: only its first {impl.n_outputs} output(s) are supported")
            if not node.input and impl.vjp is None:
                # Constant nodes: evaluated once, then treated like initializers.
                outputs, _ = self._call(step, self.constants, ())
                self.constants.update({n: self._cast(v) for n, v in zip(step.outputs, outputs) if n})
                continue
            steps.append(step)
        return tuple(steps)

    def _last_readers(self) -> dict[str, int]:
        """Index of the last step that reads each tensor (or produces it, when nothing reads it)."""
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in step.outputs + step.inputs:
                if name:
                    last[name] = i
        return last

    def _call(self, step: _Step, env: Mapping[str, np.ndarray], wants) -> tuple[tuple[np.ndarray, ...], Any]:
        missing = [n for n in step.inputs if n and n not in env]
        if missing:
            raise PtqError(f"numpy {step.label}: input '{missing[0]}' is not computed before it")
        args = [env[n] if n else None for n in step.inputs]
        wants = tuple(wants) if wants else (False,) * len(args)
        try:
            return step.impl.forward(args, step.attrs, wants)
        except ValueError as exc:  # shape mismatches in the model or the feeds
            raise PtqError(f"numpy {step.label} failed: {_first_line(exc)}") from None

    def _environment(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Constants plus feeds; feeds may also replace initializers (trial weights)."""
        unknown = [n for n in feeds if n not in self.constants and n not in self.inputs]
        if unknown:
            raise PtqError(f"feed '{unknown[0]}' is neither an input nor an initializer of the model")
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise PtqError(f"no value fed for model input '{missing[0]}'")
        env = dict(self.constants)
        env.update({n: self._cast(v) for n, v in feeds.items()})
        return env

    def _release(self, env: dict, index: int, step: _Step, keep: set[str]) -> None:
        for name in step.inputs + step.outputs:
            if name and self._last_reader.get(name) == index and name not in keep:
                env.pop(name, None)

    def _keep_list(self, keep: Iterable[str]) -> list[str]:
        """Graph outputs first, then the requested tensors, in order and without repeats."""
        return list(dict.fromkeys([*self.outputs, *keep]))

    def _kept(self, env: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        absent = [n for n in names if n not in env]
        if absent:
            raise PtqError(f"tensor '{absent[0]}' is not computed by the model")
        return {n: env[n] for n in names}

    def run(self, feeds: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, np.ndarray]:
        """The graph outputs, plus the tensors named in ``keep``."""
        names = self._keep_list(keep)
        keep = set(names)
        env = self._environment(feeds)
        for i, step in enumerate(self.steps):
            outputs, _ = self._call(step, env, ())
            env.update((n, v) for n, v in zip(step.outputs, outputs) if n)
            self._release(env, i, step, keep)
        return self._kept(env, names)

    def record(self, feeds: Mapping[str, Any], wrt: Iterable[str], keep: Iterable[str] = ()) -> "Tape":
        """Run forward, saving what the cotangents of ``wrt`` (inputs or initializers) need.

        Only nodes downstream of ``wrt`` save anything, and each saves only what its active inputs
        need: asking for the input gradient alone keeps no Conv activations at all.
        """
        wrt = list(dict.fromkeys(wrt))
        bad = [n for n in wrt if n not in self.inputs and n not in self.constants]
        if bad:
            raise PtqError(f"cannot differentiate with respect to '{bad[0]}': not an input or initializer")
        names = self._keep_list(keep)
        keep = set(names)
        env = self._environment(feeds)
        active = {n: (env[n].shape, env[n].dtype) for n in wrt}
        produced: set[str] = set(env)
        entries: list = []
        for i, step in enumerate(self.steps):
            wants = tuple(bool(n) and n in active and step.impl.can_grad(j) for j, n in enumerate(step.inputs))
            outputs, ctx = self._call(step, env, wants)
            env.update((n, v) for n, v in zip(step.outputs, outputs) if n)
            produced.update(n for n in step.outputs if n)
            if any(wants):
                entries.append((step, ctx, wants))
                active[step.outputs[0]] = (outputs[0].shape, outputs[0].dtype)
            self._release(env, i, step, keep)
        return Tape(entries, wrt, active, produced, self._kept(env, names))


class Tape:
    """What a recorded forward pass saved; :meth:`backward` consumes it once.

    ``values`` holds the graph outputs and the tensors asked for with ``keep``: a loss on them
    gives the cotangents to pass back.
    """

    def __init__(self, entries, wrt, active, produced, values):
        self._entries = entries
        self._wrt = wrt
        self._active = active  # tensor -> (shape, dtype), for every tensor that depends on wrt
        self._produced = produced
        self.values = values

    def _seeds(self, cotangents: Mapping[str, Any]) -> dict[str, np.ndarray]:
        grads: dict[str, np.ndarray] = {}
        for name, g in cotangents.items():
            if name not in self._produced:
                raise PtqError(f"cotangent given for '{name}', which the model does not compute")
            if name not in self._active:
                continue  # does not depend on wrt: contributes nothing
            shape, dtype = self._active[name]
            g = np.asarray(g, dtype=dtype)
            if g.shape != shape:
                raise PtqError(f"cotangent of '{name}' has shape {list(g.shape)}, the tensor {list(shape)}")
            grads[name] = g
        return grads

    def saved_bytes(self) -> int:
        """Memory held for the reverse pass (arrays shared between nodes counted once)."""
        seen: dict[int, int] = {}
        pending = [ctx for _, ctx, _ in self._entries or ()]
        while pending:
            item = pending.pop()
            if isinstance(item, np.ndarray):
                base = item if item.base is None else item.base
                seen[id(base)] = getattr(base, "nbytes", item.nbytes)
            elif isinstance(item, (tuple, list)):
                pending.extend(item)
            elif hasattr(item, "__dataclass_fields__"):
                pending.extend(getattr(item, f) for f in item.__dataclass_fields__)
        return sum(seen.values())

    def backward(self, cotangents: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Cotangents of every ``wrt`` tensor, given cotangents of any computed tensors (outputs or
        kept intermediates; several are summed where paths meet)."""
        if self._entries is None:
            raise RuntimeError("this tape was already consumed by backward()")
        entries, self._entries = self._entries, None
        grads = self._seeds(cotangents)
        for k in range(len(entries) - 1, -1, -1):
            step, ctx, wants = entries[k]
            entries[k] = None  # this node's saved values are not needed again
            g = grads.pop(step.outputs[0], None)
            if g is None:
                continue
            for name, d, w in zip(step.inputs, step.impl.vjp(ctx, g, wants), wants):
                if w and d is not None:
                    # Never in place: a cotangent may be the very array handed to another input.
                    grads[name] = d if name not in grads else grads[name] + d
        return {
            n: grads[n] if n in grads else np.zeros(*self._active[n])
            for n in self._wrt
        }


def run_graph(model: ModelProto, feeds: Mapping[str, Any], keep: Iterable[str] = (),
              dtype: Any = None) -> dict[str, np.ndarray]:
    """Run a model on the numpy operators: the graph outputs plus the tensors named in ``keep``.

    Raises PtqError naming the first op without a numpy implementation.
    """
    return Program(model, dtype).run(feeds, keep)


def grad_graph(model: ModelProto, feeds: Mapping[str, Any], output_cotangents: Mapping[str, Any],
               initializers: Iterable[str] = (), dtype: Any = None) -> dict[str, np.ndarray]:
    """Vector-Jacobian product of the whole model: the cotangents of its inputs (and of the named
    ``initializers``) given cotangents of its outputs or of any computed tensor.

    For a loss that depends on forward values, use ``Program(model).record(...)`` and
    ``Tape.backward`` instead: the tape's ``values`` come before the cotangents.
    """
    program = Program(model, dtype)
    tape = program.record(feeds, [*program.inputs, *initializers])
    return tape.backward(output_cotangents)
