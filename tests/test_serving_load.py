"""`edgeadapt bench load --target device` measures serving honestly (issue 16): every route answered right under
concurrent load from a client in its own process, the client's CPU share, and the engine's own img/s from the
same run. Short runs bounded by a request count; the figures themselves are in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edgeadapt.bench.load import ROUTES, run_serving_bench, start_device


def _clean(res: dict, requests: int | None = None) -> None:
    assert res["errors"] == 0, res["error_samples"][:5]
    assert res["hung_clients"] == 0 and res["healthy_after"] is True
    if requests is not None:
        assert res["requests"] == requests  # the count bound ended it
    assert 0 < res["p50_ms"] <= res["p99_ms"] <= res["max_ms"] and res["req_s"] > 0
    assert res["engine_img_s"] > 0 and res["http_engine_ratio"] == pytest.approx(
        res["items_s"] / res["engine_img_s"], rel=0.01)


def test_every_route_under_concurrent_load(tiny_bundle, tmp_path):
    with start_device(tiny_bundle, tmp_path / "state") as dev:
        for route in ROUTES:
            res = run_serving_bench(tiny_bundle, route=route, batch=2, connections=4, seconds=30, max_requests=60,
                                    url=dev.url, client="python", engine_seconds=0.3)
            _clean(res, 60)
            assert res["route"] == route and res["client"] == "python" and res["items_s"] == pytest.approx(
                2 * res["req_s"], abs=0.2)
            assert res["client_cpu_s"] > 0 and res["server_cpu_s"] is None  # a daemon given by URL: no pid
            assert res["engine_batch"] == 8  # 4 connections x 2 images: the largest batch the server could form
            assert res["mean_served_batch"] >= 2  # each request's 2 images run together (or with others)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_run_reports_cpu_shares_and_the_engine(tiny_bundle, tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgeadapt", "bench", "load", "--target", "device", "--bundle",
                          str(tiny_bundle), "--route", "v2-binary", "--connections", "8", "--seconds", "2",
                          "--engine-seconds", "0.5", "--device-args=--threads 1", "--json"],
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "EDGEADAPT_MAX_BATCH": "4"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    _clean(res)
    assert res["client"] == "wrk" and res["requests"] > 20
    assert 0 < res["client_cpu_share"] < 1 and res["server_cpu_ms_per_request"] > 0
    # the engine alone runs as the daemon does: its max batch (environment) and its threads (flag)
    assert res["engine_batch"] == 4 and res["mean_served_batch"] <= 4 and res["engine_threads"] == 1
    assert len(res["load_avg_before"]) == 3


def test_parameter_swaps_under_load_fail_no_request(tiny_bundle, tmp_path):
    """The issue's swap figure, small: versions switched through the admin route while the load runs."""
    res = run_serving_bench(tiny_bundle, route="v1-raw", connections=4, seconds=3, client="python",
                            engine_seconds=0.3, work_dir=tmp_path / "work", swaps=2)
    _clean(res)
    swap = res["swap"]
    assert swap["swaps"] == 2 and swap["applied"] == 2 and swap["version_after"] == 0
    assert [s["to"] for s in swap["switches"]] == [1, 0]
    assert swap["errors"] == 0 and swap["requests"] > 20 and swap["p99_vs_steady"] > 0
