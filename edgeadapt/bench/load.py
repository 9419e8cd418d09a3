"""`edgeadapt bench load`: N concurrent clients for S seconds against the device's /v1/predict or the cloud's
/v1/samples, on loopback. Counts every outcome (a non-2xx answer, a wrong answer, a timeout or a dropped
connection is an error) and reports p50/p99 latency and throughput.

It starts the real daemon or cloud process itself (``edgeadapt device run`` / ``edgeadapt cloud serve
--no-trainer`` on a free loopback port, state and store in a temporary directory), or measures a running one
given ``url``. Bounded twice: by time and by a total request count. Torch-free (the device side imports it).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from edgeadapt.core.serving import wait_healthy

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class Proc:
    """A server process started for a test or a benchmark."""

    url: str
    proc: subprocess.Popen
    log: Path
    admin_token: str | None = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _started(cmd: list[str], log: Path, url: str, env: dict[str, str], timeout: float,
             admin_token: str | None = None) -> Iterator[Proc]:
    # output goes to a file: a pipe nobody reads fills up under load and then blocks the server
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    p = Proc(url, proc, log, admin_token)
    try:
        wait_healthy(p.url, p.proc, p.url, timeout, p.log_tail)
        yield p
    finally:
        _stop(proc)


@contextmanager
def start_device(bundle: str | Path, state_dir: str | Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 90) -> Iterator[Proc]:
    """``edgeadapt device run`` on a free loopback port; stopped (SIGTERM) on exit."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(bundle), "--state-dir",
           str(state_dir), "--listen", f"127.0.0.1:{port}", "--log-level", "warning", *args]
    with _started(cmd, state_dir.parent / f"{state_dir.name}.log", f"http://127.0.0.1:{port}",
                  {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout) as p:
        yield p


@contextmanager
def start_cloud(home: str | Path, bundle: str | Path, work_dir: str | Path, *args: str,
                env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[Proc]:
    """``edgeadapt cloud serve --no-trainer`` on a free loopback port, on a copy of ``home`` (its keys, admin token
    and config) with an empty store in ``work_dir``: load never writes into the real store."""
    from edgeadapt.cloud.admin import read_admin_token

    work_dir = Path(work_dir)
    copy = work_dir / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns("store"), dirs_exist_ok=True)
    (copy / "store").mkdir(exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(copy), "--bundle", str(bundle),
           "--listen", f"127.0.0.1:{port}", "--no-trainer", "--log-level", "warning", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGEADAPT_CLOUD_STORE_DIR": str(copy / "store"), **(env or {})}
    with _started(cmd, work_dir / "cloud.log", f"http://127.0.0.1:{port}", full_env, timeout,
                  admin_token=read_admin_token(copy)) as p:
        yield p


# ------------------------------------------------------------------------------------------------ the load
RequestFn = Callable[[httpx.Client], str | None]  # one request; returns None if it was right, else what was wrong


def run_load(make_client: Callable[[int], tuple[httpx.Client, RequestFn]], clients: int, seconds: float,
             max_requests: int | None = None) -> dict:
    """``clients`` threads, each with its own connection, send requests back to back until ``seconds`` have passed
    or ``max_requests`` were sent in all. -> counts, latency percentiles (of every request, errors included) and
    throughput."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    codes: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    stop = threading.Event()
    made = [make_client(i) for i in range(clients)]  # connections set up before the clock starts

    def worker(i: int) -> None:
        client, request = made[i]
        try:
            while not stop.is_set():
                with lock:
                    if max_requests is not None and sent[0] >= max_requests:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    problem = request(client)
                except Exception as exc:  # timeout, refused or dropped connection, bad JSON: all errors
                    problem = f"{type(exc).__name__}: {exc}"
                latencies[i].append(time.perf_counter() - t0)
                if problem is not None:
                    with lock:
                        codes[problem.split(":")[0]] += 1
                        if len(errors) < 20:
                            errors.append(problem[:300])
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    lat = np.array([v for per in latencies for v in per]) * 1000
    n = len(lat)
    n_err = sum(codes.values())
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if n else (lambda q: None)
    return {"clients": clients, "seconds": round(wall, 2), "requests": n, "errors": n_err,
            "error_kinds": dict(codes), "error_samples": errors, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": round(float(lat.max()), 2) if n else None,
            "req_s": round(n / wall, 1) if wall > 0 else 0.0, "hung_clients": sum(t.is_alive() for t in threads)}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def device_requests(url: str, shape: list[int], batch: int = 1, timeout: float = 30
                    ) -> Callable[[int], tuple[httpx.Client, RequestFn]]:
    """Client ``i`` posts its own ``batch`` random uint8 images as .npy and checks it got ``batch`` predictions."""

    def make(i: int) -> tuple[httpx.Client, RequestFn]:
        x = np.random.default_rng(i).integers(0, 256, (batch, *shape), dtype=np.uint8)
        body = _npy(x)
        client = httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=1))

        def request(c: httpx.Client) -> str | None:
            r = c.post("/v1/predict", content=body, headers={"content-type": "application/x-npy"})
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:200]}"
            if len(r.json()["predictions"]) != batch:
                return f"wrong answer: {len(r.json()['predictions'])} predictions for {batch} images"
            return None

        return client, request

    return make


def cloud_requests(url: str, tokens: list[str], model: str, shape: list[int], classes: int, batch: int = 8,
                   timeout: float = 30) -> Callable[[int], tuple[httpx.Client, RequestFn]]:
    """Client ``i`` is a device (``tokens[i]``) uploading batches of ``batch`` new samples (fresh ids each time)
    and checks every one was accepted."""

    def make(i: int) -> tuple[httpx.Client, RequestFn]:
        rng = np.random.default_rng(i)
        client = httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=1),
                              headers={"Authorization": f"Bearer {tokens[i]}", "content-type": "application/json"})
        from edgeadapt.core.wire import SampleBatch, UploadSample, WireArray

        images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        arrays = [WireArray.from_numpy(x) for x in images]
        logits = rng.normal(0, 1, (batch, classes)).astype(np.float32).tolist()

        def request(c: httpx.Client) -> str | None:
            samples = [UploadSample(id=uuid.uuid4().hex, input=a, logits=lg, entropy=1.0)
                       for a, lg in zip(arrays, logits, strict=True)]
            r = c.post("/v1/samples", content=SampleBatch(model=model, samples=samples).model_dump_json())
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:200]}"
            if r.json().get("accepted") != batch:
                return f"wrong answer: {r.json()}"
            return None

        return client, request

    return make


def _register_devices(url: str, admin_token: str, n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    tokens = []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {admin_token}"}) as c:
        for i in range(n):
            r = c.post("/v1/admin/devices", json={"name": f"load-{tag}-{i:03d}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
    return tokens


def _check_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host not in LOOPBACK:
        raise ValueError(f"load tests run on loopback only; {url} is not 127.0.0.1/localhost/::1")


def run_load_bench(target: str, bundle: str | Path, clients: int = 50, seconds: float = 60.0,
                   max_requests: int | None = None, url: str | None = None, home: str | Path | None = None,
                   admin_token: str | None = None, batch: int | None = None, work_dir: str | Path | None = None,
                   device_args: tuple[str, ...] = ()) -> dict:
    """The whole benchmark: start the target (unless ``url``), register devices (cloud), load it, report.

    ``home``: the cloud home whose keys sign for ``bundle`` (target cloud; a copy is used). ``batch``: images per
    request (device, default 1) or samples per upload (cloud, default 8)."""
    from edgeadapt.core.bundle import read_manifest

    if target not in ("device", "cloud"):
        raise ValueError(f"target must be device or cloud, not {target!r}")
    if clients < 1 or seconds <= 0:
        raise ValueError("clients must be >= 1 and seconds > 0")
    if url is not None:
        _check_loopback(url)
    manifest = read_manifest(bundle)
    shape = list(manifest.input.shape)
    tmp = tempfile.mkdtemp(prefix="edgeadapt-load-") if work_dir is None else None
    work = Path(work_dir or tmp)
    try:
        with _target(target, bundle, url, home, work, device_args) as (base, admin):
            if target == "device":
                b = batch or 1
                make = device_requests(base, shape, b)
            else:
                if admin_token or admin:
                    tokens = _register_devices(base, admin_token or admin, clients)
                else:
                    raise ValueError("the cloud target needs an admin token (--admin-token) to register devices")
                b = batch or 8
                make = cloud_requests(base, tokens, manifest.model_name, shape, manifest.num_classes, b)
            res = run_load(make, clients, seconds, max_requests)
            healthy = httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"target": target, "url": url or "started", "batch": b, **res,
            "items_s": round(res["req_s"] * b, 1), "healthy_after": healthy}


@contextmanager
def _target(target: str, bundle: str | Path, url: str | None, home: str | Path | None, work: Path,
            device_args: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    if url is not None:
        yield url.rstrip("/"), None
    elif target == "device":
        with start_device(bundle, work / "state", *device_args) as p:
            yield p.url, None
    else:
        if home is None:
            raise ValueError("the cloud target needs the cloud home that signs for the bundle (--home)")
        with start_cloud(home, bundle, work) as p:
            yield p.url, p.admin_token
