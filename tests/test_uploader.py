"""Uploader against a tiny real HTTP server (FastAPI + uvicorn on 127.0.0.1) standing in for the cloud."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from edgeadapt.core.wire import SampleBatch, UploadSample, WireArray
from edgeadapt.device.upload_queue import UploadQueue
from edgeadapt.device.uploader import Uploader

TOKEN = "device-token-123"


class FakeCloud:
    def __init__(self) -> None:
        self.status = 200
        self.max_samples: int | None = None  # answer 413 above this many samples
        self.requests: list[dict] = []
        self.stored: set[str] = set()
        app = FastAPI()

        @app.post("/v1/samples")
        async def samples(request: Request):
            body = await request.body()
            batch = SampleBatch.model_validate_json(body)
            self.requests.append({"auth": request.headers.get("authorization"), "batch": batch, "bytes": len(body)})
            if self.max_samples is not None and len(batch.samples) > self.max_samples:
                return JSONResponse({"detail": "too large"}, status_code=413)
            if self.status != 200:
                return JSONResponse({"detail": f"configured {self.status}"}, status_code=self.status)
            ids = [s.id for s in batch.samples]
            dup = sum(i in self.stored for i in ids)
            self.stored.update(ids)
            return {"accepted": len(ids) - dup, "duplicates": dup, "ids": ids}

        self.app = app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cloud():
    fake = FakeCloud()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    th.join(5)


@pytest.fixture
def fresh(cloud):
    cloud.status, cloud.max_samples = 200, None
    cloud.requests.clear()
    return cloud


def sample(i: int) -> UploadSample:
    return UploadSample(
        id=uuid.uuid4().hex,
        input=WireArray.from_numpy(np.full((1, 8, 8), i, dtype=np.uint8)),
        logits=[1.0, float(i)],
        entropy=0.3,
    )


def make(tmp_path, url, n=5, **kw):
    q = UploadQueue(tmp_path / "q.sqlite", max_bytes=10_000_000)
    items = [sample(i) for i in range(n)]
    q.put_many(items)
    return q, items, Uploader(q, url, TOKEN, "fmnist-resnet", timeout=5.0, **kw)


def test_ack_on_200(tmp_path, fresh):
    q, items, up = make(tmp_path, fresh.url + "/")
    with up:
        assert up.send_once() == 5
    assert len(q) == 0 and q.counters()["sent"] == 5
    req = fresh.requests[-1]
    assert req["auth"] == f"Bearer {TOKEN}"
    assert req["batch"].model == "fmnist-resnet"
    assert [s.id for s in req["batch"].samples] == [s.id for s in items]
    assert req["batch"].samples[3] == items[3]
    assert up.stats["bytes_up"] == req["bytes"] and up.stats["acked"] == 5 and up.last_status == 200
    assert up.send_once() == 0  # nothing left


def test_batch_size(tmp_path, fresh):
    q, _, up = make(tmp_path, fresh.url, n=5, batch_size=2)
    assert up.send_once() == 2 and up.send_once() == 2 and up.send_once() == 1
    assert len(fresh.requests) == 3 and len(q) == 0


def test_retry_on_500(tmp_path, fresh):
    q, items, up = make(tmp_path, fresh.url)
    fresh.status = 500
    now = time.time()
    assert up.send_once(now) == 0
    assert len(q) == 5 and q.counters()["retries"] == 5 and up.stats["errors"] == 1
    assert up.send_once(now) == 0 and len(fresh.requests) == 1  # backing off: nothing was ready
    fresh.status = 200
    assert up.send_once(now + 1.01) == 5
    assert len(q) == 0 and q.counters()["sent"] == 5


def test_retry_on_429_and_auth_errors(tmp_path, fresh):
    q, _, up = make(tmp_path, fresh.url)
    fresh.status = 429
    now = time.time()
    up.send_once(now)
    assert len(q) == 5 and q.counters()["rejected"] == 0
    fresh.status = 401
    up.send_once(now + 1.01)
    assert len(q) == 5 and up.stats["auth_errors"] == 1  # a bad token must not empty the queue


def test_drop_on_400(tmp_path, fresh):
    q, _, up = make(tmp_path, fresh.url)
    fresh.status = 400
    assert up.send_once() == 0
    assert len(q) == 0 and q.counters()["rejected"] == 5 and up.stats["rejected"] == 5
    assert "configured 400" in up.last_error


def test_split_on_413(tmp_path, fresh):
    q, _, up = make(tmp_path, fresh.url, n=8)
    fresh.max_samples = 2
    assert up.send_once() == 8
    assert len(q) == 0
    assert sorted(len(r["batch"].samples) for r in fresh.requests) == [2, 2, 2, 2, 4, 4, 8]


def test_network_error_nacks(tmp_path):
    q, _, up = make(tmp_path, f"http://127.0.0.1:{free_port()}", n=3)
    with up:
        assert up.send_once() == 0
    assert len(q) == 3 and q.counters()["retries"] == 3 and up.stats["errors"] == 1
    assert up.last_status is None and up.last_error


def test_background_thread_drains(tmp_path, fresh):
    q, _, up = make(tmp_path, fresh.url, n=10, batch_size=3, poll_interval=0.05)
    up.start()
    try:
        deadline = time.time() + 10
        while len(q) and time.time() < deadline:
            time.sleep(0.02)
        assert len(q) == 0
        q.put(sample(99))  # picked up on a later poll
        deadline = time.time() + 10
        while len(q) and time.time() < deadline:
            time.sleep(0.02)
        assert len(q) == 0 and up.running
    finally:
        up.close()
    assert not up.running and q.counters()["sent"] == 11
