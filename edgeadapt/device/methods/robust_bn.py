"""``rbn``: RoTTA's robust batch normalization over a class-balanced memory (Yuan et al., CVPR 2023), forward-only.

Normalization statistics that a run of one class cannot drag along: a batch is never normalized with its own
statistics; the statistics are an EMA of the statistics of a *memory* of recent inputs kept balanced over the
predicted classes (RoTTA's category-balanced sampling with timeliness and uncertainty, CSTU):

- memory of ``capacity`` (64) inputs, balanced over the predicted classes (capacity / C each). A new sample
  enters with score ``lambda_t * sigmoid(age / capacity) + lambda_u * H(p) / ln C`` (age 0): while the memory
  has room it is added; once it is full, a sample whose class holds fewer than capacity / C items evicts the
  highest-scoring (oldest, most uncertain) item of the largest classes, if that score is above its own, and a
  sample of a class at its share does the same within its class. Every item ages by one per candidate
  (RoTTA's ``add_age``). RoTTA also refuses a sample of a class at its share while the memory has room
  (``fill_free=false``); under a severe shift the source model predicts one class for everything and that
  memory never holds more than capacity / C samples of the new domain (dev stream, contrast: stuck at 7 items,
  no update, 9.8% accuracy), so by default a free slot is always filled and balance is kept by eviction.
- every ``ref_batch`` (64) samples seen, the runtime runs the memory through the adaptive graph normalized as
  RoTTA's RBN does in training mode (stat_mix ``alpha``: (1 - alpha) * running + alpha * memory at every
  layer) and the running statistics move: mu <- (1 - m) mu + m mu_mem, var <- (1 - m) var + m var_mem, with
  m = 1 - (1 - alpha)^(samples / ref_batch) (alpha = 0.05 per reference batch, RoTTA's value).
- predictions use the running statistics only (the runtime's fast folded session), so they do not depend on
  the batch size or on which classes share a batch.

Options beyond RoTTA's: ``mix`` (the memory forward's in-batch mix; -1 = alpha, as RoTTA), ``balance``
(false: a plain FIFO of the last ``capacity`` samples, for comparison), ``shift_momentum`` (the first ``shift_updates`` updates after the runtime reports a
domain shift use at least this momentum; 0 = RoTTA as published), ``min_fill`` (the memory must hold this many
items before it updates anything), ``exclude_ood`` (a sample the novelty flag marks, in a batch where few are
marked, never enters the memory).
The memory is transient: ``state_dict`` carries the statistics, not the memory's images (a restored or reset
state starts with an empty memory, which refills within a batch or so).
"""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo, Stats
from edgeadapt.device.methods.registry import register


