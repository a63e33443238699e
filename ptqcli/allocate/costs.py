"""What each candidate format costs per layer, in the units budgets are given in."""

from __future__ import annotations

import re

import numpy as np

from ..errors import PtqError
from ..graph import Graph
from ..plan import Plan
from ..runtime import session
from ..calibrate.data import Batch
from ..geometry import layer_macs
from ..calibrate.planner import weight_spec
from ..config import QuantConfig
from ..formats import NBITS_WIDTHS, format_block_size, parse_weight_format
from .sensitivity import Candidate

BUDGET_KINDS = ("size", "bits", "bops")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> float:
    """'3.5MB', '700KiB', '120000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise PtqError(f"cannot read size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
    return float(match.group(1)) * _UNITS[unit]


def block_stored_bits(node, dims, fmt: str, cfg: QuantConfig) -> float | None:
    """Bits per weight a block-wise format takes in the exported file: its codes at the width they
    are stored at (MatMulNBits packs 2, 4 and 8 bits; other widths go to DequantizeLinear's 4- or
    8-bit types), a float32 scale per block, and a zero point (packed at the codes' width, or
    float32 when unrounded). None for formats without blocks, which count their nominal bits."""
    block = format_block_size(fmt) or cfg.block_size
    if block is None or node.op_type not in ("MatMul", "Gemm") or len(dims) != 2:
        return None
    scheme, bits = parse_weight_format(fmt)
    spec = weight_spec(cfg, 0, bits, scheme, block)
    codes = bits if bits in NBITS_WIDTHS else spec.storage_bits
    zero = 0 if spec.symmetric else 32 if spec.float_zero else codes
    return codes + (32 + zero) / block


def layer_output_shapes(g: Graph, plan: Plan, batch: Batch) -> dict[str, list[int]]:
    names = [layer.output for layer in plan.layers]
    values = session(g.model, outputs=names).run(names, batch.feeds)
    return {layer.node: list(v.shape[1:]) for layer, v in zip(plan.layers, values)}


def cost_table(g: Graph, plan: Plan, options: dict[str, list[Candidate]], kind: str,
               shapes: dict[str, list[int]]) -> tuple[dict[str, dict[str, float]], float]:
    """Per layer and option, the cost; plus the fixed cost of everything no option changes.

    size: bytes of weights; bits: weight bits (divided by the layers' parameters for an
    average); bops: multiply-accumulates x weight bits x activation bits, per sample.
    """
    if kind not in BUDGET_KINDS:
        raise PtqError(f"unknown budget kind {kind!r}")
    table: dict[str, dict[str, float]] = {}
    for layer in plan.layers:
        params = int(np.prod(g.initializers[layer.weight].dims))
        macs = layer_macs(g, layer.node, layer.weight, shapes.get(layer.node)) or 0
        node = g.node_by_name[layer.node]
        table[layer.node] = {}
        for c in options[layer.node]:
            stored = block_stored_bits(node, g.initializers[layer.weight].dims, c.weights, plan.quant) or c.w_bits
            table[layer.node][c.label] = {"size": params * stored / 8, "bits": params * stored,
                                          "bops": macs * c.w_bits * c.a_bits}[kind]
    fixed = 0.0
    if kind == "size":
        layer_weights = {layer.weight for layer in plan.layers}
        fixed = sum(4.0 * int(np.prod(t.dims)) for t in g.graph.initializer if t.name not in layer_weights)
    return table, fixed
