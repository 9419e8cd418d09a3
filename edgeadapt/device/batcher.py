"""Dynamic batching: concurrent requests share one forward pass, and a lone request does not wait for company.

The policy is Triton's default dynamic batcher: the worker takes whatever is queued when it becomes free, up to
``max_batch`` samples, and runs it at once. Under load the queue fills while a batch runs, so batches grow by
themselves; with one client each request runs alone, immediately. ``max_wait_ms`` (Triton's
``max_queue_delay_microseconds``, default 0) lets a batch wait for more requests, counted from when its first
request was queued, never from when the worker picked it up.

A lone request need not go through the worker at all: ``run_alone`` runs it on the caller's thread when the
worker is idle and nothing is queued, which saves two thread hand-offs (queue -> worker -> the caller's event
loop; one connection p50 2.44 -> 2.20 ms back to back, docs/BENCHMARKS.md "Serving"). Its after-batch work runs
after the answer (on the caller's event loop when it passes ``defer``, else on the worker) and before any later
batch: the order of batches and their bookkeeping is the same either way.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

log = logging.getLogger("edgeadapt.device")

#: process(batch, adapt) -> per-sample results, sliceable (``results[i:j]`` is the part of one request)
ProcessFn = Callable[[np.ndarray, bool], Sequence[Any]]
#: after(batch, results, adapt): work that need not delay the answer (runs once every request has its result)
AfterFn = Callable[[np.ndarray, Any, bool], None]
#: what ``run_alone`` puts in the queue to wake the worker for its after-batch work
_WAKE = None


class MicroBatcher:
    """Requests go in with ``submit``; one worker thread concatenates what is queued (up to ``max_batch``
    samples) and calls ``process(batch, adapt)``. Requests submitted with ``adapt=False`` (inputs clipped into
    range) run in a batch of their own that adapts nothing, so they never share statistics with anyone else's.

    ``after`` runs in the worker once the batch's futures are resolved: selection, upload queueing and metrics
    are then off the answer's path, yet still happen before the next batch (the same order as before)."""

    def __init__(self, process: ProcessFn, max_batch: int = 64, max_wait_ms: float = 0.0,
                 to_float: Callable[[np.ndarray], np.ndarray] | None = None, after: AfterFn | None = None):
        self.process = process
        self.after = after
        # mixed uint8/float requests in one batch: the input codec's dequantization (value units)
        self.to_float = to_float or (lambda a: a.astype(np.float32) / 255.0 if a.dtype == np.uint8
                                     else a.astype(np.float32))
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.batches = 0
        self.alone_batches = 0  # of ``batches``, run on the caller's thread by ``run_alone``
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        # the engine's turn: ``_busy`` while a batch (the worker's, or one run alone until its after-work has run)
        # uses it; ``_queued`` counts submitted requests the worker has not finished
        self._cv = threading.Condition()
        self._busy = False
        self._queued = 0
        self._after_job: tuple | None = None  # a batch run alone: its after-work, for the worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker runs (readiness: a dead worker would leave every request waiting)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, x: np.ndarray, adapt: bool = True) -> Future:
        """From any thread: a ``concurrent.futures.Future`` of this request's results."""
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("shutting down"))
            return fut
        self._put((x, fut, adapt, time.monotonic(), None))
        return fut

    def submit_async(self, x: np.ndarray, adapt: bool = True) -> asyncio.Future:
        """From a running event loop: an asyncio future. A batch's answers reach their loop in one
        ``call_soon_threadsafe`` (one wake-up of the loop per batch, not one per request)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("shutting down"))
            return fut
        self._put((x, fut, adapt, time.monotonic(), loop))
        return fut

    def _put(self, item: tuple) -> None:
        with self._cv:
            self._queued += 1
        self._q.put(item)

    def run_alone(self, x: np.ndarray, adapt: bool = True,
                  defer: Callable[..., Any] | None = None) -> Any | None:
        """Run one request's batch on the caller's thread if the engine is free now (the worker idle, nothing
        queued) -> its results; else None (nothing done: ``submit`` it). The after-batch work must not delay
        the answer: ``defer(fn, arg)`` schedules it (an event loop's ``call_soon``: it then runs on the loop once
        the answer's task step, its write included, is done, with no thread hand-off); without ``defer`` the
        worker does it. Until it has run, other requests queue as usual. An error in ``process`` is raised
        here."""
        with self._cv:
            if self._busy or self._queued or self._stop.is_set():
                return None
            self._busy = True
        try:
            results = self.process(x, adapt)
        except BaseException:
            self._release()
            raise
        self.batches += 1
        self.alone_batches += 1
        job = (x, results, adapt)
        if self.after is None:
            self._release()
        elif defer is not None:
            try:
                defer(self._finish_alone, job)
            except RuntimeError:  # the loop is closing: do it now
                self._finish_alone(job)
        else:
            with self._cv:
                self._after_job = job
                self._cv.notify_all()
            self._q.put(_WAKE)
        return results

    def _finish_alone(self, job: tuple) -> None:
        try:
            self._run_after(*job)
        finally:
            self._release()

    def _release(self) -> None:
        with self._cv:
            self._busy = False
            self._cv.notify_all()

    def _take_turn(self) -> None:
        """The worker's turn at the engine: wait while a batch runs alone, and do its after-work here."""
        with self._cv:
            while self._busy and self._after_job is None:
                self._cv.wait(0.05)
            job, self._after_job = self._after_job, None
            self._busy = True
        if job is not None:
            self._run_after(*job)

    def _pending_after(self) -> None:
        """Woken by ``run_alone``: its after-work, unless ``_take_turn`` has done it already."""
        with self._cv:
            job, self._after_job = self._after_job, None
        if job is not None:
            self._run_after(*job)
            self._release()

    def _run_after(self, batch: np.ndarray, results: Any, adapt: bool) -> None:
        if self.after is None:
            return
        try:
            self.after(batch, results, adapt)
        except Exception as exc:  # bookkeeping after the answer must never stop the worker
            log.exception("after-batch work failed: %s", exc)

    def _collect(self, first: tuple) -> tuple[list[tuple], tuple | None]:
        """``first`` and what is queued behind it, up to ``max_batch`` samples -> (items, the one that did not
        fit). Waits for more only while ``max_wait`` since ``first`` was queued has not passed."""
        items, total = [first], len(first[0])
        deadline = first[3] + self.max_wait
        while total < self.max_batch:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._q.get(timeout=left)
                except queue.Empty:
                    break
            if item is _WAKE:  # stale: the worker holds the turn, so that after-work was done in _take_turn
                continue
            if total + len(item[0]) > self.max_batch:
                return items, item
            items.append(item)
            total += len(item[0])
        return items, None

    def _run(self) -> None:
        pending = None
        while not self._stop.is_set() or pending is not None or not self._q.empty():
            if pending is None:
                try:
                    pending = self._q.get(timeout=0.05)
                except queue.Empty:
                    continue
                if pending is _WAKE:
                    pending = None
                    self._pending_after()
                    continue
            self._take_turn()
            items: list[tuple] = []
            try:
                items, pending = self._collect(pending)
                adapting = [it for it in items if it[2]]
                if adapting:
                    self._run_group(adapting, True)
                if len(adapting) < len(items):
                    self._run_group([it for it in items if not it[2]], False)
            finally:
                with self._cv:
                    self._queued -= len(items)
                    self._busy = False
                    self._cv.notify_all()

    def _run_group(self, items: list, adapt: bool) -> None:
        if len(items) == 1:
            batch = items[0][0]
        elif len({it[0].dtype for it in items}) > 1:  # mixed uint8/float requests: all in value units
            batch = np.concatenate([self.to_float(it[0]) for it in items])
        else:
            batch = np.concatenate([it[0] for it in items])
        # from here on a thread caller can no longer cancel (a cancelled one is still computed: it shares the
        # batch); an asyncio caller's future is checked when its answer arrives in its loop
        live = [it[4] is not None or it[1].set_running_or_notify_cancel() for it in items]
        try:
            results = self.process(batch, adapt)
        except Exception as exc:
            self._deliver(items, live, [exc] * len(items))
            return
        self.batches += 1
        parts, i = [], 0
        for it in items:
            parts.append(results[i : i + len(it[0])])
            i += len(it[0])
        self._deliver(items, live, parts)
        self._run_after(batch, results, adapt)

    @staticmethod
    def _deliver(items: list, live: list[bool], answers: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for it, ok, answer in zip(items, live, answers, strict=True):
            loop = it[4]
            if loop is not None:
                by_loop.setdefault(loop, []).append((it[1], answer))
            elif ok:
                if isinstance(answer, BaseException):
                    it[1].set_exception(answer)
                else:
                    it[1].set_result(answer)
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                pass

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def _resolve(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    """In the requests' event loop: each future gets its answer unless its caller gave up (timeout, disconnect)."""
    for fut, answer in pairs:
        if not fut.done():
            if isinstance(answer, BaseException):
                fut.set_exception(answer)
            else:
                fut.set_result(answer)
