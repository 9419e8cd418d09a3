"""Relative Mahalanobis (RMDS) on features aligned to the current domain (``rmds_aligned``).

Why: as ``mahalanobis_aligned``: RMDS fitted on clean images flags most of a corrupted domain (dev stream:
68%); moving each feature to the source's moments with the domain's running moments first removes the
domain-wide shift. The source background Gaussian gives the per-dimension source moments exactly. Same state
as ``rmds`` (older bundles serve it from there) and the same score while the domain is the source.

Measured (issue 21, dev stream): 74% of the shifted in-distribution flagged (plain RMDS 57%), near AUROC
0.65: kept as a measured candidate, not a default.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.domain_stats import DomainAligned, DomainFeatureStats
from edgeadapt.device.ood.mahalanobis import RMDS
from edgeadapt.device.ood.registry import register


@register
class RMDSAligned(DomainAligned, RMDS):
    name = "rmds_aligned"
    derived_from: ClassVar[str | None] = "rmds"

    def __init__(self, means, present, precision, bg_mean: np.ndarray, bg_precision: np.ndarray) -> None:
        super().__init__(means, present, precision, bg_mean, bg_precision)
        bg_var = np.diag(np.linalg.pinv(self.bg_precision, hermitian=True))
        self.domain = DomainFeatureStats(self.bg_mean, bg_var)

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return super().score(logits, self._aligned(features))
