"""A served batch's answers as arrays: the HTTP layer serializes them in one go instead of rebuilding per-sample
dicts of Python numbers; library callers still index or iterate per sample and get the dicts they always got."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True, eq=False)
class Predictions:
    """``pred`` [n] int64, ``probs``/``logits`` [n, C] float32 (after the method's output adjustment),
    ``ood`` [n] bool, ``ood_score``/``entropy`` [n] float32, and the parameter version that answered.
    Read-only by convention; not a frozen dataclass because the batcher cuts one slice per request and a
    frozen one's constructor (``object.__setattr__`` per field) was a tenth of the worker's GIL time at 50
    connections (py-spy, docs/NOTES.md "Serving")."""

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
    #: on a request's slice: the batch it was cut from and where it starts there (``lists`` is per batch)
    batch: Predictions | None = field(default=None, repr=False, compare=False)
    start: int = 0
    _lists: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_result(cls, res, labels: list[str]) -> Predictions:
        """From an engine ``BatchResult``."""
        return cls(pred=res.pred, probs=res.probs, logits=res.logits, ood=res.ood, ood_score=res.ood_score,
                   entropy=res.entropy, param_version=res.param_version, labels=labels, result=res)

    def __len__(self) -> int:
        return len(self.pred)

    def __getitem__(self, i: int | slice) -> Predictions | dict:
        if isinstance(i, slice):
            start, _, step = i.indices(len(self))
            return Predictions(self.pred[i], self.probs[i], self.logits[i], self.ood[i], self.ood_score[i],
                               self.entropy[i], self.param_version, self.labels, batch=self.batch or self,
                               start=self.start + start if step == 1 and self.start >= 0 else -1)
        c = int(self.pred[i])
        return {"class": c, "label": self.labels[c], "probs": self.probs[i], "ood": bool(self.ood[i]),
                "ood_score": float(self.ood_score[i]), "entropy": float(self.entropy[i]),
                "param_version": self.param_version}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def lists(self, top_k: int, probs: bool = False) -> tuple[dict[str, list], int, int]:
        """The answers as Python lists (what a JSON body is made of) -> (lists, first row, end row) of this
        request. Computed once per batch, for the whole batch: at one image per request the numpy calls per
        request (a top-k sort, five ``tolist``) cost more than the serialization; a slice reads its batch's."""
        src, lo = (self.batch, self.start) if self.batch is not None and self.start >= 0 else (self, 0)
        if src._lists is None:
            src._lists = {}
        key = (top_k, probs)
        out = src._lists.get(key)
        if out is None:
            p = src.probs
            k = min(top_k, p.shape[1])
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            out = {"class": src.pred.tolist(), "ood": src.ood.tolist(), "ood_score": src.ood_score.tolist(),
                   "entropy": src.entropy.tolist(), "order": order.tolist(),
                   "top": np.take_along_axis(p, order, 1).tolist()}
            if probs:
                out["probs"] = p.tolist()
            src._lists[key] = out
        return out, lo, lo + len(self)
