"""OOD evaluation metrics in numpy (no sklearn). Out-of-distribution is the POSITIVE class and a
higher score means more OOD, as everywhere in ``edgeadapt.device.ood``."""

from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions starts+1 .. ends
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve = P(score_out > score_in) + 0.5 * P(score_out == score_in)."""
    si = np.asarray(scores_in, dtype=np.float64).ravel()
    so = np.asarray(scores_out, dtype=np.float64).ravel()
    if si.size == 0 or so.size == 0:
        raise ValueError("need at least one in- and one out-of-distribution score")
    r = _ranks(np.concatenate([si, so]))
    u = r[si.size :].sum() - so.size * (so.size + 1) / 2.0
    return float(u / (si.size * so.size))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate (fraction of in-distribution samples flagged) at the highest threshold that
    still flags at least ``tpr`` of the OOD samples (OOD positive, as OpenOOD's FPR@95)."""
    si = np.asarray(scores_in, dtype=np.float64).ravel()
    so = np.sort(np.asarray(scores_out, dtype=np.float64).ravel())[::-1]
    if si.size == 0 or so.size == 0:
        raise ValueError("need at least one in- and one out-of-distribution score")
    k = max(1, math.ceil(tpr * so.size - 1e-9))
    thr = so[k - 1]
    return float((si >= thr).mean())
