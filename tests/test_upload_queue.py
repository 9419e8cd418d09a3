"""Persistent upload queue: survives reopen and kill -9, byte bound with drop policies, backoff, counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.core.wire import UploadSample, WireArray
from edgeadapt.device.upload_queue import UploadQueue, backoff_delay

REPO = Path(__file__).resolve().parents[1]


def sample(i: int = 0, novel: bool = False) -> UploadSample:
    img = np.full((1, 32, 32), i % 256, dtype=np.uint8)
    return UploadSample(
        id=uuid.uuid4().hex,
        input=WireArray.from_numpy(img),
        logits=[0.1 * i, 0.0, -1.0],
        entropy=0.5,
        novel=novel,
    )


def size_of(s: UploadSample) -> int:
    return len(s.model_dump_json().encode())


def test_put_peek_ack_and_reopen(tmp_path):
    db = tmp_path / "state" / "uploads.sqlite"
    q = UploadQueue(db, max_bytes=10_000_000)
    items = [sample(i, novel=(i == 4)) for i in range(5)]
    assert all(q.put(s) for s in items)
    assert not q.put(items[0])  # same id again: ignored
    assert len(q) == 5
    got = q.peek_batch(3)
    assert [i for i, _ in got] == [s.id for s in items[:3]]
    assert got[0][1] == items[0]
    assert q.ack([got[0][0], "not-there"]) == 1
    c = q.counters()
    assert c["queued"] == 4 and c["sent"] == 1 and c["put"] == 5 and c["duplicates"] == 1
    assert c["queued_novel"] == 1 and c["queued_adapt"] == 3
    assert c["queued_bytes"] == sum(size_of(s) for s in items[1:])
    q.close()

    q2 = UploadQueue(db, max_bytes=10_000_000)
    assert len(q2) == 4
    assert [i for i, _ in q2.peek_batch(10)] == [s.id for s in items[1:]]
    c2 = q2.counters()
    assert c2["sent"] == 1 and c2["put"] == 5 and c2["queued_bytes"] == c["queued_bytes"]
    q2.close()


CHILD = """
import sys, time, uuid
import numpy as np
from edgeadapt.core.wire import UploadSample, WireArray
from edgeadapt.device.upload_queue import UploadQueue
q = UploadQueue(sys.argv[1], max_bytes=10_000_000)
for i in range(int(sys.argv[2])):
    q.put(UploadSample(id=f"kill9-{i:04d}", input=WireArray.from_numpy(np.zeros((1, 8, 8), np.uint8)),
                       logits=[float(i)], entropy=0.1))
