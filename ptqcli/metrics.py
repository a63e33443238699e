"""How far one model's outputs are from another's: shared by fidelity, sensitivity and `ptq run`."""

from __future__ import annotations

import numpy as np


def as_probs(x: np.ndarray) -> np.ndarray:
    """Rows that are already distributions are used as they are; logits go through softmax."""
    if np.all(x >= 0) and np.allclose(x.sum(1), 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    p, q = np.clip(p, 1e-12, 1.0), np.clip(q, 1e-12, 1.0)
    return np.sum(p * np.log(p / q), axis=1)


def top1(x: np.ndarray) -> np.ndarray:
    """The predicted class of each sample (first axis), over all its other axes."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1).argmax(1)


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """Summed over the samples (first axis): squared error over the sample's signal power."""
    f = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    q = np.asarray(approx, dtype=np.float64).reshape(len(approx), -1)
    power = np.maximum(np.sum(f**2, axis=1), 1e-30)
    return float(np.sum(np.sum((f - q) ** 2, axis=1) / power))
