"""``lame_skew``: LAME on the batches whose label mix is far from the stream's own recent marginal.

LAME helps a batch whose labels are correlated and hurts an i.i.d. one. ``lame_guard`` reads skew from the
batch's predicted-class histogram alone, and a model collapsing under a severe shift (most predictions in one
or two classes) looks exactly like a label-skewed batch. A collapse, though, is persistent: every batch of the
domain looks the same, so the stream's recent marginal collapses too. Label skew is a *departure* from it:
the classes of one batch are not the classes of the last thousand samples. So the test is

    KL( h  ||  pi )  > threshold        (nats; N >= min_batch)

with h the histogram of the batch's predicted classes and pi the EMA of those histograms over about ``horizon``
samples (momentum 1 - (1 - 1/horizon)^N per batch of N, so the horizon does not depend on the batch size; it
starts uniform). Hard predictions, not mean probabilities: an uncertain model's mean probabilities are near
uniform whatever the batch holds. For C = 10: an i.i.d. batch of 64 from the marginal itself sits near
(C-1)/(2N) = 0.07; a one-class batch against a marginal spread over 5 classes at ln 5 = 1.6; a collapsed model
against its own collapsed marginal near 0.
The marginal is updated after the test. Batches smaller than ``min_batch`` are never skewed (LAME needs
neighbours). The LAME options (knn, lam, max_steps, tol, symmetry) pass through.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.lame import LAME_DEFAULTS, Lame
from edgeadapt.device.methods.registry import register


class MarginalSkewTest:
    """KL of a batch's predicted-class histogram from the stream's recent one (an EMA over ~horizon samples)."""

    def __init__(self, num_classes: int, horizon: float = 1024.0):
        self.num_classes = num_classes
        self.horizon = horizon
        self.reset()

    def reset(self) -> None:
        self.marginal = np.full(self.num_classes, 1.0 / self.num_classes)

    def histogram(self, scores: np.ndarray) -> np.ndarray:
        """Predicted-class histogram of a batch of logits or probabilities [N, C]."""
        return np.bincount(np.asarray(scores).argmax(1), minlength=self.num_classes) / max(len(scores), 1)

    def score(self, scores: np.ndarray) -> float:
        h = self.histogram(scores)
        pi = np.clip(self.marginal, 1e-12, None)
        nz = h > 0
        return float((h[nz] * np.log(h[nz] / pi[nz])).sum())

    def update(self, scores: np.ndarray) -> None:
        n = len(scores)
        if n == 0:
            return
        m = 1.0 - (1.0 - 1.0 / self.horizon) ** n
        self.marginal = (1 - m) * self.marginal + m * self.histogram(scores)


@register
class LameSkew(AdaptationMethod):
    name = "lame_skew"
    defaults = {"threshold": 0.5, "horizon": 1024.0, "min_batch": 16, **LAME_DEFAULTS}

    def _validate(self) -> None:
        o = self.options
        self._check(o["threshold"] >= 0, "threshold must be >= 0")
        self._check(o["horizon"] >= 1, "horizon must be >= 1")
        self._check(o["min_batch"] >= 2, "min_batch must be >= 2")
        self._lame = Lame(self.ctx, **{k: o[k] for k in LAME_DEFAULTS})

    def reset(self) -> None:
        super().reset()
        self.test = MarginalSkewTest(self.ctx.num_classes, self.options["horizon"])
        self.last_score = 0.0
        self.last_skewed = False
        self.skewed_batches = 0

    def detect(self, logits: np.ndarray) -> bool:
        """Is this batch label-skewed against the stream's recent marginal? (no state change)"""
        self.last_score = self.test.score(logits) if len(logits) else 0.0
        return len(logits) >= self.options["min_batch"] and self.last_score > self.options["threshold"]

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        self.last_skewed = self.detect(logits)
        self.test.update(logits)
        if not self.last_skewed:
            return logits
        self.skewed_batches += 1
        return self._lame.adjust(logits, features, batch_info)

    def _state(self) -> dict[str, np.ndarray]:
        return {"marginal": self.test.marginal}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.test.marginal = np.asarray(state["marginal"], np.float64)
