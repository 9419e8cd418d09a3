"""`edgeadapt bench load`: concurrent clients for S seconds against the device's predict routes or the cloud's
/v1/samples, on loopback. Counts every outcome (a non-2xx answer, a wrong answer, a timeout or a dropped
connection is an error) and reports p50/p99 latency and throughput.

It starts the real daemon or cloud process itself (``edgeadapt device run`` / ``edgeadapt cloud serve
--no-trainer`` on a free loopback port, state and store in a temporary directory), or measures a running one
given ``url``. Bounded twice: by time and by a total request count. Torch-free (the device side imports it).

The device target measures serving honestly (issue 16): the load comes from its own process (``wrk`` with a Lua
script where it is installed, else an asyncio client over raw keep-alive sockets), whose CPU share is reported;
any of the routes (``v1-json``, ``v1-npy``, ``v1-raw``, ``v1-image``, ``v2-binary``, ``v2-json``) with ``batch``
images per request; and the engine's own img/s at the batch the server can form (connections × batch, up to the
daemon's max batch) is measured in the same run, on the same machine state, so HTTP/engine is one figure.
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
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGEADAPT_CLOUD_STORE_DIR": str(copy / "store"),
                # a home configured for PostgreSQL + S3: the copy still gets an empty SQLite store of its own
                "EDGEADAPT_CLOUD_DATABASE_URL": "", "EDGEADAPT_CLOUD_BLOB_URL": "", **(env or {})}
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


def fleet_requests(urls: list[str], tokens: list[str], clients: int, model: str, shape: list[int], classes: int,
                   batch: int = 8, timeout: float = 30, tally: Counter | None = None
                   ) -> Callable[[int], tuple[httpx.Client, RequestFn]]:
    """A fleet larger than the connections (issue 18): client ``i`` talks to replica ``urls[i % len(urls)]`` on its
    own keep-alive connection for the devices ``tokens[i::clients]``, in turn: each request is the next device's
    heartbeat or its upload of ``batch`` new samples (alternately), so every device heartbeats and uploads.
    ``tally`` counts what was accepted: heartbeats and samples."""
    from edgeadapt.core.wire import Heartbeat, SampleBatch, UploadSample, WireArray

    if len(tokens) < clients:
        raise ValueError(f"{clients} clients need at least as many devices, not {len(tokens)}")
    tally = Counter() if tally is None else tally
    lock = threading.Lock()

    def make(i: int) -> tuple[httpx.Client, RequestFn]:
        mine = tokens[i::clients]
        rng = np.random.default_rng(i)
        client = httpx.Client(base_url=urls[i % len(urls)], timeout=timeout, limits=httpx.Limits(max_connections=1),
                              headers={"content-type": "application/json"})
        images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        arrays = [WireArray.from_numpy(x) for x in images]
        logits = rng.normal(0, 1, (batch, classes)).astype(np.float32).tolist()
        turn = [0]

        def request(c: httpx.Client) -> str | None:
            k, turn[0] = turn[0], turn[0] + 1
            auth = {"Authorization": f"Bearer {mine[(k // 2) % len(mine)]}"}
            if k % 2 == 0:
                hb = Heartbeat(model=model, param_version=0, counters={"samples": float(k)}, status="ok")
                r = c.post("/v1/heartbeat", content=hb.model_dump_json(), headers=auth)
                if r.status_code != 200:
                    return f"HTTP {r.status_code}: {r.text[:200]}"
                with lock:
                    tally["heartbeats"] += 1
                return None
            samples = [UploadSample(id=uuid.uuid4().hex, input=a, logits=lg, entropy=1.0)
                       for a, lg in zip(arrays, logits, strict=True)]
            r = c.post("/v1/samples", content=SampleBatch(model=model, samples=samples).model_dump_json(),
                       headers=auth)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:200]}"
            if r.json().get("accepted") != batch:
                return f"wrong answer: {r.json()}"
            with lock:
                tally["samples"] += batch
            return None

        return client, request

    return make


def _register_devices(url: str, admin_token: str, n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    tokens = []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {admin_token}"}) as c:
        for i in range(n):
            r = c.post("/v1/admin/devices", json={"name": f"load-{tag}-{i:04d}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
    return tokens


def _check_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host not in LOOPBACK:
        raise ValueError(f"load tests run on loopback only; {url} is not 127.0.0.1/localhost/::1")


STORES = ("sqlite", "postgres")


def run_load_bench(target: str, bundle: str | Path, clients: int = 50, seconds: float = 60.0,
                   max_requests: int | None = None, url: str | None = None, home: str | Path | None = None,
                   admin_token: str | None = None, batch: int | None = None, work_dir: str | Path | None = None,
                   device_args: tuple[str, ...] = (), store: str = "sqlite", replicas: int = 1,
                   devices: int | None = None) -> dict:
    """The whole benchmark: start the target (unless ``url``), register devices (cloud), load it, report.

    ``home``: the cloud home whose keys sign for ``bundle`` (target cloud; a copy is used). ``batch``: images per
    request (device, default 1) or samples per upload (cloud, default 8). Cloud only: ``store`` "postgres" starts
    a throwaway PostgreSQL and an S3-compatible server (moto) on loopback and ``replicas`` cloud processes sharing
    them; ``devices`` registered devices (default: one per client) heartbeat and upload in turn through the
    ``clients`` connections, spread over the replicas."""
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, not {store!r}")
    if replicas < 1 or (replicas > 1 and store != "postgres"):
        raise ValueError("several replicas need a shared store: --store postgres (SQLite and a blob directory "
                         "are one machine's)")
    if target == "cloud" and (store != "sqlite" or replicas > 1 or devices is not None):
        return _fleet_load_bench(bundle, clients, seconds, max_requests, home, batch or 8, work_dir, store, replicas,
                                 devices or clients)
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


def _fleet_load_bench(bundle: str | Path, clients: int, seconds: float, max_requests: int | None,
                      home: str | Path | None, batch: int, work_dir: str | Path | None, store: str, replicas: int,
                      devices: int) -> dict:
    from contextlib import ExitStack

    from edgeadapt.core.bundle import read_manifest

    if home is None:
        raise ValueError("the cloud target needs the cloud home that signs for the bundle (--home)")
    if devices < clients:
        raise ValueError(f"--devices ({devices}) must be at least --clients ({clients})")
    manifest = read_manifest(bundle)
    tmp = tempfile.mkdtemp(prefix="edgeadapt-load-") if work_dir is None else None
    work = Path(work_dir or tmp)
    try:
        with ExitStack() as stack:
            args: tuple[str, ...] = ()
            if store == "postgres":
                from edgeadapt.bench.store_servers import postgres_server, s3_server

                pg = stack.enter_context(postgres_server(max_connections=100 + 20 * replicas))
                s3 = stack.enter_context(s3_server())
                args = ("--database-url", pg.create_database(), "--blob-url", s3.bucket_url(), "--blob-endpoint-url",
                        s3.endpoint_url)
            procs = [stack.enter_context(start_cloud(home, bundle, work / f"replica{k}", *args))
                     for k in range(replicas)]
            t0 = time.perf_counter()
            tokens = _register_devices(procs[0].url, procs[0].admin_token, devices)
            register_s = time.perf_counter() - t0
            tally: Counter = Counter()
            make = fleet_requests([p.url for p in procs], tokens, clients, manifest.model_name,
                                  list(manifest.input.shape), manifest.num_classes, batch, tally=tally)
            res = run_load(make, clients, seconds, max_requests)
            healthy = all(httpx.get(f"{p.url}/healthz", timeout=10).status_code == 200 for p in procs)
            admin = {"Authorization": f"Bearer {procs[0].admin_token}"}
            stored = [httpx.get(f"{p.url}/v1/admin/status", headers=admin, timeout=30).json()["samples"]
                      for p in procs]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    in_store = [sum(v for k, v in s.items() if k in ("train", "holdout", "novel")) for s in stored]
    return {"target": "cloud", "store": store, "replicas": replicas, "devices": devices, "batch": batch, **res,
            "register_s": round(register_s, 1), "heartbeats": tally["heartbeats"], "samples": tally["samples"],
            "samples_s": round(tally["samples"] / res["seconds"], 1) if res["seconds"] else 0.0,
            "heartbeats_s": round(tally["heartbeats"] / res["seconds"], 1) if res["seconds"] else 0.0,
            # every replica counts the same shared store: all the accepted samples, each once
            "stored_samples_per_replica": in_store, "healthy_after": healthy}


@contextmanager
def _target(target: str, bundle: str | Path, url: str | None, home: str | Path | None, work: Path,
            device_args: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    if url is not None:
        yield url.rstrip("/"), None
    elif target == "device":
        with start_device(bundle, work / "state", *device_args) as p:
            _STARTED[p.url] = p.proc.pid
            try:
                yield p.url, None
            finally:
                _STARTED.pop(p.url, None)
    else:
        if home is None:
            raise ValueError("the cloud target needs the cloud home that signs for the bundle (--home)")
        with start_cloud(home, bundle, work) as p:
            yield p.url, p.admin_token


# ------------------------------------------------------------------------------------------------ serving (issue 16)
ROUTES = ("v1-json", "v1-npy", "v1-raw", "v1-image", "v2-binary", "v2-json")


@dataclass
class ServingRequest:
    """One prepared request: what every connection sends again and again."""

    route: str
    path: str
    body: bytes
    headers: dict[str, str]
    batch: int


def serving_request(route: str, manifest, batch: int, seed: int = 0) -> ServingRequest:
    """The request body of ``route`` for ``batch`` random images of the bundle's input shape."""
    import base64

    import orjson

    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
    shape = list(manifest.input.shape)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    if route == "v1-json":
        body = orjson.dumps({"array": {"dtype": "uint8", "shape": list(x.shape),
                                       "data": base64.b64encode(x.tobytes()).decode()}})
        return ServingRequest(route, "/v1/predict", body, {"Content-Type": "application/json"}, batch)
    if route == "v1-npy":
        return ServingRequest(route, "/v1/predict", _npy(x), {"Content-Type": "application/x-npy"}, batch)
    if route == "v1-raw":
        return ServingRequest(route, "/v1/predict", x.tobytes(), {
            "Content-Type": "application/octet-stream", "X-Dtype": "uint8",
            "X-Shape": ",".join(map(str, x.shape))}, batch)
    if route == "v1-image":
        files = _jpegs(manifest.input, batch, rng)
        if batch == 1:
            return ServingRequest(route, "/v1/predict", files[0], {"Content-Type": "image/jpeg"}, batch)
        boundary = "edgeadaptbench"
        parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\"\r\n"
                  "Content-Type: image/jpeg\r\n\r\n").encode() + f + b"\r\n" for i, f in enumerate(files)]
        return ServingRequest(route, "/v1/predict", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                              {"Content-Type": f"multipart/form-data; boundary={boundary}"}, batch)
    path = f"/v2/models/{manifest.model_name}/infer"
    outputs = [{"name": n, "parameters": {"binary_data": route == "v2-binary"}} for n in ("class", "probs", "ood",
                                                                                         "ood_score")]
    if route == "v2-json":
        body = orjson.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape),
                                         "data": x.reshape(-1).tolist()}], "outputs": outputs})
        return ServingRequest(route, path, body, {"Content-Type": "application/json"}, batch)
    head = orjson.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}], "outputs": outputs})
    return ServingRequest(route, path, head + x.tobytes(), {"Content-Type": "application/octet-stream",
                                                           "Inference-Header-Content-Length": str(len(head))}, batch)


