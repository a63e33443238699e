"""Adam (Kingma and Ba), functional: the optimiser of synthetic data and of layer-wise rounding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamState:
    m: np.ndarray
    v: np.ndarray
    step: int = 0


def adam_init(x: np.ndarray) -> AdamState:
    return AdamState(np.zeros_like(x), np.zeros_like(x))


def adam_step(x: np.ndarray, g: np.ndarray, state: AdamState, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> tuple[np.ndarray, AdamState]:
    """One Adam update with bias correction; returns new arrays, the inputs untouched."""
    step = state.step + 1
    m = beta1 * state.m + (1 - beta1) * g
    v = beta2 * state.v + (1 - beta2) * np.square(g)
    m_hat_scale = lr / (1 - beta1**step)
    v_hat_scale = 1 / (1 - beta2**step)
    x = x - (m_hat_scale * m / (np.sqrt(v * v_hat_scale) + eps)).astype(x.dtype, copy=False)
    return x, AdamState(m, v, step)
