"""The device daemon as a real process: HTTP predict in all forms, bad input -> 4xx while it keeps serving,
concurrent clients, SIGTERM saves adaptation state and a restart resumes it."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import free_port


def _start(bundle, state, port, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(bundle),
                          "--state-dir", str(state), "--listen", f"127.0.0.1:{port}", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(p.stdout.read().decode())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.2)
    p.kill()
    raise AssertionError("daemon did not start")


@pytest.fixture()
def daemon(tiny_bundle, tmp_path):
    port = free_port()
    p = _start(tiny_bundle, tmp_path / "state", port)
    yield f"http://127.0.0.1:{port}", p, tmp_path / "state"
    if p.poll() is None:
        p.kill()
        p.wait()


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_predict_forms_and_bad_input(daemon):
    url, _, _ = daemon
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", json={"inputs": (x[0].astype(np.float32) / 255).tolist(), "probs": True})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert 0 <= pred["class"] < 10 and len(pred["probs"]) == 10 and isinstance(pred["ood"], bool)
        assert abs(sum(pred["probs"]) - 1) < 1e-4 and "ood_score" in pred and r.json()["param_version"] == 0
        r = c.post("/v1/predict", json={"array": {"dtype": "uint8", "shape": list(x.shape),
                                                  "data": base64.b64encode(x.tobytes()).decode()}, "top_k": 2})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        assert len(r.json()["predictions"][0]["top_k"]) == 2
        r = c.post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        r = c.post("/v1/predict", content=x.tobytes(), headers={"content-type": "application/octet-stream",
                                                                "x-dtype": "uint8", "x-shape": "5,1,32,32"})
        assert r.status_code == 200
        bad = [
            dict(json={"inputs": np.zeros((2, 3, 32, 32)).tolist()}),                     # wrong shape
            dict(json={"inputs": [[1, 2], [3]]}),                                        # ragged
            dict(json={"inputs": [["a"]]}),                                              # not numbers
            dict(content=_npy(np.zeros((1, 1, 32, 32), np.int64)), headers={"content-type": "application/x-npy"}),
            dict(content=_npy(np.full((1, 1, 32, 32), np.nan, np.float32)),
                 headers={"content-type": "application/x-npy"}),                        # NaN
            dict(content=_npy(np.zeros((0, 1, 32, 32), np.float32)),
                 headers={"content-type": "application/x-npy"}),                        # empty batch
            dict(content=b"\x00garbage\xff" * 10, headers={"content-type": "application/x-npy"}),
            dict(content=b"{not json", headers={"content-type": "application/json"}),
            dict(json={"array": {"dtype": "uint8", "shape": [1, 1, 32, 32], "data": "!!!"}}),
            dict(json={"array": {"dtype": "uint8", "shape": [1, 1, 32, 32], "data": base64.b64encode(b"ab").decode()}}),
            dict(json={"array": {"dtype": "int64", "shape": [1], "data": ""}}),
            dict(json={}),
        ]
        for kw in bad:
            r = c.post("/v1/predict", **kw)
            assert 400 <= r.status_code < 500, (kw, r.status_code, r.text)
            assert r.json()["detail"]
        big = b"\x00" * (9 * 1024 * 1024)
        r = c.post("/v1/predict", content=big, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413
        # still serving
        assert c.post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"}).status_code == 200
        m = c.get("/metrics").text
        assert "edgeadapt_requests_total" in m and "edgeadapt_param_version" in m
        assert "edgeadapt_request_latency_seconds_bucket" in m


def test_concurrent_clients_are_batched(daemon):
    url, _, _ = daemon
    x = np.random.default_rng(1).integers(0, 256, (1, 1, 32, 32), dtype=np.uint8)

    def one(_):
        with httpx.Client(base_url=url, timeout=30) as c:
            return [c.post("/v1/predict", content=_npy(x), headers={"content-type": "application/x-npy"}).status_code
                    for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        codes = [c for cs in pool.map(one, range(8)) for c in cs]
    assert codes == [200] * 80
    m = httpx.get(f"{url}/metrics").text
    counts = [ln for ln in m.splitlines() if ln.startswith("edgeadapt_batch_size_count")]
    batches = float(counts[0].split()[-1])
    assert batches < 80  # some requests shared a forward pass


def test_sigterm_saves_state_and_restart_resumes(tiny_bundle, tmp_path):
    port = free_port()
    state = tmp_path / "state"
    p = _start(tiny_bundle, state, port)
    x = np.random.default_rng(2).integers(0, 256, (64, 1, 32, 32), dtype=np.uint8)
    for _ in range(3):
        assert httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=_npy(x),
                          headers={"content-type": "application/x-npy"}, timeout=30).status_code == 200
    batches = httpx.get(f"http://127.0.0.1:{port}/v1/status").json()["adapted_batches"]
    assert batches >= 3
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert (state / "adapt_state.safetensors").is_file()
    port2 = free_port()
    p2 = _start(tiny_bundle, state, port2)
    try:
        assert httpx.get(f"http://127.0.0.1:{port2}/v1/status").json()["adapted_batches"] == batches
    finally:
        p2.send_signal(signal.SIGTERM)
        p2.wait(30)


def test_one_method_default_with_or_without_a_cloud(tmp_path):
    """One default for the standalone daemon and the device in the loop (issue 17 item 3: the cloud's updates fit
    a device running it); an explicit method wins either way."""
    from edgeadapt.device.config import DEFAULT_METHOD, load_config

    base = {"bundle": tmp_path, "state_dir": tmp_path}
    cloud = {"cloud_url": "http://127.0.0.1:8700", "token": "t"}
    assert load_config(base, env={}).method == DEFAULT_METHOD
    assert load_config({**base, **cloud}, env={}).method == DEFAULT_METHOD
    assert load_config({**base, **cloud, "method": "lame"}, env={}).method == "lame"
    assert load_config({**base, "method": "ema_stats"}, env={}).method == "ema_stats"


def test_engine_knobs_have_one_path_from_the_device_config(tiny_bundle, tmp_path):
    """Every numeric or boolean engine knob can be set from the device config (``engine``), reaches the daemon's
    engine, and a wrong name, type or value is a config error naming the knob."""
    from edgeadapt.device.config import ConfigError, DeviceConfig, load_config
    from edgeadapt.device.daemon import DeviceDaemon
    from edgeadapt.device.engine import ENGINE_KNOBS

    assert {"input_shift", "shift_min_samples", "rerun_on_shift"} <= set(ENGINE_KNOBS)
    # the reliability policy has its own config field (DeviceConfig.reliability), shared with the selector
    assert not {"method", "threads", "backend", "ood_detector", "input_range_policy", "reliability",
                "reliable_entropy_factor", "max_ood_fraction"} & set(ENGINE_KNOBS)
    base = {"bundle": tmp_path, "state_dir": tmp_path}
    for bad, word in [({"nope": 1}, "nope"), ({"input_shift": "high"}, "input_shift"),
                      ({"stats_samples": 1.5}, "stats_samples"), ({"rerun_on_shift": 1}, "rerun_on_shift"),
                      ({"refresh_every": 0}, "refresh_every"), ({"input_shift": -1}, "input_shift")]:
        with pytest.raises(ConfigError, match=word):
            load_config({**base, "engine": bad}, env={})
    d = DeviceDaemon(DeviceConfig(bundle=tiny_bundle, state_dir=tmp_path / "s", listen="127.0.0.1:0",
                                  engine={"input_shift": 0.3, "shift_min_samples": 8, "rerun_on_shift": False}))
    try:
        c = d.engine.config
        assert (c.input_shift, c.shift_min_samples, c.rerun_on_shift) == (0.3, 8, False)
    finally:
        d.stop()
