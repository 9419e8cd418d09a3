"""Dynamic batching (device/batcher.py): a lone request runs at once, queued requests share a batch up to the max,
clipped (adapt=False) requests never share one with adapting requests, and bookkeeping runs after the answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeadapt.device.batcher import MicroBatcher


class Recorder:
    """A batch function that echoes its input (so each caller can check it got its own rows back) and records
    every batch; ``gate`` holds the worker inside a batch so that requests queue up behind it."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, bool, np.dtype]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, x: np.ndarray, adapt: bool) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append((len(x), adapt, x.dtype))
        return x.copy()


def _images(i: int, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 4, 4), i, np.uint8)


@pytest.mark.parametrize("max_wait_ms", [0.0, 5.0])
def test_a_lone_request_does_not_wait_out_a_delay_of_zero(max_wait_ms):
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=64, max_wait_ms=max_wait_ms)
    try:
        b.submit(_images(0)).result(5)  # warm the worker thread
        lat = []
        for i in range(30):
            t0 = time.perf_counter()
            out = b.submit(_images(i)).result(5)
            lat.append(time.perf_counter() - t0)
            assert (out == i).all() and out.shape == (1, 1, 4, 4)
        p50 = float(np.median(lat)) * 1000
        if max_wait_ms == 0:
            assert p50 < 3.0, p50  # was max_wait_ms (5 ms) for every lone request
        else:
            assert p50 >= 4.5, p50  # an explicit queue delay is honoured
    finally:
        b.close()


def test_queued_requests_share_a_batch_up_to_the_max_and_get_their_own_rows():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=0)
    try:
        rec.gate.clear()
        first = b.submit(_images(100))
        assert rec.entered.wait(5)  # the worker is busy with the first request
        futs = [b.submit(_images(i, n=2)) for i in range(10)]  # 20 samples queue behind it
        big = b.submit(_images(200, n=20))  # larger than max_batch: runs alone
        rec.gate.set()
        assert (first.result(5) == 100).all()
        for i, f in enumerate(futs):
            out = f.result(5)
            assert out.shape == (2, 1, 4, 4) and (out == i).all()
        assert big.result(5).shape == (20, 1, 4, 4) and (big.result(5) == 200).all()
        sizes = [n for n, _, _ in rec.batches]
        assert sizes == [1, 8, 8, 4, 20], sizes  # what was queued, taken in max_batch-sized bites, in order
    finally:
        b.close()


def test_clipped_requests_never_share_a_batch_with_adapting_ones():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=64, max_wait_ms=0)
    try:
        rec.gate.clear()
        b.submit(_images(0))
        assert rec.entered.wait(5)
        futs = [(b.submit(_images(i), adapt=i % 3 != 0), i % 3 != 0) for i in range(12)]
        floats = b.submit(np.full((1, 1, 4, 4), 0.5, np.float32))
        rec.gate.set()
        for f, _ in futs:
            f.result(5)
        assert floats.result(5).dtype == np.float32
        adapting = sum(n for n, a, _ in rec.batches[1:] if a)
        kept_out = sum(n for n, a, _ in rec.batches[1:] if not a)
        assert adapting == 8 + 1 and kept_out == 4
        assert len(rec.batches) == 3  # one adapting batch (uint8 and float mixed, in value units), one not
        assert rec.batches[1][2] == np.float32 and rec.batches[2][2] == np.uint8
    finally:
        b.close()


def test_after_runs_once_the_answers_are_out_and_a_failure_there_does_not_stop_the_worker():
    seen: list[tuple[int, bool]] = []
    answered = threading.Event()

    def after(x, results, adapt):
        assert answered.wait(5)  # the caller already has its result
        seen.append((len(x), adapt))
        raise RuntimeError("bookkeeping failed")

    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, after=after)
    try:
        f = b.submit(_images(1))
        f.result(5)
        answered.set()
        answered2 = b.submit(_images(2), adapt=False).result(5)  # the worker survived the failing after()
        assert (answered2 == 2).all()
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [(1, True), (1, False)]
    finally:
        b.close()


def test_a_failing_batch_fails_its_requests_only_and_a_cancelled_one_is_skipped():
    calls = {"n": 0}

    def process(x, adapt):
        calls["n"] += 1
        if (x == 9).any():
            raise ValueError("bad batch")
        return x

    b = MicroBatcher(process, max_batch=1)
    try:
        with pytest.raises(ValueError, match="bad batch"):
            b.submit(_images(9)).result(5)
        assert (b.submit(_images(3)).result(5) == 3).all()
    finally:
        b.close()
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=64)
    try:
        rec.gate.clear()
        b.submit(_images(0))
        assert rec.entered.wait(5)
        gone = b.submit(_images(1))
        kept = b.submit(_images(2))
        assert gone.cancel()  # the caller gave up while it was queued
        rec.gate.set()
        assert (kept.result(5) == 2).all() and gone.cancelled()
    finally:
        b.close()


