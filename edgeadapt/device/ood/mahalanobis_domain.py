"""Class-conditional Mahalanobis against the *current domain's* class Gaussians (``mahalanobis_domain``).

Why: Mahalanobis on penultimate features separates unknown classes and synthetic frames far better than
logit scores, but fitted on clean images it flags most of a corrupted domain (issue 21 dev stream: 91% of
the shifted in-distribution), which would starve the loop of the samples it must learn from. Under covariate
shift the classes still form clusters in feature space; they are moved and spread differently. So the
detector keeps, beside the source statistics, the current domain's class means and shared within-class
covariance, starting at the source's and following the stream as an EMA over batches:

- each batch is pseudo-labelled by the (adapted) classifier; its ``1 - trim`` share of samples closest to the
  current class means update the means of their predicted class and the covariance of the residuals, so a
  few novel samples per batch do not pull the domain toward themselves;
- the batch is observed before it is scored, as the engine's own normalization uses the batch: the first
  batch of a new domain is judged against that domain already (scoring first flagged 37% on the dev stream);
- at a domain shift (the engine's detection) the batch gets the larger weight ``shift_momentum``;
- the weights are those of a batch of ``REFERENCE_BATCH`` samples and compound with the number of samples
  behind each estimate (``1 - (1 - m) ** (n / REFERENCE_BATCH)`` for the covariance, a class's count against
  its share of a reference batch for its mean): two batches of 32 move the domain as one of 64 does, a class
  seen once in a batch barely moves, and a served request of three images barely moves anything.

Score: min_k (z - mu_k)^T Sigma^-1 (z - mu_k) over the domain's means and covariance. While the domain is the
source this is ``mahalanobis``'s score, so the exported threshold holds and a bundle exported before this
detector serves it from ``mahalanobis``'s state.

Cost: a new covariance needs a new precision, an O(D^3) eigendecomposition per batch: at one image per request
that was most of the daemon's time per request (docs/BENCHMARKS.md "Serving"). A batch of at most
``LOW_RANK_MAX`` kept samples changes the covariance by a scaled rank-n term, so its precision is updated by the
Woodbury identity instead (O(n D^2)); a full one follows every ``REFERENCE_BATCH / 4`` samples (and at a shift,
and for every larger batch, so at the benchmark's batch of 64 nothing changes), which bounds the float drift
and the ridge's (between updates it decays with the old covariance instead of following the new one's scale).
Both bounds grow with the feature dimension D (``low_rank_limits``: at most max(8, D/16) kept samples per Woodbury
update, a full one every max(REFERENCE_BATCH / 4, D / 4) samples): Woodbury costs O(n D^2) against the full
O(D^3), and at D = 1,280 (MobileNetV2, EfficientNet-B0) and batch 16 the full one every batch cost several static
forwards of the model (issue 15); at the reference model's D = 64 nothing changes.

Limit: a batch made only of novel inputs at a domain shift is taken for a new domain (the engine also
normalizes it with its own statistics, which makes its features look ordinary); novel inputs *mixed into* a
domain are what this flags.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.base import _as_2d
from edgeadapt.device.ood.mahalanobis import Mahalanobis, _precision, _sq_mahalanobis
from edgeadapt.device.ood.registry import register

#: chosen on the dev stream (held-out training images, issue 21): EMA weight of a batch, of the first batch of a
#: domain, and the share of each batch (farthest from the domain) left out of the update
MOMENTUM = 0.35
SHIFT_MOMENTUM = 0.5
TRIM = 0.1
#: the batch size the weights are meant for (the benchmark's and the dev stream's)
REFERENCE_BATCH = 64
#: batches of at most this many kept samples update the precision by Woodbury (module docstring, "Cost")
LOW_RANK_MAX = 8


def _woodbury(precision: np.ndarray, decay: float, u: np.ndarray) -> np.ndarray:
    """The inverse of ``decay * A + u.T @ u`` from ``precision`` = A^-1 and ``u`` [n, D]: an n x n solve."""
    b = precision / decay
    bu = u @ b  # [n, D]
    inner = np.eye(len(u)) + bu @ u.T
    out = b - bu.T @ np.linalg.solve(inner, bu)
    return 0.5 * (out + out.T)


@register
class MahalanobisDomain(Mahalanobis):
    name = "mahalanobis_domain"
    online: ClassVar[bool] = True
    derived_from: ClassVar[str | None] = "mahalanobis"

    def __init__(self, means: np.ndarray, present: np.ndarray, precision: np.ndarray, momentum: float = MOMENTUM,
                 shift_momentum: float = SHIFT_MOMENTUM, trim: float = TRIM,
                 reference_batch: int = REFERENCE_BATCH, low_rank_max: int = LOW_RANK_MAX) -> None:
        super().__init__(means, present, precision)
        self.momentum, self.shift_momentum, self.trim = float(momentum), float(shift_momentum), float(trim)
        self.reference_batch = int(reference_batch)
        self.low_rank_max = int(low_rank_max)
        self._classes = np.flatnonzero(self.present)
        self._source_within = np.linalg.pinv(self.precision, hermitian=True)
        self.reset_domain()

    def reset_domain(self) -> None:
        self.domain_means = self.means.copy()
        self.domain_within = self._source_within.copy()
        self.domain_precision = self.precision.copy()
        self.domain_batches = 0
        self._low_rank_samples = 0  # samples folded in by Woodbury since the last full precision

    def low_rank_limits(self, dim: int) -> tuple[int, int]:
        """(most kept samples a Woodbury update takes, samples between full precisions) at feature dimension
        ``dim`` (module docstring, "Cost"); ``low_rank_max`` 0 turns Woodbury off at any dimension."""
        if self.low_rank_max <= 0:
            return 0, 0
        return max(self.low_rank_max, dim // 16), max(self.reference_batch // 4, dim // 4)

    def _pseudo_labels(self, logits: np.ndarray | None, d: np.ndarray) -> np.ndarray:
        """Predicted class per sample among the fitted classes (nearest domain mean without usable logits)."""
        if logits is not None:
            lg = _as_2d(logits, "logits")
            if lg.shape[1] == len(self.present) and lg.shape[0] == d.shape[0]:
                return self._classes[lg[:, self._classes].argmax(axis=1)]
        return self._classes[d.argmin(axis=1)]

    def observe(self, logits: np.ndarray, features: np.ndarray | None = None, shift: bool = False) -> None:
        if features is None:
            return
        z = _as_2d(features, "features")
        if len(z) == 0 or not np.isfinite(z).all():
            return
        d = _sq_mahalanobis(z, self.domain_means[self._classes], self.domain_precision)
        nearest = d.min(axis=1)
        keep = nearest <= np.quantile(nearest, 1.0 - self.trim) if len(z) > 1 else np.ones(len(z), bool)
        labels = self._pseudo_labels(logits, d)
        m0 = self.shift_momentum if shift or self.domain_batches == 0 else self.momentum
        per_class = self.reference_batch / len(self._classes)  # a class's share of a reference batch
        means = self.domain_means.copy()
        for k in self._classes:
            idx = keep & (labels == k)
            if idx.any():
                mk = 1.0 - (1.0 - m0) ** (idx.sum() / per_class)
                means[k] = (1 - mk) * means[k] + mk * z[idx].mean(axis=0)
        within, precision = self.domain_within, self.domain_precision
        low_rank = self._low_rank_samples
        if keep.any():
            n = int(keep.sum())
            m = 1.0 - (1.0 - m0) ** (n / self.reference_batch)
            r = z[keep] - means[labels[keep]]
            within = (1 - m) * within + m * (r.T @ r / n)
            try:
                max_n, refit = self.low_rank_limits(z.shape[1])
                if n <= max_n and self.domain_batches > 0 and not shift and low_rank + n < refit:
                    precision, low_rank = _woodbury(precision, 1 - m, r * np.sqrt(m / n)), low_rank + n
                else:
                    precision, low_rank = _precision(within), 0
            except np.linalg.LinAlgError:  # a degenerate batch never replaces a usable domain
                return
        if not (np.isfinite(means).all() and np.isfinite(precision).all()):
            return
        self.domain_means, self.domain_within, self.domain_precision = means, within, precision
        self._low_rank_samples = low_rank
        self.domain_batches += 1

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if features is None:
            raise ValueError(f"{self.name} needs penultimate features")
        z = _as_2d(features, "features")
        return _sq_mahalanobis(z, self.domain_means[self._classes], self.domain_precision).min(axis=1)
