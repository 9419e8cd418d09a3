"""MaxLogit (Hendrycks et al. 2022): confidence = max_k z_k; OOD score = -max_k z_k."""

from __future__ import annotations

import numpy as np

from edgeadapt.device.ood.base import LogitDetector
from edgeadapt.device.ood.registry import register


@register
class MaxLogit(LogitDetector):
    name = "maxlogit"

    def _score_logits(self, logits: np.ndarray) -> np.ndarray:
        return -logits.max(axis=-1)
