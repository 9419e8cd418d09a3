"""`edgeadapt bench runtime`: throughput of the static graph, the adapting engine, a torch Tent step, and HTTP
latency of the daemon — all in one run on the same data, so the ratios are comparable on a noisy machine."""

from __future__ import annotations

import resource
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgeadapt.core.bundle import Bundle
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig


def _timeit(fn, n_items: int, min_s: float, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    count, t0 = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        dt = time.perf_counter() - t0
        if dt >= min_s and count >= 10:
            return count * n_items / dt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_inputs(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """``n`` inputs made from the bundle's input spec alone (no stream needed): uniform random values across the
    declared value range, in the form a client sends (uint8 where the range fits it, else float32). Throughput does
    not depend on the pixels; accuracy numbers need a stream."""
    codec = bundle.codec()
    v = np.random.default_rng(seed).uniform(codec.low, codec.high, (n, *codec.shape)).astype(np.float32)
    up = codec.to_upload(v)
    return up if up.dtype == np.uint8 else v


def http_latency(bundle_dir: Path, x: np.ndarray, requests: int, method: str, threads: int,
                 http_batch: int = 64) -> dict:
    import httpx
    import uvicorn

    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon
    from edgeadapt.device.server import create_app

    with tempfile.TemporaryDirectory() as state:
        port = _free_port()
        cfg = DeviceConfig(bundle=bundle_dir, state_dir=Path(state), listen=f"127.0.0.1:{port}", method=method,
                           threads=threads, max_wait_ms=1.0)
        daemon = DeviceDaemon(cfg)
        daemon.start()
        server = uvicorn.Server(uvicorn.Config(create_app(daemon), host="127.0.0.1", port=port, log_level="error"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.01)
        lat = []
        import io

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for i in range(requests + 5):
                buf = io.BytesIO()
                np.save(buf, x[(i * http_batch) % max(len(x) - http_batch, 1):][:http_batch])
                t = time.perf_counter()
                r = c.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
                r.raise_for_status()
                if i >= 5:
                    lat.append(time.perf_counter() - t)
        server.should_exit = True
        th.join(10)
        daemon.stop()
    return {"http_p50_ms": float(np.percentile(lat, 50) * 1e3), "http_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "http_requests": len(lat), "http_batch": http_batch}


def run_runtime_bench(bundle_dir: str | Path, x: np.ndarray | None, method: str, batch: int = 64, threads: int = 2,
                      min_s: float = 3.0, http_requests: int = 200, with_torch: bool = True, http_batch: int = 64,
                      student_model: str | None = None) -> dict:
    """``x``: the inputs (None: synthesized from the bundle's input spec, ``synthetic_inputs``); ``http_batch``:
    images per HTTP request (a large model's batch of 64 can exceed the daemon's body limit); the torch rows
    rebuild the bundle's model from the registry or ``student_model`` (``module:factory``)."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir)
    synthesized = x is None
    if x is None:
        x = synthetic_inputs(bundle, max(4 * batch, http_batch + 1))
    xb = x[:batch]
    xf = bundle.preprocess(xb)
    engine = AdaptiveEngine(bundle, EngineConfig(method=method, threads=threads))
    stream = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)] or [xb]
    pos = {"i": 0}

    def adaptive_step():
        engine.process(stream[pos["i"] % len(stream)])
        pos["i"] += 1

    static = engine.backend.__class__(bundle, threads=threads)  # pristine fast path, version 0
    res: dict = {"batch": batch, "threads": threads, "method": method, "inputs": "synthesized" if synthesized
                 else "stream"}
    # interleave the two measurements twice to even out machine noise
    s1 = _timeit(lambda: static.run_static(xf), batch, min_s / 2)
    a1 = _timeit(adaptive_step, batch, min_s / 2)
    s2 = _timeit(lambda: static.run_static(xf), batch, min_s / 2)
    a2 = _timeit(adaptive_step, batch, min_s / 2)
    res["static_img_s"] = (s1 + s2) / 2
    res["adaptive_img_s"] = (a1 + a2) / 2
    res["ratio_adaptive_vs_static"] = res["adaptive_img_s"] / res["static_img_s"]
    res.update(http_latency(bundle_dir, x, http_requests, method, threads, http_batch))
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # device side only: before torch
    if with_torch:
        import torch

        from edgeadapt.bench.torch_refs import Tent, rebuild_torch_model

        torch.set_num_threads(threads)
        tent = Tent(rebuild_torch_model(bundle_dir, student_model=student_model))
        xt = torch.from_numpy(xf)  # normalized by the bundle's input contract, as the graphs see it
        res["tent_torch_img_s"] = _timeit(lambda: tent.step(xt), batch, min_s / 2)
        model = rebuild_torch_model(bundle_dir, student_model=student_model)
        with torch.no_grad():
            res["torch_eval_img_s"] = _timeit(lambda: model(xt), batch, min_s / 2)
        res["ratio_adaptive_vs_tent"] = res["adaptive_img_s"] / res["tent_torch_img_s"]
    return res
