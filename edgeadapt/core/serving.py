"""A uvicorn server that shuts down gracefully on SIGTERM/SIGINT and then returns (exit status 0), instead of
re-raising the signal, so the caller can save state after ``run()``. Used by both daemons."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Generator

import uvicorn


class GracefulServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def wait_healthy(url: str, proc, what: str, timeout: float = 120,
                 tail: Callable[[], str] = lambda: "") -> None:
    """Poll ``url``/healthz until it answers 200; raise RuntimeError (with ``tail()``, e.g. the process's log)
    if the process ``proc`` (a Popen) exits first or the time runs out. Used by benchmarks and tests that
    start our daemons as real processes."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become healthy at {url} in {timeout:.0f} s:\n{tail()}")
