"""``robust_stats``: normalization statistics that hold up under label runs, mixed requests and batch size 1.

Two facts measured on the dev stream (docs/NOTES.md, "Wild traffic") decide the design:

- The first stage's statistics (the first third of the normalization layers) carry most of what a corruption
  does to the input and comparatively little of the class: normalizing them with the current batch keeps
  most of the gain of transductive statistics under label-sorted batches (class-sorted 37.9% vs 18.2% for
  fully transductive statistics and 26.7% for the source model), while the deeper layers' statistics of a
  one-class batch are what make a model collapse.
- RoTTA's class-balanced memory (``rbn``) gives deep statistics a run of one class cannot drag along, but its
  EMA over memory snapshots (alpha = 0.05) and its preference for confident samples adapt too slowly and too
  narrowly for a model this weak under severity 5 (continual 31.6%).

So, per normalization layer:

- **shallow** (the first ``shallow`` fraction of the layers): a fast EMA of every batch's own statistics (the
  prediction forward computes them anyway), with E[x^2] mixing so it is right at batch size 1:
  m = 1 - (1 - ``fast_momentum``)^(n / ref_batch); and the batch's own statistics mixed into its prediction with
  w = n / (``prior`` + n) (Schneider et al.'s prior: w = 0.8 at n = 64, 0.06 at n = 1, where the EMA carries it);
- **deep**: the statistics of RoTTA's class-balanced memory of recent inputs (``rbn``'s CSTU memory; no
  uncertainty preference, ``lambda_u = 0``), recomputed every ``ref_batch`` samples by running the memory
  through the adaptive graph normalized with its *own* deep statistics and the current shallow ones
  (alpha = 1: the memory is already the average, an EMA on top only adds lag).

- **the gate** (``gate`` > 0): a second memory, a plain FIFO of the last ``capacity`` samples, is run the same
  way; when its deep statistics are within ``gate`` of the balanced memory's (``stats_distance``: channel-RMS
  mean difference in std units plus channel-RMS |log variance ratio|, averaged over the deep layers) the recent
  samples are not label-skewed and their unbiased, fresher statistics are used instead. Dev stream (limit
  1,000): i.i.d. batches sit at a median distance of 0.06, label-sorted ones at 0.16; 0.08 gave +1.0 on
  continual at -0.1 on class-sorted (0 = always the balanced memory).

Predictions therefore depend on the batch only through the shallow in-batch mix; the runtime runs the adaptive
graph for every batch (as ``ema_stats:transductive=true`` does) plus one memory forward per
``ref_batch`` samples (two with the gate).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import BatchInfo, Stats, StatsRequest
from edgeadapt.device.methods.registry import register
from edgeadapt.device.methods.robust_bn import ClassBalancedMemory, RobustBN


def stats_distance(a: Stats, b: Stats, layers: list[str], eps: float = 1e-5) -> float:
    """How far statistics ``a`` are from ``b``, averaged over ``layers``: channel-RMS of the mean difference in
    b's standard deviations plus channel-RMS of |ln(var_a / var_b)|."""
    out = []
    for name in layers:
        (ma, va), (mb, vb) = (tuple(np.asarray(t, np.float64) for t in s[name]) for s in (a, b))
        out.append(np.sqrt(np.mean((ma - mb) ** 2 / (vb + eps))) + np.sqrt(np.mean(np.log((va + eps) / (vb + eps)) ** 2)))
    return float(np.mean(out)) if out else 0.0


