"""Reference operators in numpy, with vector-Jacobian products, and a graph executor on them.

One implementation of ONNX semantics shared by every feature that needs values or gradients
outside ONNX Runtime: gradients with respect to a model's input (synthetic calibration data
fitted to BatchNorm statistics), with respect to a layer's weights (layer-wise rounding
optimisation), and reference results for kernel tests.

- ``forward(op_type, inputs, attrs)`` / ``vjp(op_type, inputs, attrs, cotangent)``: one op.
- ``run_graph(model, feeds, keep)``: a whole model; ``grad_graph(model, feeds, cotangents)``: its
  reverse pass. ``Program`` / ``Tape`` split those into build-once, run-many steps.
- ``batch_stats`` / ``batch_stats_vjp``: per-channel batch mean and variance, and their reverse.
- ``jax_program`` (not imported here: jax is optional): the same graphs as jax functions, for
  gradients compiled by XLA.
"""

from .core import OpImpl, unbroadcast
from .executor import Program, Tape, grad_graph, run_graph
from .pointwise import batch_stats, batch_stats_vjp
from .registry import REGISTRY, forward, node_attrs, op_impl, vjp

__all__ = [
    "OpImpl",
    "Program",
    "REGISTRY",
    "Tape",
    "batch_stats",
    "batch_stats_vjp",
    "forward",
    "grad_graph",
    "node_attrs",
    "op_impl",
    "run_graph",
    "unbroadcast",
    "vjp",
]
