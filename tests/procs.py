"""Real processes for the fault tests: a cloud (`edgeadapt cloud serve`) and a device (`edgeadapt device run`)
as subprocesses on loopback ports, their output in log files (a pipe nobody reads would block a chatty process),
and a predict load that counts every outcome. Nothing of ours is mocked here."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from edgeadapt.core.serving import wait_healthy
from tests.conftest import free_port


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@dataclass
class Proc:
    """One running edgeadapt process: its URL, Popen handle and log file."""

    name: str
    args: list[str]
    url: str
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    preexec_fn: object = None
    starts: int = 0

    def start(self, wait: bool = True, timeout: float = 120) -> Proc:
        self.starts += 1
        with open(self.log, "ab") as f:
            f.write(f"\n===== start {self.starts} =====\n".encode())
            self.popen = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                          preexec_fn=self.preexec_fn)  # noqa: PLW1509 - only resource limits
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_healthy(self.url, self.popen, self.name, timeout, self.tail)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or saved."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 30 s)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def wait_exit(self, timeout: float = 120) -> int:
        return self.popen.wait(timeout)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=kw.pop("timeout", 60), **kw)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEADAPT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def fresh_cloud_home(cloud_env, dest: Path) -> Path:
    """A copy of the test cloud home (same signing key and admin token) with an empty store."""
    shutil.copytree(cloud_env.home, dest)
    shutil.rmtree(dest / "store", ignore_errors=True)
    (dest / "store").mkdir()
    return dest


def cloud_proc(cloud_env, home: Path, log: Path, port: int | None = None, trainer: bool = False,
               extra: tuple[str, ...] = ()) -> Proc:
    """``edgeadapt cloud serve`` on loopback; with the teacher when ``trainer`` (training via the admin API)."""
    port = port or free_port()
    args = [sys.executable, "-m", "edgeadapt", "cloud", "serve", "--home", str(home), "--bundle",
            str(cloud_env.bundle), "--listen", f"127.0.0.1:{port}", "--no-trainer", *extra]
    if trainer:
        args += ["--teacher", "resnet_edge", "--teacher-weights", str(cloud_env.teacher_weights), "--seed", "0"]
    return Proc("cloud", args, f"http://127.0.0.1:{port}", log, _env())


def device_proc(bundle: Path, state: Path, log: Path, cloud_url: str | None = None, token: str | None = None,
                port: int | None = None, **settings: object) -> Proc:
    """``edgeadapt device run``; ``settings`` become EDGEADAPT_* environment variables (e.g. upload_all=1)."""
    port = port or free_port()
    args = [sys.executable, "-m", "edgeadapt", "device", "run", "--bundle", str(bundle), "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}"]
    if cloud_url:
        args += ["--cloud", cloud_url, "--token", token]
    env = _env(**{f"EDGEADAPT_{k.upper()}": str(v) for k, v in settings.items()})
    return Proc("device", args, f"http://127.0.0.1:{port}", log, env)


def add_device(cloud: Proc, admin_token: str, name: str) -> str:
    r = cloud.post("/v1/admin/devices", json={"name": name}, headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    """Poll ``cond()`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = cond()
        except httpx.HTTPError as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Load:
    """Clients that keep a device's /v1/predict busy and count every outcome (a refused connection fails too)."""

    url: str
    clients: int = 2
    batch: int = 16
    shift: float = 0.4
    pause_s: float = 0.0
    ok: int = 0
    samples: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, seed: int) -> None:
        from tests.cloud_fixtures import synthetic_images

        x = synthetic_images(self.batch * 8, seed=100 + seed, shift=self.shift)
        i = 0
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                xb = x[(i % 8) * self.batch : (i % 8 + 1) * self.batch]
                i += 1
                try:
                    r = c.post(f"{self.url}/v1/predict", content=npy(xb), headers={"content-type": "application/x-npy"})
                    good = r.status_code == 200 and len(r.json()["predictions"]) == len(xb)
                    with self._lock:
                        if good:
                            self.ok += 1
                            self.samples += len(xb)
                        else:
                            self.failed.append(f"{r.status_code}: {r.text[:200]}")
                except Exception as exc:
                    with self._lock:
                        self.failed.append(repr(exc))
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
