"""A served batch's answers as arrays: the HTTP layer serializes them in one go instead of rebuilding per-sample
dicts of Python numbers; library callers still index or iterate per sample and get the dicts they always got."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """``pred`` [n] int64, ``probs``/``logits`` [n, C] float32 (after the method's output adjustment),
    ``ood`` [n] bool, ``ood_score``/``entropy`` [n] float32, and the parameter version that answered."""

    pred: np.ndarray
    probs: np.ndarray
    logits: np.ndarray
    ood: np.ndarray
    ood_score: np.ndarray
    entropy: np.ndarray
    param_version: int
    labels: list[str]
    #: the whole batch's engine result (the daemon's after-batch work reads it); None on a request's slice
    result: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_result(cls, res, labels: list[str]) -> Predictions:
        """From an engine ``BatchResult``."""
        return cls(pred=res.pred, probs=res.probs, logits=res.logits, ood=res.ood, ood_score=res.ood_score,
                   entropy=res.entropy, param_version=res.param_version, labels=labels, result=res)

    def __len__(self) -> int:
        return len(self.pred)

    def __getitem__(self, i: int | slice) -> Predictions | dict:
        if isinstance(i, slice):
            return Predictions(self.pred[i], self.probs[i], self.logits[i], self.ood[i], self.ood_score[i],
                               self.entropy[i], self.param_version, self.labels)
        c = int(self.pred[i])
        return {"class": c, "label": self.labels[c], "probs": self.probs[i], "ood": bool(self.ood[i]),
                "ood_score": float(self.ood_score[i]), "entropy": float(self.entropy[i]),
                "param_version": self.param_version}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))
