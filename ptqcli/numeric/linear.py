"""Gemm and MatMul."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .core import OpImpl, slot, unbroadcast, wanted


@dataclass(frozen=True)
class _GemmCtx:
    a: np.ndarray | None  # kept only when B's cotangent is wanted
    b: np.ndarray | None  # kept only when A's cotangent is wanted
    c_shape: tuple[int, ...] | None
    alpha: float
    beta: float
    trans_a: bool
    trans_b: bool


def _gemm_forward(inputs, attrs, wants):
    a, b, c = inputs[0], inputs[1], slot(inputs, 2)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    y = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if alpha != 1.0:
        y *= alpha
    if c is not None:
        y += beta * c if beta != 1.0 else c
    ctx = _GemmCtx(a if wanted(wants, 1) else None, b if wanted(wants, 0) else None,
                   None if c is None else c.shape, alpha, beta, trans_a, trans_b)
    return (y,), ctx


def _gemm_vjp(ctx: _GemmCtx, g, wants):
    da = db = dc = None
    if wanted(wants, 0):
        # d(A') = alpha * g B'^T, with A' = A^T under transA: transpose back.
        da = g @ (ctx.b if ctx.trans_b else ctx.b.T)
        da = ctx.alpha * (da.T if ctx.trans_a else da)
    if wanted(wants, 1):
        db = (ctx.a if ctx.trans_a else ctx.a.T) @ g
        db = ctx.alpha * (db.T if ctx.trans_b else db)
    if wanted(wants, 2) and ctx.c_shape is not None:
        dc = unbroadcast(ctx.beta * g if ctx.beta != 1.0 else g, ctx.c_shape)
    return da, db, dc


def _matmul_forward(inputs, attrs, wants):
    a, b = inputs[0], inputs[1]
    # Each cotangent needs the other operand and the shape of its own: keep shapes, not arrays.
    ctx = (a if wanted(wants, 1) else a.shape, b if wanted(wants, 0) else b.shape)
    return (np.matmul(a, b),), ctx


def _matmul_vjp(ctx, g, wants):
    a, b = ctx
    a_shape = a if isinstance(a, tuple) else a.shape
    b_shape = b if isinstance(b, tuple) else b.shape
    # numpy treats a 1-D left operand as a row and a 1-D right operand as a column, then drops
    # that axis from the result: put it back on g so both products are plain batched matmuls.
    if len(a_shape) == 1:
        g = np.expand_dims(g, -2)
    if len(b_shape) == 1:
        g = np.expand_dims(g, -1)
    da = db = None
    if wanted(wants, 0):
        b2 = b.reshape(-1, 1) if b.ndim == 1 else b
        a2_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
        da = unbroadcast(g @ np.swapaxes(b2, -1, -2), a2_shape).reshape(a_shape)
    if wanted(wants, 1):
        a2 = a.reshape(1, -1) if a.ndim == 1 else a
        b2_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
        db = unbroadcast(np.swapaxes(a2, -1, -2) @ g, b2_shape).reshape(b_shape)
    return da, db


OPS = {
    "Gemm": OpImpl(_gemm_forward, _gemm_vjp, grad_inputs=(0, 1, 2)),
    "MatMul": OpImpl(_matmul_forward, _matmul_vjp, grad_inputs=(0, 1)),
}
