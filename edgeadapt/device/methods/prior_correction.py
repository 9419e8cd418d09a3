"""``prior_correction``: ROID's label-prior correction of the outputs (Marsden et al., WACV 2024), output-only.

A batch whose labels come from a few classes should not be predicted as if all classes were equally likely.
With p the batch's softmax outputs [N, C], ROID estimates the batch's label prior and smooths it toward uniform
by how little evidence one batch carries:

    prior  = mean_i p_i
    smooth = max(1/N, 1/C) / max(prior)
    prior' = (prior + smooth) / (1 + smooth * C)          (sums to 1)
    output = log p_i + log prior'                          (Bayes: p(y|x) under the batch's prior)

``space="logits"`` multiplies the logits by prior' instead, as ROID's public code does (``outputs *= prior'``).
At N = 1 the smoothed prior is nearly uniform and the product is monotonic in p: no prediction changes; the
correction acts only where a batch holds several samples of few classes. No state.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.core.mathops import log_softmax, softmax
from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.registry import register


def smoothed_prior(probs: np.ndarray) -> np.ndarray:
    """ROID's smoothed batch label prior [C]."""
    n, c = probs.shape
    prior = probs.mean(0)
    smooth = max(1.0 / n, 1.0 / c) / max(float(prior.max()), 1e-12)
    return (prior + smooth) / (1.0 + smooth * c)


@register
class PriorCorrection(AdaptationMethod):
    name = "prior_correction"
    defaults = {"space": "prob"}

    def _validate(self) -> None:
        self._check(self.options["space"] in ("prob", "logits"), "space must be prob or logits")

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        if len(logits) == 0:
            return logits
        z = np.asarray(logits, np.float64)
        prior = smoothed_prior(softmax(z))
        if self.options["space"] == "logits":
            return (z * prior).astype(np.float32)
        return (log_softmax(z) + np.log(prior)).astype(np.float32)
