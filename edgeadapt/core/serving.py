"""A uvicorn server that shuts down gracefully on SIGTERM/SIGINT and then returns (exit status 0), instead of
re-raising the signal, so the caller can save state after ``run()``. Used by both daemons."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Generator

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
