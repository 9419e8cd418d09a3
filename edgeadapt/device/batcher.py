"""Micro-batching: concurrent requests are grouped into one forward pass (max batch, max wait)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    """Requests go in with ``submit``; one worker thread concatenates up to ``max_batch`` samples (waiting at
    most ``max_wait_ms`` for more) and calls ``process(batch, adapt) -> list of per-sample results``. Requests
    submitted with ``adapt=False`` (e.g. inputs clipped into range) are served in a batch of their own that adapts
    nothing, so they never share statistics with anyone else's."""

    def __init__(self, process: Callable[[np.ndarray, bool], list], max_batch: int = 64, max_wait_ms: float = 5.0,
                 to_float: Callable[[np.ndarray], np.ndarray] | None = None):
        self.process = process
        # mixed uint8/float requests in one batch: the input codec's dequantization (value units)
        self.to_float = to_float or (lambda a: a.astype(np.float32) / 255.0 if a.dtype == np.uint8
                                     else a.astype(np.float32))
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray, adapt: bool = True) -> Future:
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("shutting down"))
            return fut
        self._q.put((x, fut, adapt))
        return fut

    def _run(self) -> None:
        pending = None
        while not self._stop.is_set() or not self._q.empty():
            try:
                first = pending or self._q.get(timeout=0.05)
            except queue.Empty:
                continue
            pending = None
            items = [first]
            total = len(first[0])
            deadline = time.monotonic() + self.max_wait
            while total < self.max_batch:
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if total + len(item[0]) > self.max_batch:
                    pending = item
                    break
                items.append(item)
                total += len(item[0])
            for adapt in (True, False):
                group = [it for it in items if it[2] is adapt]
                if group:
                    self._run_group(group, adapt)

    def _run_group(self, items: list, adapt: bool) -> None:
        dtypes = {it[0].dtype for it in items}
        if len(dtypes) > 1:  # mixed uint8/float requests: all in value units
            arrays = [self.to_float(it[0]) for it in items]
        else:
            arrays = [it[0] for it in items]
        try:
            results = self.process(np.concatenate(arrays), adapt)
            i = 0
            for x, fut, _ in items:
                fut.set_result(results[i : i + len(x)])
                i += len(x)
        except Exception as exc:
            for _, fut, _ in items:
                if not fut.done():
                    fut.set_exception(exc)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
