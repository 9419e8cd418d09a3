"""Load: 50 concurrent clients for 60 s against the device's /v1/predict and, separately, the cloud's /v1/samples,
on loopback, through `edgeadapt bench load` -> zero errors (non-2xx, wrong answer, timeout or dropped connection),
the server healthy afterwards, and p50/p99/throughput recorded. The full runs are slow-marked; a short run of
the same command stays in the default run so that the tool itself is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeadapt.bench.load import run_load, run_load_bench

pytest_plugins = ["tests.cloud_fixtures"]

CLIENTS = 50
SECONDS = 60


def _bench(*args: str, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgeadapt", "bench", "load", *args, "--json"], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    print(f"load {args}: {json.dumps({k: v for k, v in res.items() if k != 'error_samples'})}")
    return res


def _assert_clean(res: dict, clients: int, min_requests: int) -> None:
    assert res["errors"] == 0, res["error_samples"][:5]
    assert res["hung_clients"] == 0 and res["healthy_after"] is True
    assert res["clients"] == clients and res["requests"] >= min_requests
    assert 0 < res["p50_ms"] <= res["p99_ms"] <= res["max_ms"] and res["req_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_predict_50_clients_60_s(cloud_env):
    res = _bench("--target", "device", "--bundle", str(cloud_env.bundle), "--clients", str(CLIENTS),
                 "--seconds", str(SECONDS), timeout=500)
    _assert_clean(res, CLIENTS, min_requests=CLIENTS * 10)
    assert res["seconds"] >= SECONDS - 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cloud_samples_50_clients_60_s(cloud_env):
    res = _bench("--target", "cloud", "--bundle", str(cloud_env.bundle), "--home", str(cloud_env.home),
                 "--clients", str(CLIENTS), "--seconds", str(SECONDS), timeout=500)
    _assert_clean(res, CLIENTS, min_requests=CLIENTS * 5)
    assert res["seconds"] >= SECONDS - 1


@pytest.mark.timeout(300)
def test_load_bench_short_run_both_targets(cloud_env, tmp_path):
    """The same command, bounded by a request count: 10 clients, 200 requests each target."""
    dev = _bench("--target", "device", "--bundle", str(cloud_env.bundle), "--clients", "10", "--seconds", "60",
                 "--max-requests", "200", timeout=240)
    _assert_clean(dev, 10, min_requests=200)
    assert dev["requests"] == 200  # the count bound, not the time bound, ended it
    cloud = run_load_bench("cloud", cloud_env.bundle, clients=10, seconds=60, max_requests=200, home=cloud_env.home,
                           work_dir=tmp_path / "cloud")
    _assert_clean(cloud, 10, min_requests=200)
    assert cloud["requests"] == 200 and cloud["batch"] == 8 and cloud["items_s"] > cloud["req_s"]
    # the bench ran on a copy of the home; every accepted sample is in that copy's store, once
    from edgeadapt.cloud.store import SQLiteStore

    store = SQLiteStore(tmp_path / "cloud" / "home" / "store")
    try:
        assert store.count_samples() == 200 * 8
    finally:
        store.close()


def test_load_counts_errors_and_refuses_non_loopback(tmp_path, cloud_env):
    """The counting itself: a request that fails is an error, an exception is an error, and the time bound holds."""
    import httpx

    calls = {"n": 0}

    def make(i: int):
        def request(c: httpx.Client) -> str | None:
            calls["n"] += 1
            if calls["n"] % 3 == 0:
                return "HTTP 503: busy"
            if calls["n"] % 3 == 1:
                raise httpx.ReadTimeout("slow")
            return None

        return httpx.Client(), request

    res = run_load(make, clients=4, seconds=0.5, max_requests=30)
    assert res["requests"] == 30 and res["errors"] == 20
    assert res["error_kinds"] == {"HTTP 503": 10, "ReadTimeout": 10}
    res = run_load(lambda i: (httpx.Client(), lambda c: None), clients=2, seconds=0.3)
    assert 0.3 <= res["seconds"] < 5 and res["errors"] == 0 and res["requests"] > 0
    with pytest.raises(ValueError, match="loopback"):
        run_load_bench("device", cloud_env.bundle, url="http://10.1.2.3:8470", seconds=1)
