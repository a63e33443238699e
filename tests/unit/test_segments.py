"""A graph run segment by segment gives each target the Gram matrix the whole model gives it, and a
segment built after weights change computes with the changed weights."""

from pathlib import Path

import numpy as np
import pytest

from ptqcli.calibrate.segments import cut, moments_in_order
from ptqcli.graph import clone, make_initializer
from ptqcli.prepare import prepare
from ptqcli.runtime import session, with_outputs

from builders import encoder_model
from transformer_builders import tiny_language_model, token_data


def _encoder_feeds(model):
    x = np.random.default_rng(0).normal(size=(6, 16, 32)).astype(np.float32)
    return [{model.graph.input[0].name: x[i:i + 2]} for i in range(0, 6, 2)]


def _lm_feeds(model):
    data = token_data(6)
    return [{k: v[i:i + 2] for k, v in data.items()} for i in range(0, 6, 2)]


CASES = [(encoder_model, _encoder_feeds), (tiny_language_model, _lm_feeds)]


def _gemm_inputs(g):
    """Each MatMul input with a constant weight, the width of its rows, and the weights reading it."""
    found = {}
    for node in g.graph.node:
        if node.op_type == "MatMul" and node.input[1] in g.initializers:
            width = g.initializers[node.input[1]].dims[0]
            found.setdefault(node.input[0], (width, []))[1].append(node.input[1])
    return found


def _grams_of(model, tensors, batches, extremes=None):
    sess = session(with_outputs(model, tensors))
    total = {t: 0.0 for t in tensors}
    for feeds in batches:
        for t, value in zip(tensors, sess.run(tensors, feeds)):
            rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
            total[t] = total[t] + rows.T @ rows
            if extremes is not None:
                lo, hi = extremes.get(t, (np.inf, -np.inf))
                extremes[t] = (np.minimum(lo, rows.min(axis=0)), np.maximum(hi, rows.max(axis=0)))
    return total


@pytest.mark.parametrize("build, feeds", CASES)
def test_segments_cover_each_needed_node_once_and_read_only_what_earlier_ones_leave(build, feeds):
    g = prepare(build())
    targets = list(_gemm_inputs(g))
    segments = cut(g.graph, reversed(targets))  # any order given: graph order out
    made_at = {out: i for i, n in enumerate(g.graph.node) for out in n.output}
    assert [s.target for s in segments] == sorted(targets, key=lambda t: made_at.get(t, -1))
    names = [n.name for s in segments for n in s.nodes]
    assert len(names) == len(set(names))
    available = {i.name for i in g.graph.input}
    for segment in segments:
        assert set(segment.reads) <= available, segment.target
        available -= set(segment.frees)
        available |= set(segment.writes)


@pytest.mark.parametrize("build, feeds", CASES)
def test_moments_equal_the_whole_models_and_follow_weights_changed_on_the_way(build, feeds):
    g = prepare(build())
    readers = _gemm_inputs(g)
    batches = feeds(g.model)
    rng = np.random.default_rng(1)
    changed = {}

    def weight(name):
        return changed.get(name)

    states = [dict(b) for b in batches]
    got, seen = {}, {}
    for tensor, moments in moments_in_order(g, readers, states, weight):
        got[tensor], seen[tensor] = moments.gram, moments
        for name in readers[tensor][1]:  # the layers reading this tensor change before the next segment
            w = g.constant(name)
            changed[name] = (w * rng.uniform(0.5, 1.5, w.shape)).astype(np.float32)
    assert list(got) == [t for t in dict.fromkeys(n.input[0] for n in g.graph.node) if t in readers]
    model = clone(g.model)
    for i, t in enumerate(model.graph.initializer):
        if t.name in changed:
            model.graph.initializer[i].CopyFrom(make_initializer(t.name, changed[t.name]))
    extremes = {}
    expected = _grams_of(model, list(readers), batches, extremes)
    float_grams = _grams_of(g.model, list(readers), batches)
    for tensor in readers:
        np.testing.assert_allclose(got[tensor], expected[tensor], rtol=2e-4, atol=1e-3 * np.abs(expected[tensor]).max())
        lo, hi = extremes[tensor]
        np.testing.assert_allclose(seen[tensor].lo, lo, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[tensor].hi, hi, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[tensor].absmax, np.maximum(-lo, hi), rtol=1e-5, atol=1e-6)
    # the changes reached some later target (else this test would not tell the two apart)
    assert any(not np.allclose(expected[t], float_grams[t], rtol=1e-2) for t in readers)


@pytest.mark.parametrize("build, feeds", CASES)
def test_states_past_their_memory_budget_go_to_files_and_the_walk_gives_the_same_bytes(build, feeds, monkeypatch):
    import ptqcli.calibrate.segments as segments

    g = prepare(build())
    readers = _gemm_inputs(g)
    batches = feeds(g.model)
    in_memory = {t: m.gram for t, m in moments_in_order(g, readers, segments.BatchStates(batches), lambda n: None)}
    monkeypatch.setattr(segments, "SPILL_AT_BYTES", 0)  # these tensors are small: spill every one
    spilled_states = segments.BatchStates(batches, budget=0)
    spilled = {t: m.gram for t, m in moments_in_order(g, readers, spilled_states, lambda n: None)}
    assert spilled_states.spilled and spilled_states.held == 0
    assert all(isinstance(v, np.memmap) for state in spilled_states for k, v in state.maps[0].items())
    assert list(spilled) == list(in_memory)
    for t in in_memory:
        assert spilled[t].tobytes() == in_memory[t].tobytes()
    # what no later segment reads was dropped from the files too
    assert all(len(state.maps[0].files) == len(state.maps[0]) for state in spilled_states)
    left = {p.name for p in Path(spilled_states._scratch.name).iterdir()}
    assert left == {f.name for state in spilled_states for f in state.maps[0].files.values()}
