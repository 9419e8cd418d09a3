"""Composition ``a+b+...``: one statistics method (at most) plus output-side methods.

- Statistics hooks (``forward_stats``, ``forward_mix``, ``update_stats``, ``stats_version``) come from the member
  with ``provides_stats`` (none: the source statistics, no mix).
- ``adjust`` chains the members in spec order: each gets the previous member's output as its logits and the
  graph's original features.
- ``needs_stats`` is true when any member needs statistics.
- With a guard member (``lame_guard``): a label-skewed batch must not drive the statistics. The runtime calls
  ``update_stats`` before ``adjust`` and ``BatchInfo`` need not carry the logits, so ``update_stats`` is held
  back and applied in ``adjust`` only when ``guard.detect(logits)`` (on the raw graph logits) says the batch is
  not skewed; when ``BatchInfo.logits`` is given the decision is made at once. Either way the statistics change
  before the next ``forward_stats``. ``forward_mix`` cannot see the batch it is asked for; since skew comes in
  runs on label-correlated streams, after a skewed batch the composite returns ``None`` (no in-batch mixing:
  predict with ``forward_stats``) until a batch reads as not skewed again.
- A member may ask for a reset after ``adjust`` (``reset_requested``: a collapse detector); every member then
  goes back to its source state (``on_collapse_reset``) before the next batch.
- State: each member's state under ``"{index}.{name}."``.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.methods.base import AdaptationMethod, AdaptContext, BatchInfo, Stats, StatsRequest


class CompositeMethod(AdaptationMethod):
    name = "composite"

    def __init__(self, ctx: AdaptContext, members: list[AdaptationMethod], spec: str = ""):
        if len(members) < 2:
            raise ValueError("a composite needs at least two methods")
        stats = [m for m in members if m.provides_stats]
        if len(stats) > 1:
            raise ValueError(f"composite {spec!r}: at most one statistics method, got {[m.name for m in stats]}")
        guards = [m for m in members if m.is_guard]
        if len(guards) > 1:
            raise ValueError(f"composite {spec!r}: at most one guard")
        self.members = list(members)
        self.spec = spec or "+".join(m.name for m in members)
        self.stats_member = stats[0] if stats else None
        self.guard = guards[0] if guards else None
        self.needs_stats = any(m.needs_stats for m in members)  # type: ignore[misc]
        self.provides_stats = self.stats_member is not None  # type: ignore[misc]
        self.owns_stats_inputs = bool(self.stats_member and self.stats_member.owns_stats_inputs)  # type: ignore[misc]
        self.refresh_every = self.stats_member.refresh_every if self.stats_member else None  # type: ignore[misc]
        self.folds_mix = bool(self.stats_member and self.stats_member.folds_mix)  # type: ignore[misc]
        super().__init__(ctx)

    def reset(self) -> None:
        super().reset()
        for m in self.members:
            m.reset()
        self._pending: tuple[Stats, int, BatchInfo | None] | None = None
        self.last_skewed = False
        self.skipped_updates = 0
        self.collapse_resets = 0

    @property
    def stats_version(self) -> int:
        return self.stats_member.stats_version if self.stats_member else 0

    def forward_stats(self) -> Stats:
        return self.stats_member.forward_stats() if self.stats_member else super().forward_stats()

    def forward_mix(self, n: int) -> np.ndarray | None:
        if self.stats_member is None or self.last_skewed:
            return None
        return self.stats_member.forward_mix(n)

    def last_batch_skewed(self) -> bool:
        return self.guard is not None and self.last_skewed

    def detects_skew(self, logits: np.ndarray) -> bool:
        return self.guard is not None and bool(self.guard.detect(logits))

    def _decide(self, logits: np.ndarray) -> bool:
        self.last_skewed = bool(self.guard.detect(logits))
        return self.last_skewed

    def _apply_pending(self, skewed: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.stats_member is None:
            return
        if skewed:
            self.skipped_updates += 1
        else:
            self.stats_member.update_stats(*pending)

    def update_stats(self, batch_stats: Stats, n_reliable: int, batch_info: BatchInfo | None = None) -> None:
        if self.stats_member is None or not self.stats_member.needs_stats:
            return
        if self.guard is None:
            self.stats_member.update_stats(batch_stats, n_reliable, batch_info)
            return
        self._pending = (batch_stats, n_reliable, batch_info)
        if batch_info is not None and batch_info.logits is not None:
            self._apply_pending(self._decide(batch_info.logits))

    def stats_inputs(self, x: np.ndarray, batch_info: BatchInfo) -> StatsRequest | list[StatsRequest] | None:
        return self.stats_member.stats_inputs(x, batch_info) if self.owns_stats_inputs else None  # type: ignore[union-attr]

    def on_mixed(self) -> None:
        if self.stats_member is not None:
            self.stats_member.on_mixed()

    def on_shift(self) -> None:
        for m in self.members:
            m.on_shift()

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        if self.guard is not None:
            skewed = self._decide(logits)
            self._apply_pending(skewed)
        out = logits
        for m in self.members:
            out = m.adjust(out, features, batch_info)
        if any(m.reset_requested() for m in self.members):
            self.collapse_resets += 1
            for m in self.members:
                m.on_collapse_reset()
        return out

    def _state(self) -> dict[str, np.ndarray]:
        state = {}
        for i, m in enumerate(self.members):
            state.update({f"{i}.{m.name}.{k}": v for k, v in m._state().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = self._state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"composite {self.spec!r}: state mismatch: missing {missing}, unexpected {unexpected}")
        for i, m in enumerate(self.members):
            prefix = f"{i}.{m.name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def __repr__(self) -> str:
        return f"CompositeMethod({' + '.join(map(repr, self.members))})"
