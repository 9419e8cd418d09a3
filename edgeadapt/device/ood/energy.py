"""Energy score (Liu et al. 2020): E(x) = -T * logsumexp(z / T), T = 1. OOD score = E(x) (higher = more OOD)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.device.ood.base import LogitDetector
from edgeadapt.device.ood.registry import register


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


@register
class Energy(LogitDetector):
    name = "energy"
    temperature: ClassVar[float] = 1.0

    def _score_logits(self, logits: np.ndarray) -> np.ndarray:
        t = self.temperature
        return -t * logsumexp(logits / t)