def _jpegs(spec, n: int, rng: np.random.Generator) -> list[bytes]:
    """``n`` JPEG files of the size the spec's preprocessing starts from (its resize, else its H×W): camera-like
    content (smooth gradients plus noise), quality 90."""
    from PIL import Image

    shape = list(spec.shape)
    c, h, w = (shape if spec.layout.upper().startswith("NC") else [shape[2], shape[0], shape[1]])
    side = spec.image_resize or max(h, w)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:side, 0:side]
        base = (np.sin(xx / rng.uniform(5, 30)) + np.cos(yy / rng.uniform(5, 30))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img if c == 3 else img[..., 0]).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _check_answer(route: str, batch: int, status: int, body: bytes, head_len: int | None) -> str | None:
    """None if ``body`` is a right answer to a request of ``batch`` images, else what was wrong."""
    import orjson

    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        if route.startswith("v1"):
            n = len(orjson.loads(body)["predictions"])
        else:
            doc = orjson.loads(body[:head_len] if head_len is not None else body)
            n = doc["outputs"][0]["shape"][0]
    except Exception as exc:  # not the JSON a right answer is
        return f"wrong answer: {type(exc).__name__}: {exc}"
    return None if n == batch else f"wrong answer: {n} predictions for {batch} images"


# -- the Python client: its own process, asyncio over raw keep-alive sockets ----------------------------------
def _client_process_main() -> None:
    """``python -m edgeadapt.bench.load`` (internal): read a job as JSON on stdin, load, print results as JSON."""
    import json

    job = json.loads(sys.stdin.read())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - the asyncio loop does too, a little slower
        pass
    import asyncio

    t_cpu = time.process_time()
    res = asyncio.run(_client_load(job))
    res["client_cpu_s"] = round(time.process_time() - t_cpu, 3)
    print(json.dumps(res))


