"""Class-conditional Mahalanobis on features aligned to the current domain (``mahalanobis_aligned``).

Why: Mahalanobis separates unknown classes and synthetic frames far better than logit scores, but fitted on
clean images it flags most of a corrupted domain (dev stream: 84%). Scoring the features after moving them
to the source's per-dimension moments with the domain's own running moments (``domain_stats``) keeps the
class structure the score needs and removes the shift the whole domain shares. Same statistics as
``mahalanobis`` (a bundle exported before this detector serves it from that state) and the same score while
the domain is the source, hence the same threshold.

Measured (issue 21, dev stream): per-dimension alignment does not keep the class structure: 99.9% of the
shifted in-distribution flagged (plain Mahalanobis 91%), near AUROC 0.61. Kept as a measured candidate;
``mahalanobis_domain`` (the domain's own class means and covariance) is what works.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.domain_stats import DomainAligned, DomainFeatureStats, gaussian_moments
from edgeadapt.device.ood.mahalanobis import Mahalanobis
from edgeadapt.device.ood.registry import register


@register
class MahalanobisAligned(DomainAligned, Mahalanobis):
    name = "mahalanobis_aligned"
    derived_from: ClassVar[str | None] = "mahalanobis"

    def __init__(self, means: np.ndarray, present: np.ndarray, precision: np.ndarray) -> None:
        super().__init__(means, present, precision)
        self.domain = DomainFeatureStats(*gaussian_moments(self.means, self.present, self.precision))

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return super().score(logits, self._aligned(features))
