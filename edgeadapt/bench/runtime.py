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


def _timeit(fn, n_items: int, min_s: float, warmup: int = 5, min_count: int = 10) -> float:
    """Items/s over at least ``min_s`` and ``min_count`` calls (an engine's periodic work, e.g. one mixing batch in
    16, needs whole periods), but no longer than 20 x ``min_s`` (a method far slower than that is measured as it
    is, not waited for)."""
    for _ in range(warmup):
        fn()
    count, t0 = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        dt = time.perf_counter() - t0
        if (dt >= min_s and count >= min_count) or dt >= 20 * min_s:
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


#: engine batches per throughput figure at least: two periods of ``every=16``'s one mixing batch in 16
ENGINE_BATCHES = 32


def swap_ms(engine: AdaptiveEngine, repeats: int = 5) -> float:
    """Median wall time of installing a new parameter version (``apply_params``: the static session rebuilt with
    it, then swapped in between batches): what a cloud update costs the device, off the request path."""
    base = {k: v for k, v in engine.base_params.items() if k.endswith(".weight")}
    times = []
    for i in range(repeats):
        params = {k: v * np.float32(1 + 1e-3 * (i + 1)) for k, v in base.items()}
        t = time.perf_counter()
        engine.apply_params(params, engine.param_version + 1)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def bundle_mb(bundle_dir: Path) -> float:
    return sum(f.stat().st_size for f in Path(bundle_dir).iterdir() if f.is_file()) / 1e6


def run_runtime_bench(bundle_dir: str | Path, x: np.ndarray | None, method: str, batch: int = 64, threads: int = 2,
                      min_s: float = 3.0, http_requests: int = 200, with_torch: bool = True, http_batch: int = 64,
                      student_model: str | None = None, extra_methods: dict[str, str] | None = None) -> dict:
    """``x``: the inputs (None: synthesized from the bundle's input spec, ``synthetic_inputs``); ``http_batch``:
    images per HTTP request (a large model's batch of 64 can exceed the daemon's body limit); the torch rows
    rebuild the bundle's model from the registry or ``student_model`` (``module:factory``). ``extra_methods``:
    name -> method spec, each measured like ``method`` in the same interleaving (``<name>_img_s``, the ratio to
    static as ``ratio_<name>_vs_static``): the default and the transductive methods side by side."""
    bundle_dir = Path(bundle_dir)
    bundle = Bundle(bundle_dir)
    synthesized = x is None
    if x is None:
        x = synthetic_inputs(bundle, max(4 * batch, http_batch + 1))
    xb = x[:batch]
    xf = bundle.preprocess(xb)
    stream = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)] or [xb]
    engines = {"adaptive": AdaptiveEngine(bundle, EngineConfig(method=method, threads=threads))}
    for name, spec in (extra_methods or {}).items():
        engines[name] = AdaptiveEngine(bundle, EngineConfig(method=spec, threads=threads))

    def stepper(engine: AdaptiveEngine):
        pos = {"i": 0}

        def step():
            engine.process(stream[pos["i"] % len(stream)])
            pos["i"] += 1
        return step

    steps = {name: stepper(e) for name, e in engines.items()}
    static = engines["adaptive"].backend.__class__(bundle, threads=threads)  # pristine fast path, version 0
    res: dict = {"batch": batch, "threads": threads, "method": method, "inputs": "synthesized" if synthesized
                 else "stream", "methods": {"adaptive": method, **(extra_methods or {})},
                 "bundle_mb": round(bundle_mb(bundle_dir), 1)}
    # interleave the measurements twice to even out machine noise; numpy's BLAS on one thread as the daemon runs
    # it (device/backend.py single_threaded_blas), for this measurement only
    from threadpoolctl import threadpool_limits

    rates: dict[str, list[float]] = {"static": [], **{name: [] for name in steps}}
    with threadpool_limits(1, user_api="blas"):
        for _ in range(2):
            rates["static"].append(_timeit(lambda: static.run_static(xf), batch, min_s / 2))
            for name, step in steps.items():
                rates[name].append(_timeit(step, batch, min_s / 2, warmup=3, min_count=ENGINE_BATCHES))
    res["static_img_s"] = float(np.mean(rates["static"]))
    for name in steps:
        res[f"{name}_img_s"] = float(np.mean(rates[name]))
        res[f"ratio_{name}_vs_static"] = res[f"{name}_img_s"] / res["static_img_s"]
        if name != "adaptive":
            e = engines[name]
            res[f"{name}_transductive_batches"] = getattr(e, "transductive_batches", None)
            res[f"{name}_refolds"] = e.refreshes
    res["swap_ms"] = swap_ms(engines["adaptive"])
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
