"""ViM, Virtual-logit Matching (Wang et al., CVPR 2022).

Fit (clean in-distribution features z [N,D], logits [N,C], head W [C,D], b [C]):
- origin u = -pinv(W) b (the point where all logits vanish), features centered as x = z - u;
- principal subspace: top ``D_p`` eigenvectors of x^T x / N; the residual space R is its orthogonal
  complement and the residual of a sample is ||x R||;
- alpha = sum_i max_k z_ik / sum_i ||x_i R|| on the fit data, so the virtual logit alpha * ||x R|| has
  the scale of the real logits.
Score: the paper's confidence is logsumexp(logits) - alpha*||x R|| (an energy with a virtual logit);
the OOD score here is its negation, alpha*||x R|| - logsumexp(logits) (higher = more OOD).

Principal dimension (the paper's rule): D_p = 1000 if D >= 1500, 512 if D >= 768, else D // 2 (OpenOOD
uses 256 for ResNet-18's 512 features). It is clamped to [1, D - 1] so the residual space is never empty;
with D = 64 and C = 10 this gives D_p = 32, leaving a 32-dimensional residual that the classifier
(rank <= C) mostly ignores. Pass ``principal_dim`` to override.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.base import OODDetector, _as_2d
from edgeadapt.device.ood.energy import logsumexp
from edgeadapt.device.ood.registry import register


def default_principal_dim(feature_dim: int) -> int:
    if feature_dim >= 1500:
        dp = 1000
    elif feature_dim >= 768:
        dp = 512
    else:
        dp = feature_dim // 2
    return int(min(max(dp, 1), max(feature_dim - 1, 1)))


@register
class ViM(OODDetector):
    name = "vim"
    uses_features: ClassVar[bool] = True

    def __init__(self, origin: np.ndarray, residual_basis: np.ndarray, alpha: float) -> None:
        super().__init__()
        self.origin = np.asarray(origin, dtype=np.float64).ravel()
        self.residual_basis = np.asarray(residual_basis, dtype=np.float64)
        self.alpha = float(alpha)

    @classmethod
    def fit(cls, features, logits, labels, head_weight, head_bias, principal_dim: int | None = None) -> ViM:
        z = _as_2d(features, "features")
        lg = _as_2d(logits, "logits")
        w = np.asarray(head_weight, dtype=np.float64)
        b = np.asarray(head_bias, dtype=np.float64).ravel()
        d = z.shape[1]
        if w.shape[1] != d:
            raise ValueError(f"head weight {w.shape} does not match feature dim {d}")
        u = -np.linalg.pinv(w) @ b
        x = z - u
        cov = x.T @ x / x.shape[0]
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1]
        dp = default_principal_dim(d) if principal_dim is None else int(principal_dim)
        if not 1 <= dp < d:
            raise ValueError(f"principal_dim must be in [1, {d - 1}], got {dp}")
        basis = np.ascontiguousarray(eigvecs[:, order[dp:]])
        residual = np.linalg.norm(x @ basis, axis=1)
        denom = residual.sum()
        alpha = lg.max(axis=1).sum() / denom if denom > 0 else 1.0
        if not np.isfinite(alpha) or alpha <= 0:  # mostly negative max logits: keep the virtual logit's sign sane
            alpha = np.abs(lg.max(axis=1)).sum() / denom if denom > 0 else 1.0
        return cls(u, basis, alpha)

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if features is None:
            raise ValueError("vim needs penultimate features")
        z = _as_2d(features, "features")
        lg = _as_2d(logits, "logits")
        vlogit = self.alpha * np.linalg.norm((z - self.origin) @ self.residual_basis, axis=1)
        return vlogit - logsumexp(lg)

    def state(self) -> dict[str, np.ndarray]:
        return {
            "origin": self.origin,
            "residual_basis": self.residual_basis,
            "alpha": np.array([self.alpha], dtype=np.float64),
        }

    @classmethod
    def _from_state(cls, state, head_weight, head_bias) -> ViM:
        return cls(state["origin"], state["residual_basis"], float(np.asarray(state["alpha"]).ravel()[0]))
