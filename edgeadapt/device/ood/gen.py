"""GEN, Generalized ENtropy (Liu, Lochman & Zach, CVPR 2023).

G_gamma(p) = sum_{j in top-M} p_j^gamma * (1 - p_j)^gamma over the M largest softmax probabilities,
gamma = 0.1, M = min(10, C) (the paper uses M=100 for ImageNet-1k; with few classes all of them count).
The paper's confidence is -G; the OOD score here is G itself (higher = more OOD): a one-hot
prediction gives 0, a uniform one the maximum M * (1/C)^gamma * (1 - 1/C)^gamma.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.core.mathops import softmax
from edgeadapt.device.ood.base import LogitDetector
from edgeadapt.device.ood.registry import register


def generalized_entropy(probs: np.ndarray, gamma: float = 0.1, m: int = 10) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    m = min(m, probs.shape[-1])
    top = np.sort(probs, axis=-1)[..., -m:]
    return (top**gamma * (1.0 - top) ** gamma).sum(axis=-1)


@register
class GEN(LogitDetector):
    name = "gen"
    gamma: ClassVar[float] = 0.1
    top_m: ClassVar[int] = 10

    def _score_logits(self, logits: np.ndarray) -> np.ndarray:
        return generalized_entropy(softmax(logits), self.gamma, self.top_m)
