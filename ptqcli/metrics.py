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


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def next_token_terms(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Language-model logits [N, T, V] against their own token ids [N, T]: the negative log-likelihood
    of each next token and the log-probabilities it came from, at the positions where both the token
    and the next one are real (mask 1): ([P], [P, V])."""
    logp = log_softmax(logits[:, :-1].astype(np.float32))
    targets = ids[:, 1:]
    keep = np.ones(targets.shape, dtype=bool) if mask is None else (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    picked = np.take_along_axis(logp, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    return -picked[keep], logp[keep]


def top1(x: np.ndarray) -> np.ndarray:
    """The predicted class of each sample (first axis), over all its other axes."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1).argmax(1)


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """Summed over the samples (first axis): squared error over the sample's signal power. Sums run in
    float64 over chunks of a sample: a language model's logits are 12.6M values a sample, and whole
    float64 copies of both would cost hundreds of MB."""
    f = np.asarray(reference).reshape(len(reference), -1)
    q = np.asarray(approx).reshape(len(approx), -1)
    total = 0.0
    for row_f, row_q in zip(f, q):
        err = power = 0.0
        for lo in range(0, row_f.size, _CHUNK):
            part_f = row_f[lo:lo + _CHUNK].astype(np.float64)
            err += float(np.sum(np.square(part_f - row_q[lo:lo + _CHUNK])))
            power += float(np.sum(np.square(part_f)))
        total += err / max(power, 1e-30)
    return total


_CHUNK = 1 << 20


def sample_cosines(reference: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (first axis) over all its other axes.

    Two all-zero samples are identical (1); an all-zero sample against a non-zero one shares no
    direction with it (0)."""
    f = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    q = np.asarray(approx, dtype=np.float64).reshape(len(approx), -1)
    norm_f, norm_q = np.linalg.norm(f, axis=1), np.linalg.norm(q, axis=1)
    denom = norm_f * norm_q
    both_zero = (norm_f == 0) & (norm_q == 0)
    return np.where(denom > 0, np.sum(f * q, axis=1) / np.maximum(denom, 1e-300), np.where(both_zero, 1.0, 0.0))


def masked_mean_pool(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[N, T, H] token vectors averaged over the positions whose mask is non-zero ([N, T]); over every
    position when there is no mask. A sample with no unmasked position pools to zeros."""
    x = np.asarray(tokens, dtype=np.float64)
    if mask is None:
        return x.mean(axis=1)
    weights = (np.asarray(mask) != 0).astype(np.float64)[..., None]
    return np.sum(x * weights, axis=1) / np.maximum(np.sum(weights, axis=1), 1.0)
