"""Numerically safe softmax / entropy helpers used on both sides (numpy only)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def entropy_from_logits(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of softmax(logits) per row."""
    lp = log_softmax(logits.astype(np.float64))
    return -(np.exp(lp) * lp).sum(axis=-1)


def entropy_from_probs(probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    p = np.clip(probs.astype(np.float64), eps, 1.0)
    return -(p * np.log(p)).sum(axis=-1)
