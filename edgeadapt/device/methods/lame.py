"""``lame``: Laplacian Adjusted Maximum-likelihood Estimation (Boudiaf et al., CVPR 2022), output-only.

For a batch with probabilities p [N,C] and L2-normalized features, LAME finds assignments y by the
bound-optimization fixed point (as in the authors' code):

    unary = -log(p + 1e-10);  y = softmax(-unary)
    repeat <= max_steps:  y = softmax(-unary + lam * W y)
        E = sum(unary * y - lam * (W y) * y + y log y);  stop (after step 2) when |E - E_old| <= tol * |E_old|

W is the binary kNN affinity (k = ``knn`` nearest neighbours by Euclidean distance of the normalized features,
zero diagonal). ``symmetry``: "max" (default, W = max(W, W^T): binary and symmetric), "mean" (W = (W + W^T)/2,
the authors' ``force_symmetry``) or "none" (the authors' default directed kNN graph).
Returns log y (log-probabilities). Batches with fewer than knn + 1 samples are returned unchanged.
No state: LAME works on one batch at a time.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.core.mathops import log_softmax
from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.registry import register

LAME_DEFAULTS = {"knn": 5, "lam": 1.0, "max_steps": 100, "tol": 1e-8, "symmetry": "max"}


def knn_affinity(features: np.ndarray, knn: int, symmetry: str = "max") -> np.ndarray:
    """Binary kNN affinity [N,N] on L2-normalized features, zero diagonal."""
    z = np.asarray(features, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    n = len(z)
    sq = (z * z).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.fill_diagonal(dist, np.inf)
    k = min(knn, n - 1)
    w = np.zeros((n, n))
    if k > 0:
        idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
        np.put_along_axis(w, idx, 1.0, axis=1)
    if symmetry == "max":
        w = np.maximum(w, w.T)
    elif symmetry == "mean":
        w = 0.5 * (w + w.T)
    return w


def lame_solve(
    log_probs: np.ndarray, affinity: np.ndarray, lam: float = 1.0, max_steps: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, int]:
    """LAME's fixed point; returns (log y [N,C], iterations run)."""
    unary = -np.log(np.exp(log_probs) + 1e-10)
    y = np.exp(log_softmax(-unary))
    log_y = np.log(np.clip(y, 1e-20, None))
    old_e = np.inf
    steps = 0
    for i in range(max_steps):
        steps = i + 1
        pairwise = lam * (affinity @ y)
        log_y = log_softmax(-unary + pairwise)
        y = np.exp(log_y)
        e = float((unary * y - pairwise * y + y * np.log(np.clip(y, 1e-20, None))).sum())
        if i > 1 and abs(e - old_e) <= tol * abs(old_e):
            break
        old_e = e
    return log_y, steps


@register
class Lame(AdaptationMethod):
    name = "lame"
    defaults = dict(LAME_DEFAULTS)

    def _validate(self) -> None:
        o = self.options
        self._check(o["knn"] >= 1, "knn must be >= 1")
        self._check(o["max_steps"] >= 1, "max_steps must be >= 1")
        self._check(o["tol"] >= 0, "tol must be >= 0")
        self._check(o["symmetry"] in ("max", "mean", "none"), "symmetry must be max, mean or none")

    def reset(self) -> None:
        super().reset()
        self.last_steps = 0

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        o = self.options
        if len(logits) < o["knn"] + 1:
            self.last_steps = 0
            return logits
        w = knn_affinity(features, o["knn"], o["symmetry"])
        log_p = log_softmax(np.asarray(logits, np.float64))
        log_y, self.last_steps = lame_solve(log_p, w, o["lam"], o["max_steps"], o["tol"])
        return log_y.astype(np.float32)
