"""Progress that is visible wherever the output goes: rich's live bar in a terminal, and a plain line every few
seconds when stderr is a file, a pipe or CI (a live bar there shows nothing until the end)."""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_EVERY_S = 5.0


class PlainProgress:
    """The slice of ``rich.progress.Progress``'s API our long steps use, printing plain lines."""

    def __init__(self, label: str, fmt: str = "", every_s: float = PLAIN_EVERY_S, stream=None):
        self.label, self.fmt, self.every_s = label, fmt, every_s
        self.stream = stream or sys.stderr
        self._tasks: dict[int, dict[str, Any]] = {}
        self._last = 0.0
        self._t0 = time.monotonic()

    def __enter__(self) -> PlainProgress:
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._print(final=True)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        tid = len(self._tasks)
        self._tasks[tid] = {"total": total, "completed": 0.0, **fields}
        self._print()
        return tid

    def update(self, tid: int, advance: float = 0, **fields: Any) -> None:
        task = self._tasks[tid]
        task["completed"] += advance
        task.update({k: v for k, v in fields.items() if k not in ("total", "completed")})
        if time.monotonic() - self._last >= self.every_s:
            self._print()

    def advance(self, tid: int, advance: float = 1) -> None:
        self.update(tid, advance=advance)

    def _print(self, final: bool = False) -> None:
        self._last = time.monotonic()
        for task in self._tasks.values():
            total, done = task["total"], task["completed"]
            frac = f" ({done / total:.0%})" if total else ""
            extra = ""
            if self.fmt:
                try:
                    extra = " " + self.fmt.format(**task)
                except (KeyError, ValueError, IndexError):
                    extra = ""
            end = " done" if final else ""
            print(f"[{self.label}] {int(done)}/{int(total) if total else '?'}{frac} "
                  f"{time.monotonic() - self._t0:.0f}s{extra}{end}", file=self.stream, flush=True)


def progress(label: str, *columns: Any, fmt: str = "", disable: bool = False):
    """A progress display for a long step: rich columns on a terminal, else plain lines (``fmt`` formats the
    task's fields, e.g. ``"loss {loss:.3f}"``). ``disable``: nothing at all."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if disable or console.is_terminal:
        return Progress(*columns, console=console, disable=disable, transient=False)
    return PlainProgress(label, fmt)
