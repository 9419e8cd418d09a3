"""A benchmark stopped with SIGTERM (a CI timeout, `kill`, a supervisor) stops the cloud and device processes it
started, as Ctrl-C does, instead of leaving them running with their ports and cores (cli/bench_cmd.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.cloud_fixtures"]
pytestmark = pytest.mark.timeout(240)


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append((int(d.name), cmd))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc for the benchmark's child processes")
def test_a_benchmark_killed_with_sigterm_stops_the_cloud_it_started(cloud_env, tmp_path):
    bench = subprocess.Popen([sys.executable, "-m", "edgeadapt", "bench", "load", "--target", "cloud", "--bundle",
                              str(cloud_env.bundle), "--home", str(cloud_env.home), "--clients", "2", "--seconds",
                              "120", "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    clouds: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not clouds:
            assert bench.poll() is None, bench.stdout.read().decode()[-2000:]
            clouds = [pid for pid, cmd in _children(bench.pid) if "cloud" in cmd and "serve" in cmd]
            time.sleep(0.2)
        assert clouds, "the benchmark never started its cloud"
        time.sleep(3.0)  # the load is running against it
        bench.send_signal(signal.SIGTERM)
        rc = bench.wait(60)
        assert rc == 128 + signal.SIGTERM, bench.stdout.read().decode()[-2000:]
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in clouds):
            time.sleep(0.2)
        assert not any(_alive(p) for p in clouds), "the cloud it started is still running"
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in clouds:  # when the test fails they outlive the benchmark, adopted by init
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
