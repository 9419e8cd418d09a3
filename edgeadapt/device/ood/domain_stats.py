"""Running statistics of the current domain's penultimate features, kept beside the source ones (numpy only).

Why: a feature-space detector fitted on clean images measures distance to the *source* feature distribution,
so under covariate shift (blur, noise, fog) every sample moves away and most of a corrupted domain is flagged.
Aligning each feature to the source per dimension with the domain's own moments,
``z' = mu_src + (z - mu_dom) * sd_src / sd_dom``, removes what the whole domain shares (the same idea as the
engine's normalization following the domain) and leaves what a single sample does differently: a sample of an
unknown class, or a synthetic frame, stays far from every class after alignment.

The moments are an EMA over batches. Outliers must not pull the domain toward themselves, so each batch's
moments are taken over its ``1 - trim`` share of samples closest to the current domain (robust to a few novel
samples per batch). At a domain shift (the engine's own detection) the batch's moments get a large weight,
as the engine's transductive forward gives the batch's own statistics ``n / (16 + n)``.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


class DomainFeatureStats:
    """EMA of per-dimension feature mean and variance of the current domain, starting at the source's."""

    def __init__(self, source_mean: np.ndarray, source_var: np.ndarray, momentum: float = 0.1,
                 shift_momentum: float = 0.8, trim: float = 0.2) -> None:
        self.source_mean = np.asarray(source_mean, np.float64).ravel()
        self.source_var = np.maximum(np.asarray(source_var, np.float64).ravel(), 0.0)
        self.momentum = float(momentum)
        self.shift_momentum = float(shift_momentum)
        self.trim = float(trim)
        floor = EPS + 1e-3 * float(self.source_var.mean())
        self._floor = floor
        self.source_sd = np.sqrt(self.source_var + floor)
        self.reset()

    def reset(self) -> None:
        self.mean = self.source_mean.copy()
        self.var = self.source_var.copy()
        self.batches = 0

    def align(self, z: np.ndarray) -> np.ndarray:
        """Features moved to the source's per-dimension moments (identity while the domain is the source)."""
        scale = self.source_sd / np.sqrt(self.var + self._floor)
        return self.source_mean + (np.asarray(z, np.float64) - self.mean) * scale

    def _distance(self, z: np.ndarray) -> np.ndarray:
        """Per-sample squared standardized distance to the current domain mean (diagonal)."""
        return (((z - self.mean) ** 2) / (self.var + self._floor)).sum(axis=1)

    def update(self, z: np.ndarray, shift: bool = False) -> None:
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or len(z) == 0:
            return
        keep = z
        n_keep = int(np.ceil((1.0 - self.trim) * len(z)))
        if 2 <= n_keep < len(z):
            keep = z[np.argsort(self._distance(z), kind="stable")[:n_keep]]
        m = self.shift_momentum if shift or self.batches == 0 else self.momentum
        bm, bv = keep.mean(axis=0), keep.var(axis=0)
        if len(keep) < 2:
            bv = self.var
        self.mean = (1 - m) * self.mean + m * bm
        self.var = (1 - m) * self.var + m * bv
        self.batches += 1


def gaussian_moments(means: np.ndarray, present: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and variance of the source features implied by class-conditional Gaussians with a
    shared covariance (classes weighted equally): what a detector exported before domain statistics existed
    can still be aligned to."""
    mu = np.asarray(means, np.float64)[np.asarray(present).astype(bool)]
    within = np.diag(np.linalg.pinv(np.asarray(precision, np.float64), hermitian=True))
    center = mu.mean(axis=0)
    return center, np.maximum(within, 0.0) + ((mu - center) ** 2).mean(axis=0)


class DomainAligned:
    """Mixin for a feature detector: score features aligned to the source with the current domain's moments.
    The subclass sets ``self.domain`` (a ``DomainFeatureStats``) and scores through ``_aligned``."""

    online = True
    domain: DomainFeatureStats

    def observe(self, logits: np.ndarray, features: np.ndarray | None = None, shift: bool = False) -> None:
        if features is not None:
            self.domain.update(np.asarray(features, np.float64).reshape(len(features), -1), shift)

    def reset_domain(self) -> None:
        self.domain.reset()

    def _aligned(self, features: np.ndarray | None) -> np.ndarray | None:
        return None if features is None else self.domain.align(np.asarray(features, np.float64))
