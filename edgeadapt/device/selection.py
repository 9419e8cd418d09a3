"""What to upload: CEMA's selective entropy (Chen et al., ICCV 2023), plus bandwidth budgets.

For a batch with softmax probabilities p [N,C], entropies E [N] (nats) and OOD flags, under a reliability policy
(core/reliability.py, its upload role: the same policy the engine adapts by and the trainer weights its loss by):

1. OOD samples are never adaptation data. They are routed to "novel" under their own small
   samples/s budget (highest OOD score first when scores are given).
2. Unreliable: keep E(x) < E_max(t). E_max = upload_factor * ln C. During the first ``warmup`` samples
   E_max(t) = E_max; then E_max(t) = lam * E_max * E_now / E_warm, where E_warm is the mean entropy of the
   first ``warmup`` samples (frozen) and E_now an exponential moving average of the entropy of all samples
   with an effective window of ``now_window`` samples (per batch of n: E_now <- d^n E_now + (1 - d^n)
   mean(E_batch), d = 1 - 1/now_window, so the window does not depend on the batch size). Both means
   count every sample, OOD included, as CEMA's running mean does; the current batch is included before
   its thresholds are applied.
3. Low-informative: keep E(x) > E_min = low_info_factor * ln C.
4. Redundant: m is a moving average of the probability vectors of uploaded samples,
   m <- momentum * m + (1 - momentum) * mean(p of uploaded) (m starts as the first mean).
   The DESIGN / EATA text reads "keep |cos(p, m)| < eps", which EATA uses with eps = 0.05 for ImageNet's
   1000 classes: there a confident p sits on one class and m is spread over many, so cos(p, m) ~ m_k/|m|
   is small unless class k dominates recent uploads. Probability vectors are non-negative, so for few
   classes that literal test drops nearly everything (C = 10, m near uniform: cos >= 1/sqrt(10) = 0.32 for
   every p; EATA itself needs eps = 0.4 on CIFAR-10). The default here (``redundancy="similar"``) is the
   class-count-independent reading: a sample is redundant when it nearly repeats what was just uploaded,
   cos(p, m) > 1 - eps. ``redundancy="eata"`` gives the literal rule (drop when |cos(p, m)| >= eps).
   The test is against m as it was before the batch (as in EATA); m is updated after the batch.
5. Budget: token buckets (samples/s and/or bytes/s, burst ``burst_s`` seconds, starting full). When the
   candidates exceed the tokens, the most informative (highest entropy inside the reliable band) go first.

``reliable`` in the result marks the samples inside the upload bound (not OOD, E < E_max(t)); which samples drive
forward-only adaptation is the engine's call (the policy's adapt role).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeadapt.core.mathops import entropy_from_probs
from edgeadapt.core.reliability import DEFAULT_RELIABILITY, ReliabilityPolicy

COUNTER_NAMES = (
    "seen",
    "ood",
    "unreliable",
    "low_info",
    "redundant",
    "budget_dropped",
    "selected",
    "novel_selected",
    "novel_budget_dropped",
)


@dataclass
class SelectionResult:
    adapt: np.ndarray  # int64 indices (ascending) to upload as adaptation data
    novel: np.ndarray  # int64 indices (ascending) to upload as novel / OOD samples
    reliable: np.ndarray  # bool [N]: not OOD and E < E_max(t)
    counts: dict[str, int] = field(default_factory=dict)  # this batch, keys = COUNTER_NAMES
    e_max: float = math.inf
    e_min: float = 0.0


class TokenBucket:
    """Refills at ``rate`` units/s up to ``rate * burst_s`` (at least one item's cost); starts full."""

    def __init__(self, rate: float, burst_s: float, clock: Callable[[], float]) -> None:
        if rate < 0:
            raise ValueError("budget rate must be >= 0 (0 = nothing passes)")
        self.rate = float(rate)
        self.burst_s = float(burst_s)
        self.clock = clock
        self.tokens = self.rate * self.burst_s
        self.last = clock()

    def available(self, cost: float = 1.0) -> int:
        """How many items of ``cost`` units fit now (refills first)."""
        now = self.clock()
        cap = max(self.rate * self.burst_s, cost)
        self.tokens = min(cap, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if cost <= 0:
            return 2**62
        return int(math.floor(self.tokens / cost + 1e-9))

    def consume(self, units: float) -> None:
        self.tokens = max(0.0, self.tokens - units)


def _bucket(rate: float | None, burst_s: float, clock: Callable[[], float]) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, burst_s, clock)


class SampleSelector:
    def __init__(
        self,
        num_classes: int,
        policy: ReliabilityPolicy = DEFAULT_RELIABILITY,
        redundancy_eps: float = 0.05,
        momentum: float = 0.9,
        budget_samples_per_s: float | None = None,
        budget_bytes_per_s: float | None = None,
        novel_budget_samples_per_s: float | None = 1.0,
        redundancy: str = "similar",
        burst_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if redundancy not in ("similar", "eata", "off"):
            raise ValueError("redundancy must be 'similar', 'eata' or 'off'")
        self.num_classes = int(num_classes)
        self.policy = policy
        self.e_max_base = policy.upload_bound(num_classes)
        self.e_min = policy.low_info_bound(num_classes)
        self.warmup = policy.warmup
        self.redundancy_eps = float(redundancy_eps)
        self.redundancy = redundancy
        self.momentum = float(momentum)
        self.now_decay = 1.0 - 1.0 / policy.now_window
        self.clock = clock
        # None = unlimited, 0 = nothing of that kind is uploaded
        self.sample_bucket = _bucket(budget_samples_per_s, burst_s, clock)
        self.byte_bucket = _bucket(budget_bytes_per_s, burst_s, clock)
        self.novel_bucket = _bucket(novel_budget_samples_per_s, burst_s, clock)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.m: np.ndarray | None = None
        self.warm_count = 0
        self.warm_sum = 0.0
        self.warm_mean: float | None = None
        self.now_mean: float | None = None
        self.totals = dict.fromkeys(COUNTER_NAMES, 0)

    @property
    def warmed_up(self) -> bool:
        return self.warm_mean is not None

    @property
    def e_max(self) -> float:
        """E_max(t), the current upload bound."""
        return self.policy.upload_bound_now(self.num_classes, self.warm_mean, self.now_mean)

    def counters(self) -> dict[str, int]:
        return dict(self.totals)

    def state(self) -> dict[str, np.ndarray]:
        nan = float("nan")
        return {
            "m": self.m.astype(np.float64) if self.m is not None else np.full(self.num_classes, nan),
            "stats": np.array(
                [
                    self.warm_count,
                    self.warm_sum,
                    nan if self.warm_mean is None else self.warm_mean,
                    nan if self.now_mean is None else self.now_mean,
                ],
                dtype=np.float64,
            ),
            "counters": np.array([self.totals[k] for k in COUNTER_NAMES], dtype=np.int64),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        m = np.asarray(state["m"], dtype=np.float64)
        if m.shape != (self.num_classes,):
            raise ValueError(f"state is for {m.shape[0]} classes, selector has {self.num_classes}")
        self.m = None if np.isnan(m).any() else m.copy()
        wc, ws, wm, nm = (float(x) for x in np.asarray(state["stats"], dtype=np.float64))
        self.warm_count, self.warm_sum = int(wc), ws
        self.warm_mean = None if math.isnan(wm) else wm
        self.now_mean = None if math.isnan(nm) else nm
        counts = np.asarray(state.get("counters", np.zeros(len(COUNTER_NAMES))), dtype=np.int64)
        self.totals = {k: int(v) for k, v in zip(COUNTER_NAMES, counts, strict=False)}

    # ------------------------------------------------------------------ selection
    def _update_entropy_stats(self, ent: np.ndarray) -> None:
        if ent.size == 0:
            return
        rest = ent
        if self.warm_mean is None:
            k = min(self.warmup - self.warm_count, ent.size)
            self.warm_sum += float(ent[:k].sum())
            self.warm_count += k
            rest = ent[k:]
            if self.warm_count >= self.warmup:
                self.warm_mean = self.warm_sum / max(self.warm_count, 1)
                self.now_mean = self.warm_mean
        if self.warm_mean is not None and rest.size:
            d = self.now_decay**rest.size
            self.now_mean = d * self.now_mean + (1.0 - d) * float(rest.mean())

    def _cosine_to_m(self, probs: np.ndarray) -> np.ndarray:
        pn = np.linalg.norm(probs, axis=1)
        mn = float(np.linalg.norm(self.m))
        return (probs @ self.m) / np.maximum(pn * mn, 1e-12)

    def _budget(self, n: int, sample_bytes: int) -> int:
        allowed = n
        if self.sample_bucket is not None:
            allowed = min(allowed, self.sample_bucket.available(1.0))
        if self.byte_bucket is not None:
            allowed = min(allowed, self.byte_bucket.available(float(sample_bytes)))
        if self.sample_bucket is not None:
            self.sample_bucket.consume(allowed)
        if self.byte_bucket is not None:
            self.byte_bucket.consume(allowed * float(sample_bytes))
        return allowed

    def select(
        self,
        probs: np.ndarray,
        entropy: np.ndarray | None = None,
        ood_flags: np.ndarray | None = None,
        sample_bytes: int = 0,
        ood_scores: np.ndarray | None = None,
    ) -> SelectionResult:
        """Decide which samples of a batch to upload. ``sample_bytes`` is the upload size of one sample
        (for the bytes/s budget)."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != self.num_classes:
            raise ValueError(f"probs must be [N, {self.num_classes}], got {p.shape}")
        n = p.shape[0]
        ent = entropy_from_probs(p) if entropy is None else np.asarray(entropy, dtype=np.float64).ravel()
        ood = np.zeros(n, dtype=bool) if ood_flags is None else np.asarray(ood_flags, dtype=bool).ravel()
        if ent.shape[0] != n or ood.shape[0] != n:
            raise ValueError("probs, entropy and ood_flags disagree on N")

        self._update_entropy_stats(ent)
        e_max = self.e_max
        reliable = self.policy.upload_mask(ent, ood, e_max)
        unreliable = ~ood & ~reliable  # a NaN entropy too: it is never a candidate
        low_info = ~ood & ~unreliable & (ent <= self.e_min)
        cand = ~ood & ~unreliable & ~low_info
        redundant = np.zeros(n, dtype=bool)
        if self.m is not None and self.redundancy != "off" and cand.any():
            cos = self._cosine_to_m(p)
            if self.redundancy == "similar":
                redundant = cand & (cos > 1.0 - self.redundancy_eps)
            else:
                redundant = cand & (np.abs(cos) >= self.redundancy_eps)
            cand &= ~redundant

        idx = np.flatnonzero(cand)
        idx = idx[np.argsort(-ent[idx], kind="stable")]  # most informative first
        allowed = self._budget(idx.size, sample_bytes) if idx.size else 0
        adapt = np.sort(idx[:allowed]).astype(np.int64)
        if adapt.size:
            mean_p = p[adapt].mean(axis=0)
            self.m = mean_p if self.m is None else self.momentum * self.m + (1.0 - self.momentum) * mean_p

        nidx = np.flatnonzero(ood)
        if ood_scores is not None and nidx.size:
            sc = np.asarray(ood_scores, dtype=np.float64).ravel()
            nidx = nidx[np.argsort(-sc[nidx], kind="stable")]
        n_novel = nidx.size
        if self.novel_bucket is not None and n_novel:
            n_novel = min(n_novel, self.novel_bucket.available(1.0))
            self.novel_bucket.consume(n_novel)
        novel = np.sort(nidx[:n_novel]).astype(np.int64)

        counts = {
            "seen": n,
            "ood": int(ood.sum()),
            "unreliable": int(unreliable.sum()),
            "low_info": int(low_info.sum()),
            "redundant": int(redundant.sum()),
            "budget_dropped": int(idx.size - allowed),
            "selected": int(adapt.size),
            "novel_selected": int(novel.size),
            "novel_budget_dropped": int(nidx.size - novel.size),
        }
        for k, v in counts.items():
            self.totals[k] += v
        return SelectionResult(
            adapt=adapt,
            novel=novel,
            reliable=reliable,
            counts=counts,
            e_max=e_max,
            e_min=self.e_min,
        )
