"""The interface every OOD detector implements (scoring side, numpy only).

Convention: ``score`` returns one float per sample and HIGHER means MORE out-of-distribution.
A detector is fitted at export time on clean in-distribution calibration data (penultimate features,
logits, labels and the classifier head ``logits = features @ head_weight.T + head_bias``); what it
learned is a flat ``dict[str, np.ndarray]`` (``state()``) that goes into ``calib.safetensors``. The head
itself is not stored in the state: the device already has it and passes it to ``from_state``.

``threshold`` is set by ``calibrate_threshold`` so that a fraction ``tpr`` (default 95%) of the
in-distribution calibration scores pass (``score <= threshold``); ``is_ood`` flags the rest.

Online detectors (``online = True``) keep statistics of the device's current domain beside the source ones:
the engine calls ``observe`` with each adapting batch's logits and features *before* scoring it, as its own
normalization already uses the batch. A detector that can be rebuilt from another detector's exported state
(same statistics, same score on clean data, hence the same threshold) names it in ``derived_from``, so bundles
exported before it existed still serve it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np


def _as_2d(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, K], got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def quantile_threshold(scores_in: np.ndarray, tpr: float = 0.95) -> float:
    """Smallest calibration score ``t`` such that at least ``tpr`` of ``scores_in`` satisfy ``score <= t``."""
    s = np.sort(np.asarray(scores_in, dtype=np.float64).ravel())
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite in-distribution scores to calibrate a threshold on")
    if not 0.0 < tpr <= 1.0:
        raise ValueError("tpr must be in (0, 1]")
    k = max(1, math.ceil(tpr * s.size - 1e-9))
    return float(s[k - 1])


class OODDetector(ABC):
    """Abstract OOD detector. Subclasses set ``name`` and ``uses_features`` and register themselves."""

    name: ClassVar[str]
    uses_features: ClassVar[bool] = False
    online: ClassVar[bool] = False
    derived_from: ClassVar[str | None] = None

    def __init__(self) -> None:
        self.threshold: float = math.inf

    # ----------------------------------------------------------------- fitting
    @classmethod
    @abstractmethod
    def fit(
        cls,
        features: np.ndarray,
        logits: np.ndarray,
        labels: np.ndarray,
        head_weight: np.ndarray,
        head_bias: np.ndarray,
    ) -> OODDetector:
        """Fit on clean in-distribution data: features [N,D], logits [N,C], labels [N], head [C,D] and [C]."""

    # ----------------------------------------------------------------- scoring
    @abstractmethod
    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """OOD score per sample, shape [N], float64; higher = more OOD."""

    def observe(self, logits: np.ndarray, features: np.ndarray | None = None, shift: bool = False) -> None:
        """Follow the current domain with one batch (``shift``: the engine saw a domain change at this batch).
        Static detectors keep nothing, so the default does nothing."""
        return None

    def reset_domain(self) -> None:
        """Forget the current domain (back to the source statistics); nothing to forget by default."""
        return None

    def is_ood(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return self.score(logits, features) > self.threshold

    def calibrate_threshold(self, scores_in: np.ndarray, tpr: float = 0.95) -> float:
        """Set ``threshold`` so that ``tpr`` of the in-distribution scores pass (score <= threshold)."""
        self.threshold = quantile_threshold(scores_in, tpr)
        return self.threshold

    # ----------------------------------------------------------------- storage
    def state(self) -> dict[str, np.ndarray]:
        """Fitted statistics as numpy arrays (safetensors-storable). The threshold is stored by the caller."""
        return {}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], head_weight: np.ndarray, head_bias: np.ndarray) -> OODDetector:
        """Rebuild from ``state()``; a ``threshold`` entry, when present, restores the threshold."""
        det = cls._from_state(state, np.asarray(head_weight), np.asarray(head_bias))
        if "threshold" in state:
            det.threshold = float(np.asarray(state["threshold"]).ravel()[0])
        return det

    @classmethod
    def _from_state(cls, state: dict[str, np.ndarray], head_weight: np.ndarray, head_bias: np.ndarray) -> OODDetector:
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold:.6g})"


class LogitDetector(OODDetector):
    """A detector that needs nothing but the logits (nothing to fit besides the threshold)."""

    uses_features: ClassVar[bool] = False

    @classmethod
    def fit(cls, features, logits, labels, head_weight, head_bias) -> OODDetector:
        return cls()

    def score(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return self._score_logits(_as_2d(logits, "logits"))

    @abstractmethod
    def _score_logits(self, logits: np.ndarray) -> np.ndarray: ...
