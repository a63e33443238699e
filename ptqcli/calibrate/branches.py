"""If branches quantized as models of their own.

ORT cannot return a tensor computed inside a subgraph, so a branch's activations cannot be observed
from the outside. Each branch of a top-level If that holds layers becomes a model: its inputs are
the outer tensors it reads, the main graph's initializers it reads are copied in, and its outputs
are the branch's. Its calibration data is what those outer tensors hold on the calibration
batches that take the branch (the If's condition is read in the same pass), one feed per batch.
The branch model then goes through calibration like any model (its own Ifs included), and the
export puts its quantized graph back into the If (see splice). A branch no batch takes stays float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, ModelProto, helper

from ..graph import Graph, fragment, outer_reads, subgraphs
from ..runtime import feeds_for, session
from .data import Batch
from .select import subgraph_layers

BRANCHES = ("then_branch", "else_branch")


@dataclass(frozen=True)
class Branch:
    node: str
    attribute: str  # then_branch or else_branch
    condition: str
    reads: tuple[str, ...]  # outer tensors it reads (not the main graph's initializers)

    @property
    def key(self) -> str:
        """A name for the branch's directory in the run."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.node}.{self.attribute}")

    @property
    def taken_when(self) -> bool:
        return self.attribute == "then_branch"


def branches(g: Graph) -> list[Branch]:
    """The branches of the main graph's If nodes that hold layers with constant weights."""
    found = []
    for node in g.graph.node:
        if node.op_type != "If":
            continue
        for attribute in node.attribute:
            if attribute.name in BRANCHES and _holds_layers(attribute.g, set(g.initializers)):
                reads = sorted(r for r in outer_reads(attribute.g) if r not in g.initializers)
                found.append(Branch(node.name, attribute.name, node.input[0], tuple(reads)))
    return found


def _holds_layers(graph: GraphProto, constants: set[str]) -> bool:
    """Layers with a weight that is an initializer or a Constant node's (which the branch model's
    own preparation folds into initializers)."""
    holder = helper.make_node("If", [], [], name="branch")
    holder.attribute.append(helper.make_attribute("then_branch", graph))
    made = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return bool(subgraph_layers(holder, constants | made))


def captured_feeds(g: Graph, found: list[Branch], batches: list[Batch]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per branch, the outer tensors it reads on each batch whose condition takes it."""
    wanted = sorted({name for b in found for name in (*b.reads, b.condition)})
    sess = session(g.model, outputs=wanted)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {b.key: [] for b in found}
    for batch in batches:
        values = dict(zip(wanted, sess.run(wanted, feeds_for(sess, batch.feeds))))
        for b in found:
            if bool(np.asarray(values[b.condition]).reshape(-1)[0]) == b.taken_when:
                feeds[b.key].append({name: values[name] for name in b.reads})
    return feeds


def branch_graph(g: Graph, branch: Branch) -> GraphProto:
    return next(a.g for a in g.node_by_name[branch.node].attribute if a.name == branch.attribute)


def branch_model(g: Graph, branch: Branch, example: dict[str, np.ndarray]) -> ModelProto:
    """The branch as a model: the outer tensors it reads as inputs (typed as `example` holds them),
    the main graph's initializers it reads copied in, its outputs typed as the If's."""
    node = g.node_by_name[branch.node]
    graph = branch_graph(g, branch)
    used = outer_reads(graph)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(example[name].dtype),
                                            [None] * example[name].ndim)  # batches may differ in size
              for name in branch.reads]
    outputs = []
    for out, outer in zip(graph.output, node.output):
        typed = out.type.HasField("tensor_type") and out.type.tensor_type.elem_type
        outputs.append(out if typed else helper.make_tensor_value_info(out.name, g.value_types.get(outer, 0),
                                                                     g.value_shapes.get(outer)))
    initializers = [*graph.initializer, *(g.initializers[name] for name in sorted(used) if name in g.initializers)]
    model = fragment(g.model, graph.node, inputs, outputs, initializers)
    model.graph.name = graph.name or branch.key
    return model


def spliced(model: ModelProto, node_name: str, attribute: str, quantized: ModelProto) -> str | None:
    """Put `quantized` (a branch model's export) into the If `node_name` of `model` in place; or say
    why not (the model is then unchanged)."""
    node = next((n for n in model.graph.node if n.name == node_name and n.op_type == "If"), None)
    if node is None:
        return f"no If node {node_name!r} in the exported model"
    mine = {o.domain or "": o.version for o in model.opset_import}
    theirs = {o.domain or "": o.version for o in quantized.opset_import}
    if theirs.get("", 0) != mine.get("", 0):
        return f"its quantized graph needs opset {theirs.get('', 0)}, the model has {mine.get('', 0)}"
    outer_inits = {t.name: t for t in model.graph.initializer}
    outer = (set(outer_inits) | {i.name for i in model.graph.input}
             | {out for n in model.graph.node if n is not node for out in n.output})
    _apart(quantized.graph, outer_inits, outer)
    graph = GraphProto(name=quantized.graph.name)
    graph.node.extend(quantized.graph.node)
    graph.initializer.extend(quantized.graph.initializer)
    graph.output.extend(quantized.graph.output)
    for a in node.attribute:
        if a.name == attribute:
            a.g.CopyFrom(graph)
    for domain, version in theirs.items():
        if domain not in mine:
            model.opset_import.append(helper.make_opsetid(domain, version))
    return None


def _apart(graph: GraphProto, outer_inits: dict, outer: set[str]) -> None:
    """No name of `graph` (a branch model's export) redefines one of the scope it goes into: an
    initializer the branch model copied in unchanged is dropped (the outer one is read), any other
    clash is renamed throughout the branch."""
    for t in list(graph.initializer):
        if t.name in outer_inits and t.SerializeToString() == outer_inits[t.name].SerializeToString():
            graph.initializer.remove(t)
    defined = {t.name for t in graph.initializer} | {out for n in graph.node for out in n.output}
    for name in sorted(defined & outer):
        new = f"{name}__{graph.name or 'branch'}"
        while new in outer or new in defined:
            new += "_"
        _rename(graph, name, new)


def _rename(graph: GraphProto, old: str, new: str) -> None:
    for t in graph.initializer:
        if t.name == old:
            t.name = new
    for vi in graph.output:
        if vi.name == old:
            vi.name = new
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new
        for sub in subgraphs(node):
            if old not in {i.name for i in sub.input}:
                _rename(sub, old, new)
