"""``norm_stats``: test-time normalization with a source prior (Schneider et al., NeurIPS 2020).

Each batch is normalized with mu = N/(N+n) mu_src + n/(N+n) mu_batch (same for var), N a pseudo-count
prior and n the batch size: ``forward_mix(n)`` returns w = n/(N+n) for every layer, ``forward_stats`` is
always the source (no memory across batches), and the runtime's adaptive graph does the mixing in-batch.

Default ``prior`` N = 16: the paper tunes N per model and batch size (its best N grows with n; for small
batches a prior of the order of 16 works across ResNet variants). n = 1 then gives w = 1/17; n = 64 gives
w = 0.8. Note that the in-batch statistics are those of the whole batch the runtime predicts (OOD included).
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod
from edgeadapt.device.methods.registry import register


@register
class NormStats(AdaptationMethod):
    name = "norm_stats"
    provides_stats = True
    defaults = {"prior": 16.0}

    def _validate(self) -> None:
        self._check(self.options["prior"] >= 0, "prior must be >= 0")

    def forward_mix(self, n: int) -> np.ndarray | None:
        w = n / (self.options["prior"] + n) if n > 0 else 0.0
        return np.full(len(self.layer_names), w, np.float32)