async def _client_load(job: dict) -> dict:
    import asyncio
    import base64

    host, port, conns = job["host"], int(job["port"]), int(job["connections"])
    body = base64.b64decode(job["body"])
    head = f"POST {job['path']} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in job["headers"].items()) + "\r\n"
    request = head.encode() + body
    seconds, max_requests = float(job["seconds"]), job.get("max_requests")
    route, batch = job["route"], int(job["batch"])
    latencies: list[list[float]] = [[] for _ in range(conns)]
    codes: Counter = Counter()
    errors: list[str] = []
    sent = [0]
    t_end = [0.0]

    def problem(what: str) -> None:
        codes[what.split(":")[0]] += 1
        if len(errors) < 20:
            errors.append(what[:300])

    async def one_connection(i: int, start: asyncio.Event) -> None:
        reader = writer = None
        await start.wait()
        while time.perf_counter() < t_end[0] and (max_requests is None or sent[0] < max_requests):
            sent[0] += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
                writer.write(request)
                resp_head = await reader.readuntil(b"\r\n\r\n")
                status = int(resp_head[9:12])
                length, hlen, close = 0, None, False
                for line in resp_head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"inference-header-content-length":
                        hlen = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                data = await reader.readexactly(length)
                latencies[i].append(time.perf_counter() - t0)
                wrong = _check_answer(route, batch, status, data, hlen)
                if wrong is not None:
                    problem(wrong)
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                latencies[i].append(time.perf_counter() - t0)
                problem(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = asyncio.Event()
    tasks = [asyncio.create_task(one_connection(i, start)) for i in range(conns)]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    t_end[0] = t0 + seconds
    start.set()
    done, pending = await asyncio.wait(tasks, timeout=seconds + 60)
    wall = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    lat = np.array([v for per in latencies for v in per]) * 1000
    return _summary(lat, wall, codes, errors, conns, hung=len(pending))


def _summary(lat_ms: np.ndarray, wall: float, codes: Counter, errors: list[str], clients: int, hung: int) -> dict:
    n = len(lat_ms)
    pct = (lambda q: round(float(np.percentile(lat_ms, q)), 3)) if n else (lambda q: None)
    return {"clients": clients, "seconds": round(wall, 2), "requests": n, "errors": sum(codes.values()),
            "error_kinds": dict(codes), "error_samples": errors, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": round(float(lat_ms.max()), 3) if n else None,
            "req_s": round(n / wall, 1) if wall > 0 else 0.0, "hung_clients": hung}


def python_client(url: str, req: ServingRequest, connections: int, seconds: float,
                  max_requests: int | None = None) -> dict:
    """The load from a child Python process (asyncio, raw sockets, keep-alive), with its CPU time."""
    import base64
    import json

    u = httpx.URL(url)
    job = {"host": u.host, "port": u.port or 80, "path": req.path, "headers": req.headers,
           "body": base64.b64encode(req.body).decode(), "connections": connections, "seconds": seconds,
           "max_requests": max_requests, "route": req.route, "batch": req.batch}
    out = subprocess.run([sys.executable, "-m", "edgeadapt.bench.load"], input=json.dumps(job), text=True,
                         capture_output=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
    return {**json.loads(out.stdout), "client": "python"}


# -- wrk --------------------------------------------------------------------------------------------
_WRK_LUA = r"""
local f = io.open("%(body)s", "rb"); local body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.body = body
%(headers)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "status": %%d, "timeout": %%d, "p50": %%d, "p90": %%d, "p99": %%d, "max": %%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_client(url: str, req: ServingRequest, connections: int, seconds: float, work: Path) -> dict:
    """The load from ``wrk`` (one thread; a Lua script posts the prepared body), with its CPU time."""
    import json
    import resource

    body = work / f"body-{req.route}.bin"
    body.write_bytes(req.body)
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in req.headers.items())
    script = work / f"{req.route}.lua"
    script.write_text(_WRK_LUA % {"body": body, "headers": headers})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                          "-s", str(script), url.rstrip("/") + req.path], capture_output=True, text=True,
                         timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-2000:]} {out.stdout[-2000:]}")
    w = json.loads(line[len("WRKJSON "):])
    wall = w["duration_us"] / 1e6
    kinds = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
    n = w["requests"]
    res = {"clients": connections, "seconds": round(wall, 2), "requests": n, "errors": sum(kinds.values()),
           "error_kinds": kinds, "error_samples": [], "p50_ms": w["p50"] / 1000, "p90_ms": w["p90"] / 1000,
           "p99_ms": w["p99"] / 1000, "max_ms": w["max"] / 1000, "req_s": round(n / wall, 1) if wall else 0.0,
           "hung_clients": 0, "client": "wrk"}
    res["client_cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3)
    return res


# -- the engine alone, in the same run ----------------------------------------------------------------
def engine_throughput(bundle: str | Path, batch: int, seconds: float = 5.0, method: str | None = None,
                      threads: int = 2) -> dict:
    """img/s of the device's engine (``AdaptiveEngine.process`` on validated uint8 batches of ``batch``): what
    the HTTP path is compared with. Same method and threads as the daemon."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # as the daemon does (device run), for this measurement only:
        return _engine_throughput(bundle, batch, seconds, method, threads)  # the caller's process keeps its own


def _engine_throughput(bundle: str | Path, batch: int, seconds: float, method: str | None, threads: int) -> dict:
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.config import DEFAULT_METHOD
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    b = Bundle(bundle)
    from edgeadapt.device.daemon import DAEMON_ENGINE

    engine = AdaptiveEngine(b, EngineConfig(method=method or DEFAULT_METHOD, threads=threads, **DAEMON_ENGINE))
    rng = np.random.default_rng(1)
    xs = [engine.codec.check(rng.integers(0, 256, (batch, *b.manifest.input.shape), dtype=np.uint8))[0]
          for _ in range(8)]
    for i in range(5):
        engine.process(xs[i % len(xs)], validated=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.process(xs[n % len(xs)], validated=True)
        n += 1
    wall = time.perf_counter() - t0
    return {"engine_batch": batch, "engine_img_s": round(n * batch / wall, 1), "engine_batches": n,
            "engine_threads": threads, "engine_method": engine.config.method}


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux, or gone
        return None


def _served_batches(url: str) -> tuple[float, float]:
    """(batches, samples) the daemon has run so far, from its metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("edgeadapt_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("edgeadapt_batch_size_sum"):
            total = float(line.split()[-1])
    return count, total


def _served_config(url: str, model: str) -> dict:
    """The running daemon's batcher size, method and threads (its v2 model configuration): the engine alone is
    measured as the daemon runs it."""
    doc = httpx.get(f"{url}/v2/models/{model}/config", timeout=10).raise_for_status().json()
    params = doc.get("parameters", {})
    return {"max_batch": int(doc["dynamic_batching"]["preferred_batch_size"][0]),
            "method": params["adaptation_method"]["string_value"],
            "threads": int(params["engine_threads"]["string_value"])}


def run_serving_bench(bundle: str | Path, route: str = "v1-npy", batch: int = 1, connections: int = 50,
                      seconds: float = 30.0, max_requests: int | None = None, url: str | None = None,
                      client: str = "auto", engine_seconds: float = 5.0, work_dir: str | Path | None = None,
                      device_args: tuple[str, ...] = (), swaps: int = 0) -> dict:
    """Serving, measured honestly: start the daemon (unless ``url``), warm it, load ``route`` from a client in
    its own process (``wrk`` when installed and ``client`` is auto/wrk, else the Python client; a request-count
    bound needs the Python client), then the engine alone at the batch the server could form. -> one dict.

    ``swaps`` > 0 (a daemon this bench starts): versions 1..swaps are written to its state directory first and
    it starts on the newest; after the steady load, the same load runs again while the versions are switched
    (``POST /v1/admin/rollback``, the same ``apply_params`` swap an update makes) one by one down to 0, spread
    over the run: ``swap`` compares its failures and p99 with the steady run's."""
    from edgeadapt.core.bundle import read_manifest

    if connections < 1 or seconds <= 0 or batch < 1:
        raise ValueError("connections and batch must be >= 1 and seconds > 0")
    if client not in ("auto", "wrk", "python"):
        raise ValueError(f"client must be auto, wrk or python, not {client!r}")
    if url is not None:
        _check_loopback(url)
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk") is not None and max_requests is None)
    if use_wrk and shutil.which("wrk") is None:
        raise ValueError("--client wrk: wrk is not installed (apt-get install wrk)")
    if use_wrk and max_requests is not None:
        raise ValueError("wrk is bounded by time only: use the python client with --max-requests")
    manifest = read_manifest(bundle)
    req = serving_request(route, manifest, batch)
    tmp = tempfile.mkdtemp(prefix="edgeadapt-serve-") if work_dir is None else None
    work = Path(work_dir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if swaps:
        if url is not None:
            raise ValueError("--swaps needs a daemon this bench starts (its state directory is prepared)")
        _prepare_versions(bundle, work / "state", swaps)
    try:
        with _target("device", bundle, url, None, work, device_args) as (base, _):
            pid = _device_pid(base)
            with httpx.Client(base_url=base, timeout=30) as c:  # a right answer first, and a warm server
                for _ in range(20):
                    r = c.post(req.path, content=req.body, headers=req.headers)
                    wrong = _check_answer(route, batch, r.status_code, r.content,
                                          int(r.headers["inference-header-content-length"])
                                          if "inference-header-content-length" in r.headers else None)
                    if wrong is not None:
                        raise RuntimeError(f"the {route} request is not answered right: {wrong}")
            served = _served_config(base, manifest.model_name)
            b0, s0 = _served_batches(base)
            cpu0 = _proc_cpu_s(pid) if pid else None
            def load() -> dict:
                return wrk_client(base, req, connections, seconds, work) if use_wrk else \
                    python_client(base, req, connections, seconds, max_requests)

            res = load()
            cpu1 = _proc_cpu_s(pid) if pid else None
            b1, s1 = _served_batches(base)
            swap = _swapping_load(base, load, swaps, seconds, res) if swaps else None
            healthy = httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    server_cpu = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3)
    client_cpu = res.get("client_cpu_s")
    eng = engine_throughput(bundle, min(served["max_batch"], connections * batch), engine_seconds,
                            served["method"], served["threads"])
    items_s = round(res["req_s"] * batch, 1)
    out = {"target": "device", "route": route, "url": url or "started", "batch": batch, **res,
           "items_s": items_s, "healthy_after": healthy,
           "mean_served_batch": round((s1 - s0) / (b1 - b0), 2) if b1 > b0 else None,
           "server_cpu_s": server_cpu,
           "server_cpu_ms_per_request": round(1000 * server_cpu / res["requests"], 3)
           if server_cpu is not None and res["requests"] else None,
           "client_cpu_share": round(client_cpu / (client_cpu + server_cpu), 3)
           if client_cpu is not None and server_cpu else None,
           "client_cpu_of_machine": round(client_cpu / (res["seconds"] * (os.cpu_count() or 1)), 3)
           if client_cpu is not None and res["seconds"] else None,
           **eng, "http_engine_ratio": round(items_s / eng["engine_img_s"], 3) if eng["engine_img_s"] else None,
           "cpus": os.cpu_count(), "load_avg_before": [round(v, 2) for v in load_before],
           "load_avg_after": [round(v, 2) for v in load_after]}
    if swap is not None:
        out["swap"] = swap
    return out


def _prepare_versions(bundle: str | Path, state_dir: Path, n: int) -> None:
    """Versions 1..n of the bundle's parameters (each norm affine scaled by 1 + 1e-3·v: plausible, distinct) in a
    new daemon's version store, the newest current."""
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.versions import VersionStore

    b = Bundle(bundle)
    kinds = {t.name: t.kind for t in b.manifest.adaptable}
    state_dir.mkdir(parents=True, exist_ok=True)
    store = VersionStore(state_dir, b.params, keep=n + 1)
    for v in range(1, n + 1):
        params = {k: (a * np.float32(1 + 1e-3 * v) if kinds.get(k) == "norm_affine" else a).astype(np.float32)
                  for k, a in b.params.items()}
        store.save(v, params, source="bench")
    store.set_current(n, reason="bench load --swaps")


def _swapping_load(base: str, load: Callable[[], dict], swaps: int, seconds: float, steady: dict) -> dict:
    """The same load again while the daemon switches versions down to 0, evenly spread; -> the comparison."""
    done: list[dict] = []

    def switch() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            for to in range(swaps - 1, -1, -1):
                time.sleep(seconds / (swaps + 1))
                t0 = time.perf_counter()
                r = c.post("/v1/admin/rollback", json={"to": to})
                done.append({"to": to, "status": r.status_code, "ms": round(1000 * (time.perf_counter() - t0), 1)})

    t = threading.Thread(target=switch, name="swapper", daemon=True)
    t.start()
    res = load()
    t.join(60)
    version = httpx.get(f"{base}/healthz", timeout=10).json().get("param_version")
    return {"swaps": len(done), "applied": sum(d["status"] == 200 for d in done), "switches": done,
            "version_after": version, "requests": res["requests"], "errors": res["errors"],
            "error_kinds": res["error_kinds"], "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
            "max_ms": res["max_ms"], "req_s": res["req_s"], "steady_p99_ms": steady["p99_ms"],
            "p99_vs_steady": round(res["p99_ms"] / steady["p99_ms"], 2) if steady["p99_ms"] else None}


def _device_pid(base: str) -> int | None:
    """The pid of the daemon this bench started (``_STARTED``), None for one given by URL."""
    return _STARTED.get(base)


_STARTED: dict[str, int] = {}


if __name__ == "__main__":
    _client_process_main()
