"""``ema_stats`` / ``dua``: exponential moving average of test-time normalization statistics (DUA-style).

After each update k (counted in reference batches, see below) the statistics move toward the reliable
subset's statistics:

    m_k      = max(min_momentum, momentum0 * decay**k) + eps        (DUA: 0.1 * 0.94**k + 0.005)
    m        = m_k * min(1, n_reliable / ref_batch)                  (small batches move proportionally less)
    mu_new   = (1 - m) mu + m mu_b
    var_new  = (1 - m)(var + mu**2) + m (var_b + mu_b**2) - mu_new**2    (mixes E[x^2]: accounts for the mean shift)

k advances by min(1, n_reliable / ref_batch) per update, so the decay schedule is measured in samples, not in
calls: 64 updates with one sample each (ref_batch = 64) decay the momentum as far as one batch of 64, and
move the statistics about as far. Batch size 1 works (its statistics are the per-channel spatial moments).
The first update uses k = 1 (as DUA: m_1 = 0.1 * 0.94 + 0.005).

Presets: ``ema_stats`` is the continual variant, ``min_momentum = 0.05`` (momentum never drops below 0.055
per reference batch, so the statistics keep following a drifting stream). ``dua`` has DUA's published schedule
(``min_momentum = 0``: the momentum decays to 0.005 and the model effectively freezes after ~50 batches).

``transductive=True`` additionally mixes the batch's own statistics into its prediction with
w = n / (prior + n) on top of the EMA (as ``norm_stats`` does on top of the source). ``every`` = K > 1 does
that on one batch in K (and on the first batch of a detected shift, the runtime's); the K - 1 batches in between
run the fast static session with that batch's mixed statistics folded in (device/engine.py): on depthwise nets
the adaptive graph costs 2-4x the folded one, so mixing every batch cannot stay near the static throughput
(docs/NOTES.md "A device in the loop stays fast").
``publish_every`` > 1 publishes the running statistics to ``forward_stats`` only every that many updates
(fewer rebuilds of the runtime's static session); the EMA itself still sees every update.
When the runtime reports a domain shift (``on_shift``), the next ``shift_updates`` updates use at least
``shift_momentum``, so the statistics reach the new domain in a few updates instead of ~1/m_k of them.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo, Stats
from edgeadapt.device.methods.registry import register


@register
class EmaStats(AdaptationMethod):
    name = "ema_stats"
    needs_stats = True
    provides_stats = True
    defaults = {
        "momentum0": 0.1,
        "decay": 0.94,
        "min_momentum": 0.05,
        "eps": 0.005,
        "ref_batch": 64,
        "transductive": False,
        "prior": 16.0,
        "publish_every": 1,
        "shift_momentum": 0.9,
        "shift_updates": 1,
        "every": 1,
    }

    def _validate(self) -> None:
        o = self.options
        self._check(0 <= o["momentum0"] <= 1, "momentum0 must be in [0, 1]")
        self._check(0 < o["decay"] <= 1, "decay must be in (0, 1]")
        self._check(0 <= o["min_momentum"] <= 1 and 0 <= o["eps"] <= 1, "min_momentum and eps must be in [0, 1]")
        self._check(max(o["momentum0"], o["min_momentum"]) + o["eps"] <= 1, "momentum may not exceed 1")
        self._check(o["ref_batch"] >= 1, "ref_batch must be >= 1")
        self._check(o["prior"] >= 0, "prior must be >= 0")
        self._check(o["publish_every"] >= 1, "publish_every must be >= 1")
        self._check(o["every"] >= 1, "every must be >= 1")
        self.folds_mix = bool(o["transductive"]) and o["every"] > 1  # type: ignore[misc]

    def reset(self) -> None:
        super().reset()
        self._mean = {k: m.copy() for k, (m, _) in self._source.items()}
        self._var = {k: v.copy() for k, (_, v) in self._source.items()}
        self._k = 0.0  # progress of the decay schedule, in reference batches
        self._updates = 0
        self._boost = 0
        self._mix_calls = 0
        self._publish()

    def momentum(self, k: float) -> float:
        """m_k of the schedule (per full reference batch)."""
        o = self.options
        return max(o["min_momentum"], o["momentum0"] * o["decay"] ** k) + o["eps"]

    def _publish(self) -> None:
        self._published: Stats = {
            k: (self._mean[k].astype(np.float32), self._var[k].astype(np.float32)) for k in self.layer_names
        }
        self._bump_stats()

    def forward_stats(self) -> Stats:
        return self._published

    def on_mixed(self) -> None:
        self._mix_calls = 1  # the runtime's own mixing batch starts the next K

    def on_shift(self) -> None:
        self._boost = int(self.options["shift_updates"])

    def forward_mix(self, n: int) -> np.ndarray | None:
        if not self.options["transductive"]:
            return None
        self._mix_calls += 1
        if (self._mix_calls - 1) % self.options["every"]:
            return None
        w = n / (self.options["prior"] + n) if n > 0 else 0.0
        return np.full(len(self.layer_names), w, np.float32)

    def update_stats(self, batch_stats: Stats, n_reliable: int, batch_info: BatchInfo | None = None) -> None:
        if n_reliable <= 0:
            return
        self._check_batch_stats(batch_stats)
        step = min(1.0, n_reliable / self.options["ref_batch"])
        self._k += step
        m = self.momentum(self._k)
        if self._boost > 0:
            m = max(m, self.options["shift_momentum"])
            self._boost -= 1
        m *= step
        for name in self.layer_names:
            mb, vb = (np.asarray(a, np.float64) for a in batch_stats[name])
            mu, var = self._mean[name], self._var[name]
            mu_new = (1 - m) * mu + m * mb
            var_new = (1 - m) * (var + mu * mu) + m * (vb + mb * mb) - mu_new * mu_new
            self._mean[name] = mu_new
            self._var[name] = np.maximum(var_new, 0.0)
        self._updates += 1
        if self._updates % self.options["publish_every"] == 0:
            self._publish()

    def _state(self) -> dict[str, np.ndarray]:
        state = {"k": np.array([self._k], np.float64), "updates": np.array([self._updates], np.int64),
                 "boost": np.array([self._boost], np.int64)}
        for name in self.layer_names:
            state[f"{name}.mean"] = self._mean[name]
            state[f"{name}.var"] = self._var[name]
        return state

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self._k = float(state["k"][0])
        self._updates = int(state["updates"][0])
        self._boost = int(state["boost"][0])
        for name in self.layer_names:
            self._mean[name] = state[f"{name}.mean"]
            self._var[name] = state[f"{name}.var"]
        self._publish()


@register
class Dua(EmaStats):
    """DUA's published schedule: m_k = 0.1 * 0.94**k + 0.005, no floor."""

    name = "dua"
    defaults = {**EmaStats.defaults, "min_momentum": 0.0}
