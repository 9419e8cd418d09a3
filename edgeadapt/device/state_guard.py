"""Plausibility of the adaptation state: what no stream of real images can produce is refused, never saved,
never restored, and resets the state to the last good one (DESIGN.md §15).

The input codec keeps every input inside the bundle's declared value range, which already bounds what a batch
can do to the statistics. This guard is the second line: a batch whose normalization statistics are not finite,
or are far outside anything the source statistics make plausible, does not update the state, and a state that
went bad anyway (a method bug, a corrupt file, a bad update's parameters) is replaced by the last good snapshot.

Plausibility is judged per normalization layer on the channel-RMS of two numbers, so one dead channel (source
variance near zero) cannot trip it and a whole shifted layer cannot hide behind the rest:
- ``|log(var / var_src)|``: how many e-folds the variance moved (``max_log_var_ratio``);
- ``|mean - mean_src| / std_src``: how many source standard deviations the mean moved (``max_mean_shift``).
The defaults sit far beyond what the 15 severity-5 corruptions of the dev stream produce (docs/NOTES.md,
"Plausible statistics"), so real drift never trips them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Stats = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class StatsBounds:
    # dev stream, worst layer over every batch of 64 and 200 batches of one per corruption: 6.22 (contrast) and
    # 1.51 (frost); in-range synthetic frames (black, white, one gray image, uniform noise) 4.85 and 1.89
    max_log_var_ratio: float = math.log(1e4)  # channel-RMS of |ln(var / var_src)|: variance 10^4x either way
    max_mean_shift: float = 10.0  # channel-RMS of |mean - mean_src| / std_src
    var_floor: float = 1e-5  # added to both variances (BN's eps order): dead channels compare as equal


class StateGuard:
    """Checks batch statistics and whole adaptation states against the source statistics."""

    def __init__(self, source_stats: Stats, bounds: StatsBounds | None = None):
        self.bounds = bounds or StatsBounds()
        f = self.bounds.var_floor
        self._src = {k: (np.asarray(m, np.float64), np.asarray(v, np.float64) + f) for k, (m, v) in source_stats.items()}

    def check_stats(self, stats: Stats, what: str = "statistics") -> str | None:
        """None when every layer's (mean, var) is finite and plausible, else a reason naming the layer."""
        b = self.bounds
        worst: tuple[float, str] | None = None
        for name, (mean, var) in stats.items():
            src = self._src.get(name)
            if src is None:
                continue
            m = np.asarray(mean, np.float64)
            v = np.asarray(var, np.float64)
            if not (np.isfinite(m).all() and np.isfinite(v).all()):
                return f"{what} of {name} are not finite"
            if (v < 0).any():
                return f"{what} of {name} have a negative variance"
            ms, vs = src
            log_ratio = float(np.sqrt(np.mean(np.log((v + b.var_floor) / vs) ** 2)))
            shift = float(np.sqrt(np.mean(((m - ms) ** 2) / vs)))
            if log_ratio > b.max_log_var_ratio:
                score = log_ratio / b.max_log_var_ratio
                reason = (f"{what} of {name}: variance {math.exp(log_ratio):.3g}x off the source "
                          f"(limit {math.exp(b.max_log_var_ratio):.3g}x)")
                if worst is None or score > worst[0]:
                    worst = (score, reason)
            if shift > b.max_mean_shift:
                score = shift / b.max_mean_shift
                reason = f"{what} of {name}: mean {shift:.3g} source std away (limit {b.max_mean_shift:g})"
                if worst is None or score > worst[0]:
                    worst = (score, reason)
        return None if worst is None else worst[1]

    @staticmethod
    def check_finite(state: dict[str, np.ndarray], what: str = "adaptation state") -> str | None:
        """None when every floating array of ``state`` is finite."""
        for k, v in state.items():
            a = np.asarray(v)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                return f"{what}: {k} is not finite"
        return None
