"""A device's domain signature: its adapted normalization statistics, projected to a few dozen numbers.

What a device's current domain looks like to the model is in the statistics its BatchNorm layers normalize with
(the adaptation method's ``forward_stats``, the EMA of recent batches on a device in the loop). Per channel, the
mean is taken relative to the bundle's own (version 0) statistics in units of their standard deviation, and the
variance as half the log ratio (a log-std shift); those features, over every layer, are projected by a fixed
seeded Gaussian matrix (``SEED``; the same on every device and in the cloud, numpy's PCG64 draws) to ``DIM``
numbers and divided by the square root of the feature count. Distances between signatures then approximate the
RMS per-channel shift between two domains (Johnson-Lindenstrauss), whatever the number of layers, so one
threshold means the same for every bundle. Cheap: one matrix-vector product per heartbeat. The cloud groups
devices by these (cloud/grouping.py); the wire schema is ``wire.DomainSignature``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

SCHEME = "bnproj-v1"
DIM = 64
SEED = 18
EPS = 1e-5

Stats = Mapping[str, tuple[np.ndarray, np.ndarray]]


@lru_cache(maxsize=8)
def projection(n_features: int, dim: int = DIM, seed: int = SEED) -> np.ndarray:
    """The fixed [dim, n_features] projection (cached; read-only)."""
    p = np.random.default_rng(seed).standard_normal((dim, n_features)) / np.sqrt(dim)
    p.setflags(write=False)
    return p


def stat_features(stats: Stats, reference: Stats, layers: Sequence[str]) -> np.ndarray:
    """Per channel of every layer (in ``layers`` order): the mean shift in reference standard deviations, then
    the log-std shift."""
    parts = []
    for name in layers:
        mean, var = (np.asarray(a, np.float64) for a in stats[name])
        ref_mean, ref_var = (np.asarray(a, np.float64) for a in reference[name])
        parts.append((mean - ref_mean) / np.sqrt(ref_var + EPS))
        parts.append(0.5 * np.log((np.maximum(var, 0.0) + EPS) / (ref_var + EPS)))
    return np.concatenate(parts) if parts else np.zeros(0)


def signature(stats: Stats, reference: Stats, layers: Sequence[str], dim: int = DIM) -> np.ndarray:
    """The ``dim`` numbers a device reports for the domain ``stats`` describe (float32)."""
    feats = stat_features(stats, reference, layers)
    if feats.size == 0:
        raise ValueError("no normalization layers: a domain signature needs BatchNorm statistics")
    if not np.isfinite(feats).all():
        raise ValueError("normalization statistics are not finite")
    return (projection(feats.size, dim) @ feats / np.sqrt(feats.size)).astype(np.float32)


def distance(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Euclidean distance of two signatures (~ the RMS per-channel shift between their domains)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
