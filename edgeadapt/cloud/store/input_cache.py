"""A bounded in-memory cache of uploaded-input blobs, least recently used out first, limited in bytes.

Why bytes, not entries: the trainer keeps what it replays on disk (blob keys and rows, ``StoredSample``) and loads
a step's samples when it needs them, so this cache is all the inputs the cloud holds in RAM. Counted in entries it
grew with resolution (4,096 blobs of 3×224×224 batches is gigabytes); counted in bytes it does not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

#: the default bound: all of the reference model's 10,000-sample replay (1×32×32, ~10 MB) many times over, and
#: ~1,700 samples at 3×224×224 (a round's new uploads and a step's replay draw)
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


class InputCache:
    """blob key -> its array (blobs never change once written). Thread-safe; ``nbytes`` never exceeds ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        """Keep ``arr`` unless it alone is larger than the bound (then it is used once and not kept)."""
        with self._lock:
            if key in self._items or arr.nbytes > self.max_bytes:
                return
            self._items[key] = arr
            self.nbytes += arr.nbytes
            self._evict()

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