@register
class RobustStats(RobustBN):
    name = "robust_stats"
    refresh_every = None
    defaults = {
        **RobustBN.defaults,
        "alpha": 1.0,
        "lambda_u": 0.0,
        "exclude_ood": False,
        "prior": 16.0,
        "shallow": 1 / 3,
        "fast_momentum": 0.5,
        "gate": 0.08,
    }

    def _validate(self) -> None:
        super()._validate()
        o = self.options
        self._check(0 <= o["shallow"] <= 1, "shallow must be in [0, 1] (a fraction of the normalization layers)")
        self._check(0 < o["fast_momentum"] <= 1, "fast_momentum must be in (0, 1]")
        self._check(o["prior"] >= 0, "prior must be >= 0")
        n = len(self.layer_names)
        self.n_shallow = min(n, int(round(o["shallow"] * n)))

    def reset(self) -> None:
        super().reset()
        o = self.options
        self.fifo = ClassBalancedMemory(o["capacity"], 2, o["lambda_t"], 0.0, True)
        self._pending: list[str] = []
        self._fifo_deep: Stats | None = None
        self.last_distance = 0.0
        self.gate_open = False
        self.gate_opened = 0
        self.updates = 0

    def forward_mix(self, n: int) -> np.ndarray | None:
        o = self.options
        if o["prior"] <= 0 and self.n_shallow == 0:
            return None
        mix = np.zeros(len(self.layer_names), np.float32)
        if n > 0 and o["prior"] > 0:
            mix[: self.n_shallow] = n / (o["prior"] + n)
        return mix

    def _update_shallow(self, batch_stats: Stats, n: int) -> None:
        """Fast EMA of the batch's own shallow statistics (E[x^2] mixing: batch size 1 averages correctly)."""
        o = self.options
        m = 1 - (1 - o["fast_momentum"]) ** (n / o["ref_batch"])
        for name in self.layer_names[: self.n_shallow]:
            mb, vb = (np.asarray(a, np.float64) for a in batch_stats[name])
            mu, var = self._mean[name], self._var[name]
            mu_new = (1 - m) * mu + m * mb
            self._var[name] = np.maximum((1 - m) * (var + mu * mu) + m * (vb + mb * mb) - mu_new * mu_new, 0.0)
            self._mean[name] = mu_new

    def stats_inputs(self, x: np.ndarray, batch_info: BatchInfo) -> StatsRequest | list[StatsRequest] | None:
        if batch_info.batch_stats is not None and self.n_shallow:
            self._check_batch_stats(batch_info.batch_stats)
            self._update_shallow(batch_info.batch_stats, len(x))
            self._publish()
        if self.options["gate"] > 0:
            for i in range(len(x)):
                self.fifo.add(x[i], 0, 0.0)
        req = super().stats_inputs(x, batch_info)
        if req is None:
            return None
        mix = np.ones(len(self.layer_names), np.float32)
        mix[: self.n_shallow] = 0.0  # the memories' deep statistics under the current shallow normalization
        if self.options["gate"] <= 0:
            self._pending = ["balanced"]
            return req[0], mix
        self._pending = ["recent", "balanced"]
        return [(self.fifo.inputs(), mix), (req[0], mix)]

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        super()._set_state(state)
        self.fifo.clear()
        self._pending, self._fifo_deep = [], None

    def update_stats(self, batch_stats: Stats, n_reliable: int, batch_info: BatchInfo | None = None) -> None:
        if n_reliable <= 0:
            return
        self._check_batch_stats(batch_stats)
        tag = self._pending.pop(0) if self._pending else "balanced"
        deep = self.layer_names[self.n_shallow:]
        if tag == "recent":
            self._fifo_deep = {k: batch_stats[k] for k in deep}
            return
        if self._fifo_deep is not None:
            # the recent samples' deep statistics agree with the class-balanced memory's: the stream is not
            # label-skewed right now, and the recent (unbiased, fresher) ones are the better estimate
            self.last_distance = stats_distance(self._fifo_deep, batch_stats, deep)
            self.gate_open = self.last_distance < self.options["gate"]
            if self.gate_open:
                self.gate_opened += 1
                batch_stats = {**batch_stats, **self._fifo_deep}
            self._fifo_deep = None
        self.updates += 1
        m, self._pending_momentum = self._pending_momentum, None
        if m is None:
            m = self.options["alpha"]
        for name in deep:
            mb, vb = (np.asarray(a, np.float64) for a in batch_stats[name])
            self._mean[name] = (1 - m) * self._mean[name] + m * mb
            self._var[name] = np.maximum((1 - m) * self._var[name] + m * vb, 0.0)
        self._publish()
