"""The frozen teacher's logits per stored upload, computed once.

A training step runs the teacher on every group it trains on: the round's new group and ~3 replay groups
drawn at random, each drawn again and again over a round and over later rounds; the loss before and after a
round and the gate run it again on the same uploads. With the reference models the teacher forward is about
half of a step (profiled: docs/NOTES.md, "Cloud round cost"), all of it recomputing numbers that cannot have
changed: a frozen teacher's logits for an upload depend only on the upload and on the group it is normalized
with, and a replayed group is the same group it was trained in. So the trainer keeps them, by the upload's
sequence number, the first time it computes them.

Not used when the teacher adapts (``teacher_adapt``: its logits change every step) or for inputs that are not
stored uploads (no sequence number to key them by). Bounded in entries (least recently used go first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


class TeacherLogitCache:
    """Teacher logits by upload sequence number, at most ``max_entries`` of them."""

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self._rows: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def keys(group: Sequence) -> list[int] | None:
        """The sequence numbers of a group of stored uploads; None for anything else (arrays)."""
        seqs = [getattr(item, "seq", None) for item in group]
        return None if not seqs or any(s is None for s in seqs) else [int(s) for s in seqs]

    def logits(self, group: Sequence, compute: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for ``group`` (one row per item, in order); ``compute(group)`` runs the teacher
        on the whole group (normalized together) when any of its items is not kept yet. Items already kept keep
        the logits they were first computed with, so an upload's target never changes between steps."""
        keys = self.keys(group) if self.max_entries else None
        if keys is None:
            return compute(group)
        missing = [k for k in keys if k not in self._rows]
        if missing:
            self.misses += len(missing)
            fresh = compute(group).detach()
            for k, row in zip(keys, fresh, strict=True):
                if k not in self._rows:
                    self._rows[k] = row.clone()
        self.hits += len(keys) - len(missing)
        for k in keys:
            self._rows.move_to_end(k)
        out = torch.stack([self._rows[k] for k in keys])
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        return out

    def clear(self) -> None:
        self._rows.clear()