class ClassBalancedMemory:
    """RoTTA's CSTU memory over predicted classes (numpy arrays; the inputs themselves are kept)."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0,
                 fill_free: bool = True):
        self.capacity = capacity
        self.fill_free = fill_free
        self.num_classes = num_classes
        self.per_class = capacity / num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.clear()

    def clear(self) -> None:
        self.x: np.ndarray | None = None
        self.cls = np.full(self.capacity, -1, np.int64)
        self.age = np.zeros(self.capacity)
        self.unc = np.zeros(self.capacity)

    def __len__(self) -> int:
        return int((self.cls >= 0).sum())

    def counts(self) -> np.ndarray:
        return np.bincount(self.cls[self.cls >= 0], minlength=self.num_classes)

    def score(self, age: np.ndarray | float, unc: np.ndarray | float) -> np.ndarray | float:
        return self.lambda_t / (1 + np.exp(-np.asarray(age) / self.capacity)) + \
            self.lambda_u * np.asarray(unc) / math.log(self.num_classes)

    def _evict_from(self, classes: np.ndarray, new_score: float) -> bool:
        """Evict the highest-scoring item of ``classes`` if it scores above ``new_score``; True = room was made."""
        cand = np.flatnonzero(np.isin(self.cls, classes))
        if len(cand) == 0:
            return True
        scores = self.score(self.age[cand], self.unc[cand])
        j = len(scores) - 1 - int(np.argmax(scores[::-1]))  # the last maximum, as RoTTA's ">=" scan
        if scores[j] > new_score:
            self.cls[cand[j]] = -1
            return True
        return False

    def add(self, x: np.ndarray, cls: int, unc: float) -> bool:
        """Offer one sample; returns whether it was stored."""
        if self.x is None:
            self.x = np.zeros((self.capacity, *x.shape), np.float32)
        new_score = float(self.score(0.0, unc))
        counts = self.counts()
        if len(self) < self.capacity and (self.fill_free or counts[cls] < self.per_class):
            ok = True
        elif counts[cls] < self.per_class:
            ok = self._evict_from(np.flatnonzero(counts == counts.max()), new_score)
        else:
            ok = self._evict_from(np.array([cls]), new_score)
        if ok:
            slot = int(np.flatnonzero(self.cls < 0)[0])
            self.x[slot], self.cls[slot], self.age[slot], self.unc[slot] = x, cls, 0.0, unc
        self.age[self.cls >= 0] += 1  # RoTTA ages every item (the new one too) per candidate
        return ok

    def inputs(self) -> np.ndarray:
        if self.x is None:
            return np.zeros((0,), np.float32)
        return self.x[self.cls >= 0]


@register
class RobustBN(AdaptationMethod):
    name = "rbn"
    needs_stats = True
    provides_stats = True
    owns_stats_inputs = True
    refresh_every = 1  # the statistics move once per reference batch: fold them in at the next batch
    defaults = {
        "capacity": 64,
        "alpha": 0.05,
        "mix": -1.0,
        "ref_batch": 64,
        "lambda_t": 1.0,
        "lambda_u": 1.0,
        "min_fill": 16,
        "shift_momentum": 0.0,
        "shift_updates": 1,
        "exclude_ood": True,
        "fill_free": True,
        "balance": True,
        "max_ood_fraction": 0.5,
    }

    def _validate(self) -> None:
        o = self.options
        self._check(o["capacity"] >= 2, "capacity must be >= 2")
        self._check(0 < o["alpha"] <= 1, "alpha must be in (0, 1]")
        self._check(0 <= o["shift_momentum"] <= 1, "shift_momentum must be in [0, 1]")
        self._check(o["mix"] == -1 or 0 <= o["mix"] <= 1, "mix must be in [0, 1] (or -1: alpha)")
        self._check(o["ref_batch"] >= 1, "ref_batch must be >= 1")
        self._check(1 <= o["min_fill"] <= o["capacity"], "min_fill must be in [1, capacity]")

    def reset(self) -> None:
        super().reset()
        o = self.options
        classes = self.ctx.num_classes if o["balance"] else 1
        self.memory = ClassBalancedMemory(o["capacity"], max(classes, 2), o["lambda_t"], o["lambda_u"],
                                          o["fill_free"])
        self._mean = {k: m.copy() for k, (m, _) in self._source.items()}
        self._var = {k: v.copy() for k, (_, v) in self._source.items()}
        self._seen = 0.0  # samples since the last update
        self._boost = 0
        self._pending_momentum: float | None = None
        self._publish()

    def _publish(self) -> None:
        self._published: Stats = {
            k: (self._mean[k].astype(np.float32), self._var[k].astype(np.float32)) for k in self.layer_names
        }
        self._bump_stats()

    def forward_stats(self) -> Stats:
        return self._published

    def on_shift(self) -> None:
        self._boost = int(self.options["shift_updates"])

    def admit(self, x: np.ndarray, batch_info: BatchInfo) -> int:
        """Offer the batch's samples to the memory (by predicted class and entropy); returns how many entered."""
        o = self.options
        logits = batch_info.logits
        if logits is None:
            return 0
        pred = np.asarray(logits).argmax(1) if o["balance"] else np.zeros(len(x), np.int64)
        skip = np.zeros(len(x), bool)
        if o["exclude_ood"] and batch_info.ood.mean() <= o["max_ood_fraction"]:
            skip = np.asarray(batch_info.ood, bool)
        return sum(self.memory.add(x[i], int(pred[i]), float(batch_info.entropy[i]))
                   for i in range(len(x)) if not skip[i])

    def stats_inputs(self, x: np.ndarray, batch_info: BatchInfo) -> tuple[np.ndarray, np.ndarray | None] | None:
        self.admit(x, batch_info)
        self._seen += len(x)
        if self._seen < self.options["ref_batch"] or len(self.memory) < self.options["min_fill"]:
            return None
        # the request consumes the samples seen, whether or not the runtime's guard lets its statistics through
        self._pending_momentum = self.momentum()
        self._boost = max(0, self._boost - 1)
        self._seen = 0.0
        mix = self.options["alpha"] if self.options["mix"] < 0 else self.options["mix"]
        return self.memory.inputs(), np.full(len(self.layer_names), mix, np.float32)

    def momentum(self) -> float:
        o = self.options
        m = 1 - (1 - o["alpha"]) ** (self._seen / o["ref_batch"])
        if self._boost > 0:
            m = max(m, o["shift_momentum"])
        return float(m)

    def update_stats(self, batch_stats: Stats, n_reliable: int, batch_info: BatchInfo | None = None) -> None:
        if n_reliable <= 0:
            return
        self._check_batch_stats(batch_stats)
        m, self._pending_momentum = self._pending_momentum, None
        if m is None:  # statistics offered without a request (not the runtime's way): one reference batch
            m = self.options["alpha"]
        for name in self.layer_names:
            mb, vb = (np.asarray(a, np.float64) for a in batch_stats[name])
            self._mean[name] = (1 - m) * self._mean[name] + m * mb
            self._var[name] = np.maximum((1 - m) * self._var[name] + m * vb, 0.0)
        self._publish()

    def _state(self) -> dict[str, np.ndarray]:
        state = {"seen": np.array([self._seen], np.float64), "boost": np.array([self._boost], np.int64)}
        for name in self.layer_names:
            state[f"{name}.mean"] = self._mean[name]
            state[f"{name}.var"] = self._var[name]
        return state

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self._seen = float(state["seen"][0])
        self._boost = int(state["boost"][0])
        for name in self.layer_names:
            self._mean[name] = state[f"{name}.mean"]
            self._var[name] = state[f"{name}.var"]
        self.memory.clear()  # never resume from inputs that may have produced a state being replaced
        self._publish()