def test_async_callers_get_their_own_rows_and_one_that_gave_up_is_skipped():
    import asyncio

    rec = Recorder()
    b = MicroBatcher(rec, max_batch=64)

    async def main() -> None:
        rec.gate.clear()
        first = b.submit_async(_images(0))
        assert await asyncio.to_thread(rec.entered.wait, 5)
        futs = [b.submit_async(_images(i)) for i in range(1, 6)]
        gone = b.submit_async(_images(9))
        gone.cancel()  # e.g. its client disconnected, or its timeout passed
        rec.gate.set()
        outs = await asyncio.wait_for(asyncio.gather(first, *futs), 5)
        assert [int(o[0, 0, 0, 0]) for o in outs] == [0, 1, 2, 3, 4, 5]
        assert gone.cancelled()
        # and a thread caller alongside still works
        assert (await asyncio.to_thread(lambda: b.submit(_images(7)).result(5)) == 7).all()

    try:
        asyncio.run(main())
        assert [n for n, _, _ in rec.batches] == [1, 6, 1]  # the cancelled request still shared its batch
    finally:
        b.close()


def test_a_lone_request_runs_on_the_callers_thread_and_its_bookkeeping_after_it_on_the_worker():
    events: list[tuple[str, str, int]] = []
    release_after = threading.Event()

    def process(x, adapt):
        events.append(("process", threading.current_thread().name, int(x[0, 0, 0, 0])))
        return x.copy()

    def after(x, results, adapt):
        release_after.wait(5)
        events.append(("after", threading.current_thread().name, int(x[0, 0, 0, 0])))

    b = MicroBatcher(process, max_batch=8, after=after)
    try:
        out = b.run_alone(_images(1))
        assert out is not None and (out == 1).all()
        assert events == [("process", threading.current_thread().name, 1)]  # answered before the after-work
        # its after-work is pending on the worker: the engine is not free, a second lone request must queue
        assert b.run_alone(_images(2)) is None
        queued = b.submit(_images(3))
        release_after.set()
        assert (queued.result(5) == 3).all()
        deadline = time.monotonic() + 5
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the order of batches and bookkeeping is the worker path's: after(1) before the next batch runs
        assert [(e[0], e[2]) for e in events] == [("process", 1), ("after", 1), ("process", 3), ("after", 3)]
        assert events[1][1] == events[2][1] == "micro-batcher"
        assert b.alone_batches == 1 and b.batches == 2
        # idle again: the next lone request runs here
        assert (b.run_alone(_images(4)) == 4).all() and b.alone_batches == 2
    finally:
        b.close()


def test_run_alone_declines_while_the_worker_is_busy_and_raises_what_the_batch_raises():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8)
    try:
        rec.gate.clear()
        busy = b.submit(_images(0))
        assert rec.entered.wait(5)
        assert b.run_alone(_images(1)) is None  # the worker has the engine
        rec.gate.set()
        busy.result(5)
        deadline = time.monotonic() + 5
        out = None
        while out is None and time.monotonic() < deadline:  # the worker finishes its turn
            out = b.run_alone(_images(2))
        assert out is not None and (out == 2).all()
    finally:
        b.close()

    def failing(x, adapt):
        raise ValueError("bad batch")

    b = MicroBatcher(failing, max_batch=8)
    try:
        with pytest.raises(ValueError, match="bad batch"):
            b.run_alone(_images(1))
        with pytest.raises(ValueError, match="bad batch"):  # the engine was released: the worker path works
            b.submit(_images(1)).result(5)
    finally:
        b.close()
    assert b.run_alone(_images(1)) is None  # closed: nothing runs (submit says "shutting down")


def test_a_lone_requests_deferred_bookkeeping_runs_where_it_is_scheduled_and_holds_the_engine_until_then():
    import asyncio

    events: list[str] = []

    def process(x, adapt):
        events.append(f"process {int(x[0, 0, 0, 0])}")
        return x.copy()

    def after(x, results, adapt):
        events.append(f"after {int(x[0, 0, 0, 0])} on {threading.current_thread().name}")

    b = MicroBatcher(process, max_batch=8, after=after)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        out = b.run_alone(_images(1), defer=loop.call_soon)
        assert out is not None and events == ["process 1"]  # answered first: the after-work waits for the loop
        assert b.run_alone(_images(2), defer=loop.call_soon) is None  # the engine is held until it has run
        events.append("answer written")
        await asyncio.sleep(0)
        assert events[-1] == f"after 1 on {threading.current_thread().name}"
        assert (b.run_alone(_images(3), defer=loop.call_soon) == 3).all()  # free again
        await asyncio.sleep(0)

    try:
        asyncio.run(main())
        assert [e.split(" on ")[0] for e in events] == ["process 1", "answer written", "after 1", "process 3",
                                                        "after 3"]
        assert b.alone_batches == 2
    finally:
        b.close()
