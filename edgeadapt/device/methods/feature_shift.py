"""``feature_shift``: FOA's back-to-source activation shift (Niu et al., ICML 2024), on penultimate features.

z <- z + (mu_src - mu_test), mu_test an EMA of the mean feature of the reliable samples (momentum 0.1, as FOA):
the logits become (z + s) W^T + b = logits + s W^T (so the method composes after other output-side methods).
The batch updates mu_test before it is predicted (as FOA).

Start and small batches: mu_test is a bias-corrected EMA. Per update with n reliable samples,
m = max(momentum * min(1, n / ref_batch), n / n_seen) with n_seen the reliable samples seen so far (this batch
included): the first full batch sets mu_test to its mean (FOA initializes with the first batch), and a stream
of single samples averages them until the EMA's window (ref_batch / momentum samples) is reached, instead of
shifting one sample exactly onto the source mean. Before any reliable sample the shift is zero.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.registry import register


@register
class FeatureShift(AdaptationMethod):
    name = "feature_shift"
    defaults = {"momentum": 0.1, "ref_batch": 64, "reliable_only": True, "strength": 1.0}

    def _validate(self) -> None:
        self.ctx.require("head_weight", "feature_mean", method=self.name)
        o = self.options
        self._check(0 < o["momentum"] <= 1, "momentum must be in (0, 1]")
        self._check(o["ref_batch"] >= 1, "ref_batch must be >= 1")

    def reset(self) -> None:
        super().reset()
        self._src = np.asarray(self.ctx.feature_mean, np.float64)
        self._w = np.asarray(self.ctx.head_weight, np.float64)
        self._mu = self._src.copy()
        self._seen = 0.0

    @property
    def shift(self) -> np.ndarray:
        """The current shift s = strength * (mu_src - mu_test) [D]."""
        return self.options["strength"] * (self._src - self._mu)

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        z = np.asarray(features, np.float64)
        use = np.ones(len(z), bool)
        if self.options["reliable_only"] and batch_info is not None:
            use = np.asarray(batch_info.reliable, bool)
        n = int(use.sum())
        if n:
            self._seen += n
            m = max(self.options["momentum"] * min(1.0, n / self.options["ref_batch"]), n / self._seen)
            self._mu = (1 - m) * self._mu + m * z[use].mean(0)
        out = np.asarray(logits, np.float64) + self.shift @ self._w.T
        return out.astype(np.float32)

    def _state(self) -> dict[str, np.ndarray]:
        return {"mu_test": self._mu, "seen": np.array([self._seen], np.float64)}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self._mu = state["mu_test"]
        self._seen = float(state["seen"][0])
