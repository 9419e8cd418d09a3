"""``collapse_reset``: the last line of defence: back to the source state when the predictions have collapsed.

RDumb (Press et al., NeurIPS 2023) showed that resetting a continually adapting model to its source state (every
1,000 steps) is enough to stop the slow collapse of long runs. Resetting on a clock throws away good adaptation
as often as bad, so this member watches for the collapse itself, in a composite with a statistics method
(``rbn+...+collapse_reset``): with pi the EMA of the *predicted-class* histogram over ``horizon`` samples
(momentum 1 - (1 - 1/horizon)^N per batch of N),

    collapsed  <=>  H(pi) / ln C < threshold,   after at least ``min_seen`` samples since the last reset

(threshold 0.35 at C = 10 is more than ~85% of two thousand predictions in one class; a label-sorted stream's
marginal over that horizon still spans its recent classes). The composite then resets every member to its
source state; the detector starts over and waits ``min_seen`` samples before it may fire again.
``every`` > 0 adds RDumb's clock: a reset every that many samples regardless.
"""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.registry import register


@register
class CollapseReset(AdaptationMethod):
    name = "collapse_reset"
    defaults = {"threshold": 0.35, "horizon": 2048.0, "min_seen": 2048, "every": 0}

    def _validate(self) -> None:
        o = self.options
        self._check(0 <= o["threshold"] <= 1, "threshold must be in [0, 1]")
        self._check(o["horizon"] >= 1, "horizon must be >= 1")
        self._check(o["min_seen"] >= 0 and o["every"] >= 0, "min_seen and every must be >= 0")

    def reset(self) -> None:
        super().reset()
        self.resets = 0
        self._restart()

    def _restart(self) -> None:
        self.marginal = np.full(self.ctx.num_classes, 1.0 / self.ctx.num_classes)
        self.seen = 0
        self._request = False

    def marginal_entropy(self) -> float:
        """Normalized entropy of the recent predicted-class marginal (1 = uniform)."""
        p = self.marginal[self.marginal > 0]
        return float(-(p * np.log(p)).sum() / math.log(self.ctx.num_classes))

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        n = len(logits)
        if n:
            o = self.options
            h = np.bincount(np.asarray(logits).argmax(1), minlength=self.ctx.num_classes) / n
            m = 1.0 - (1.0 - 1.0 / o["horizon"]) ** n
            self.marginal = (1 - m) * self.marginal + m * h
            self.seen += n
            collapsed = self.seen >= o["min_seen"] and self.marginal_entropy() < o["threshold"]
            clock = o["every"] > 0 and self.seen >= o["every"]
            self._request = bool(collapsed or clock)
        return logits

    def reset_requested(self) -> bool:
        return self._request

    def on_collapse_reset(self) -> None:
        self.resets += 1
        self._restart()

    def _state(self) -> dict[str, np.ndarray]:
        return {"marginal": self.marginal, "seen": np.array([self.seen], np.int64),
                "resets": np.array([self.resets], np.int64)}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.marginal = np.asarray(state["marginal"], np.float64)
        self.seen = int(state["seen"][0])
        self.resets = int(state["resets"][0])
        self._request = False
