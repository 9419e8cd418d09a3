"""Mahalanobis (MDS, Lee et al. 2018) and relative Mahalanobis (RMDS, Ren et al. 2021) on penultimate features.

Fit (clean in-distribution features z with labels y):
- class means mu_k and one covariance shared by all classes, Sigma = mean_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T;
- RMDS also fits a single "background" Gaussian to all features, mu_0 = mean(z), Sigma_0 = cov(z).
MD_k(z) = (z - mu_k)^T Sigma^-1 (z - mu_k) (squared), MD_0(z) the same with (mu_0, Sigma_0).

Scores (higher = more OOD):
- ``mahalanobis``: min_k MD_k(z)                        (confidence in the paper: -min_k MD_k)
- ``rmds``:        min_k (MD_k(z) - MD_0(z))           (confidence in the paper: max_k -(MD_k - MD_0))

Inverses are pseudo-inverses of the covariance plus a small ridge (1e-6 * mean eigenvalue), so a
rank-deficient covariance (post-ReLU features, N < D) does not blow up. Classes absent from the
calibration data are ignored in the minimum. Statistics are stored as float64.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.base import OODDetector, _as_2d
from edgeadapt.device.ood.registry import register

RIDGE = 1e-6


def _precision(cov: np.ndarray) -> np.ndarray:
    d = cov.shape[0]
    scale = float(np.trace(cov)) / max(d, 1)
    ridge = RIDGE * scale if scale > 0 else RIDGE
    prec = np.linalg.pinv(cov + ridge * np.eye(d), hermitian=True)
    return 0.5 * (prec + prec.T)


def _sq_mahalanobis(z: np.ndarray, means: np.ndarray, prec: np.ndarray) -> np.ndarray:
    """[N, K] squared Mahalanobis distances of rows of z [N,D] to means [K,D] under one precision [D,D]."""
    zp = z @ prec
    zz = np.einsum("nd,nd->n", zp, z)
    mp = means @ prec  # two matrix products, not a three-operand einsum (a C loop 10x slower per request)
    mm = np.einsum("kd,kd->k", mp, means)
    d = zz[:, None] - 2.0 * z @ mp.T + mm[None, :]
    return np.maximum(d, 0.0)


def _fit_class_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int):
    z = _as_2d(features, "features")
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.shape[0] != z.shape[0]:
        raise ValueError("features and labels disagree on N")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    means = np.zeros((num_classes, z.shape[1]))
    present = np.zeros(num_classes, dtype=np.uint8)
    centered = np.empty_like(z)
    for k in range(num_classes):
        idx = y == k
        if idx.any():
            means[k] = z[idx].mean(axis=0)
            present[k] = 1
            centered[idx] = z[idx] - means[k]
    if not present.any():
        raise ValueError("no calibration samples")
    cov = centered.T @ centered / z.shape[0]
    return z, means, present, _precision(cov)


@register
class Mahalanobis(OODDetector):
    name = "mahalanobis"
    uses_features: ClassVar[bool] = True

    def __init__(self, means: np.ndarray, present: np.ndarray, precision: np.ndarray) -> None:
        super().__init__()
        self.means = np.asarray(means, dtype=np.float64)
        self.present = np.asarray(present).astype(bool)
        self.precision = np.asarray(precision, dtype=np.float64)

    @classmethod
    def fit(cls, features, logits, labels, head_weight, head_bias) -> Mahalanobis:
        _, means, present, prec = _fit_class_gaussians(features, labels, np.asarray(head_weight).shape[0])
        return cls(means, present, prec)

    def _class_distances(self, features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if features is None:
            raise ValueError(f"{self.name} needs penultimate features")
        z = _as_2d(features, "features")
        d = _sq_mahalanobis(z, self.means[self.present], self.precision)
        return z, d

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        _, d = self._class_distances(features)
        return d.min(axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "present": self.present.astype(np.uint8), "precision": self.precision}

    @classmethod
    def _from_state(cls, state, head_weight, head_bias) -> Mahalanobis:
        return cls(state["means"], state["present"], state["precision"])


@register
class RMDS(Mahalanobis):
    name = "rmds"

    def __init__(self, means, present, precision, bg_mean: np.ndarray, bg_precision: np.ndarray) -> None:
        super().__init__(means, present, precision)
        self.bg_mean = np.asarray(bg_mean, dtype=np.float64).ravel()
        self.bg_precision = np.asarray(bg_precision, dtype=np.float64)

    @classmethod
    def fit(cls, features, logits, labels, head_weight, head_bias) -> RMDS:
        z, means, present, prec = _fit_class_gaussians(features, labels, np.asarray(head_weight).shape[0])
        mu0 = z.mean(axis=0)
        c0 = z - mu0
        cov0 = c0.T @ c0 / z.shape[0]
        return cls(means, present, prec, mu0, _precision(cov0))

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        z, d = self._class_distances(features)
        d0 = _sq_mahalanobis(z, self.bg_mean[None, :], self.bg_precision)[:, 0]
        return d.min(axis=1) - d0

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), "bg_mean": self.bg_mean, "bg_precision": self.bg_precision}

    @classmethod
    def _from_state(cls, state, head_weight, head_bias) -> RMDS:
        return cls(state["means"], state["present"], state["precision"], state["bg_mean"], state["bg_precision"])
