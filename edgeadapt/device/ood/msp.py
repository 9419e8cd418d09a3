"""MSP (Hendrycks & Gimpel 2017): confidence = max softmax probability; OOD score = -max_k p_k."""

from __future__ import annotations

import numpy as np

from edgeadapt.core.mathops import softmax
from edgeadapt.device.ood.base import LogitDetector
from edgeadapt.device.ood.registry import register


@register
class MSP(LogitDetector):
    name = "msp"

    def _score_logits(self, logits: np.ndarray) -> np.ndarray:
        return -softmax(logits).max(axis=-1)