print("ready", flush=True)
time.sleep(120)
"""


def test_survives_kill_9(tmp_path):
    db = tmp_path / "uploads.sqlite"
    n = 25
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(n)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    q = UploadQueue(db, max_bytes=10_000_000)
    assert len(q) == n
    ids = [i for i, _ in q.peek_batch(100)]
    assert ids == [f"kill9-{i:04d}" for i in range(n)]
    assert q.peek_batch(100)[-1][1].logits == [float(n - 1)]
    assert q.counters()["put"] == n
    q.close()


def test_byte_bound_drop_oldest(tmp_path):
    items = [sample(i) for i in range(5)]
    one = size_of(items[0])
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=int(3.5 * one), drop_policy="drop_oldest")
    for s in items:
        assert q.put(s)
    assert len(q) == 3 and q.queued_bytes <= q.max_bytes
    assert [i for i, _ in q.peek_batch(10)] == [s.id for s in items[2:]]
    assert q.counters()["dropped_oldest"] == 2


def test_byte_bound_drop_newest_and_too_large(tmp_path):
    items = [sample(i) for i in range(5)]
    one = size_of(items[0])
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=int(3.5 * one), drop_policy="drop_newest")
    results = [q.put(s) for s in items]
    assert results == [True, True, True, False, False]
    assert [i for i, _ in q.peek_batch(10)] == [s.id for s in items[:3]]
    assert q.counters()["dropped_full"] == 2
    tiny = UploadQueue(tmp_path / "tiny.sqlite", max_bytes=one - 1)
    assert not tiny.put(items[0])
    assert tiny.counters()["dropped_too_large"] == 1 and len(tiny) == 0
    with pytest.raises(ValueError):
        UploadQueue(tmp_path / "x.sqlite", max_bytes=1, drop_policy="random")


def test_put_many_is_one_transaction(tmp_path):
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=10_000_000)
    assert q.put_many([sample(i) for i in range(10)]) == 10
    assert len(q) == 10


def test_nack_backoff_and_drop(tmp_path):
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=10_000_000, backoff_base_s=1.0, backoff_cap_s=60.0)
    s = sample()
    now = 1_000.0
    q.put(s, now=now)
    assert len(q.peek_batch(10, now)) == 1
    assert q.nack([s.id], now) == 1
    assert q.peek_batch(10, now) == [] and q.peek_batch(10, now + 0.49) == []
    assert len(q.peek_batch(10, now + 1.001)) == 1  # first retry after 0.5..1 s
    q.nack([s.id], now)
    assert q.peek_batch(10, now + 0.99) == []  # second: 1..2 s
    assert len(q.peek_batch(10, now + 2.001)) == 1
    nxt = q.next_ready_at()
    assert now + 1.0 <= nxt <= now + 2.0
    assert q.counters()["retries"] == 2
    assert q.drop([s.id], "rejected") == 1 and len(q) == 0
    assert q.counters()["rejected"] == 1 and q.next_ready_at() is None


def test_backoff_delay_bounds():
    import random

    rng = random.Random(0)
    for attempts in range(1, 30):
        d = backoff_delay(attempts, 1.0, 60.0, rng)
        cap = min(60.0, 2.0 ** (attempts - 1))
        assert 0.5 * cap <= d <= cap
    assert backoff_delay(100, 1.0, 60.0, rng) <= 60.0


def test_max_attempts(tmp_path):
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=10_000_000, max_attempts=2)
    s = sample()
    q.put(s, now=0.0)
    q.nack([s.id], 0.0)
    q.nack([s.id], 10.0)
    assert len(q) == 0 and q.counters()["dropped_attempts"] == 1


def test_thread_safe_puts(tmp_path):
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=100_000_000, synchronous="NORMAL")

    def worker():
        for i in range(20):
            q.put(sample(i))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(q) == 80 and q.counters()["put"] == 80
    q.close()
    assert len(UploadQueue(tmp_path / "q.sqlite", max_bytes=100_000_000)) == 80


def test_retry_now_makes_backed_off_items_ready(tmp_path):
    """When the cloud answers again the uploader calls retry_now: the backlog goes at once, attempts are kept."""
    with UploadQueue(tmp_path / "q.sqlite", max_bytes=1 << 20, backoff_base_s=30, backoff_cap_s=60) as q:
        q.put_many([sample(i) for i in range(3)], now=1000.0)
        ids = [i for i, _ in q.peek_raw(10, now=1000.0)]
        q.nack(ids, now=1000.0)
        assert q.peek_raw(10, now=1001.0) == []
        assert q.retry_now(now=1001.0) == 3
        assert len(q.peek_raw(10, now=1001.0)) == 3
        assert q.retry_now(now=1001.0) == 0


def test_in_flight_item_evicted_before_its_ack_counts_as_sent(tmp_path):
    """drop_oldest may evict an item of the batch the uploader is sending; the cloud still gets it, so its ack counts
    it as sent, not dropped: put == sent + dropped always matches what the cloud received."""
    items = [sample(i) for i in range(6)]
    one = size_of(items[0])
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=int(3.5 * one), drop_policy="drop_oldest")
    for s in items[:3]:
        q.put(s)
    batch = [i for i, _ in q.peek_raw(2)]  # items 0 and 1 are in flight
    q.put(items[3])  # evicts item 0 while it is in flight
    q.put(items[4])  # evicts item 1
    c = q.counters()
    assert c["dropped_oldest"] == 2 and len(q) == 3
    assert q.ack(batch) == 2  # the cloud answered 2xx for both
    c = q.counters()
    assert c["sent"] == 2 and c["dropped_oldest"] == 0
    assert c["put"] == c["sent"] + c["dropped_oldest"] + c["queued"]
    # evicted items that were not in flight stay dropped, and a stale ack does not count twice
    q.put(items[5])  # evicts item 2, never peeked
    assert q.ack(batch) == 0
    c = q.counters()
    assert c["sent"] == 2 and c["dropped_oldest"] == 1
    assert c["put"] == c["sent"] + c["dropped_oldest"] + c["queued"]
