"""Connection limits and request-read deadlines for both HTTP servers (device and cloud); torch-free.

uvicorn bounds neither how many connections it holds nor how long a request may take to arrive: its only
timer (``timeout_keep_alive``) starts after a response, so a client that opens a connection and sends half a
request head holds a socket (and a file descriptor) for ever. A few hundred of those exhausted the process's
descriptors and took ``/healthz`` down (issue 22). This module adds what is missing, as subclasses of uvicorn's
two HTTP/1.1 protocols that uvicorn runs in place of its own (``uvicorn.Config(http=...)``): httptools (its
parser is C; the default when installed, issue 16: the pure-Python h11 parser was a fifth of the device's
event loop under load) and h11 (the fallback, and ``http = "h11"``). Both share one guard (``_Guard``); each
says only where its parser is:

- **Read deadlines.** A request head must arrive completely within ``header_timeout_s`` of the connection
  opening (or of its first byte, for a later request on a kept-alive connection), and its body within
  ``body_timeout_s`` of the head; otherwise the connection gets ``408`` and is closed. The deadline is not
  renewed by each byte, so a head or body dripped one byte at a time is cut off too.
- **A connection cap.** At most ``max_connections`` are open at once (never more than the descriptor limit
  allows, minus a reserve for the process's own files and the listen backlog, which asyncio may accept in one
  go before the cap sees any of them). When a new connection would exceed it, the
  connection that has waited longest *without a request being handled* (idle keep-alive first, then one still
  sending its head, then one still sending its body) is closed to make room; a connection whose request the
  app is handling is never closed. Only when every connection is busy is the new one refused with ``503``.
  So an attacker's half-open connections push out each other, not the health check.
- **A head-size limit.** A request head longer than ``max_head_bytes`` gets ``431`` and the connection is
  closed (httptools has no limit of its own; h11's is kept as a backstop above this one).
- ``raise_nofile_limit`` raises the soft ``RLIMIT_NOFILE`` to the hard limit at start (many systems default
  to a soft limit of 1024 with a far higher hard one).

TLS: asyncio completes the TLS handshake before the protocol sees a connection, so a half-done handshake is
bounded by asyncio's own handshake timeout (60 s), not by these deadlines.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: descriptors kept free for the process's own files (SQLite and its WAL, models, logs, outgoing clients)
FD_RESERVE = 96
MIN_CONNECTIONS = 16
#: h11 buffers a whole read (up to 256 KiB with uvloop) before it parses: its own limit sits this far above ours
HEAD_SLACK = 256 * 1024


@dataclass(frozen=True)
class NetLimits:
    """What both servers enforce on their connections (see the module docstring)."""

    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: int = 5
    backlog: int = 1024
    max_head_bytes: int = 16 * 1024


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one; -> (soft, hard) now in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (1 << 20, 1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - a platform that refuses
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    elif hard == resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 65536), hard))
            soft = max(soft, 65536)
        except (ValueError, OSError):  # pragma: no cover
            pass
    return int(soft), int(hard)


def fit_to_descriptors(limits: NetLimits, soft_limit: int, reserve: int = FD_RESERVE) -> tuple[int, int]:
    """(connection cap, listen backlog) that fit the descriptor limit. asyncio accepts up to ``backlog``
    connections in one go before any of them reaches the protocol (and so the cap), so cap + backlog + the
    process's own files must stay under the limit."""
    room = max(2 * MIN_CONNECTIONS, int(soft_limit) - reserve)
    backlog = max(MIN_CONNECTIONS, min(int(limits.backlog), room // 4))
    cap = max(MIN_CONNECTIONS, min(int(limits.max_connections), room - backlog))
    return cap, backlog


_RANK = {"idle": 0, "head": 1, "body": 2}


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class OneWrite:
    """The transport as a response cycle sees it: the response head is held until the body's first chunk and both
    go out in one ``writelines`` (one send per answer, not two: uvicorn writes head and body separately). Held at
    most until the loop's next turn (an app that sends its head long before its body, a HEAD answer) or until the
    cycle closes the connection; what is written before the response starts (``100 Continue``) passes at once."""

    __slots__ = ("_t", "_cycle", "_loop", "_held", "_headed")

    def __init__(self, transport: Any, cycle: Any, loop: Any) -> None:
        self._t, self._cycle, self._loop = transport, cycle, loop
        self._held: bytes | None = None
        self._headed = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._t.writelines((held, data))
        elif not self._headed and self._cycle.response_started:
            self._headed, self._held = True, data
            self._loop.call_soon(self.flush)
        else:
            self._t.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._t.is_closing():
                self._t.write(held)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _Guard:
    """The phases, deadlines, head-size limit and cap shared by both guarded protocols (module docstring). A
    protocol class mixes it in before uvicorn's own and says, in ``_parser_phase``, what its parser is doing;
    everything else is here once."""

    limits: ClassVar[NetLimits] = NetLimits()
    max_connections: ClassVar[int] = NetLimits().max_connections
    stats: ClassVar[dict[str, int]] = {}
    # what uvicorn's protocol classes define (declared for the type checker)
    transport: Any
    loop: Any
    cycle: Any
    connections: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "head"  # idle | head | body | busy
        self._since = time.monotonic()
        self._deadline: Any = None  # asyncio.TimerHandle
        self._head_bytes = 0  # bytes received for the request head now arriving

    def _parser_phase(self) -> str:
        """idle (nothing pending), head (a request head is arriving), body (its body is), busy (the app has it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- uvicorn's protocol interface
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._enter("head")
        self._enforce_cap()

    def _head_open(self) -> bool:
        """Are the bytes now arriving part of a request head (the parser is between requests or inside one)?"""
        return self._phase in ("idle", "head")

    def data_received(self, data: bytes) -> None:
        if self._head_open():
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        self._one_write()
        self._sync()
        if self._head_bytes > self.limits.max_head_bytes and self._head_open() and not self.transport.is_closing():
            self._count("head_too_large")
            self._close(431, "Request Header Fields Too Large",
                        f"the request head exceeds {self.limits.max_head_bytes} bytes")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._one_write()
        self._sync(after_response=True)

    def _cycles(self) -> list[Any]:
        """The request cycles this connection has created (the app may not have started on them yet)."""
        return [self.cycle]

    def _one_write(self) -> None:
        """Give each new cycle the one-write transport before its task first runs (the loop has not turned)."""
        for cycle in self._cycles():
            if cycle is not None and type(cycle.transport) is not OneWrite:
                cycle.transport = OneWrite(cycle.transport, cycle, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    # ---------------------------------------------------------------- phases and deadlines
    def _sync(self, after_response: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            self._cancel()
            return
        phase = self._parser_phase()
        if phase == "idle" and self._phase == "head" and not after_response:
            phase = "head"  # a fresh connection: its head deadline runs from the connection's opening
        if phase != self._phase:
            self._enter(phase)

    def _enter(self, phase: str) -> None:
        self._cancel()
        if phase != "head":
            self._head_bytes = 0
        self._phase = phase
        self._since = time.monotonic()
        timeout = {"head": self.limits.header_timeout_s, "body": self.limits.body_timeout_s}.get(phase)
        if timeout is not None:
            self._deadline = self.loop.call_later(timeout, self._expired, phase)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._phase != phase:
            return
        what = "request head" if phase == "head" else "request body"
        limit = self.limits.header_timeout_s if phase == "head" else self.limits.body_timeout_s
        self._count(f"{phase}_timeouts")
        self._close(408, "Request Timeout", f"the {what} did not arrive within {limit:g} s")

    def _close(self, status: int, reason: str, message: str) -> None:
        """Answer, unless a response has begun on this request (or none is pending: idle), and close.
        Closing makes uvicorn tell an app still reading the body that the client disconnected."""
        if self._phase == "head" or (self._phase == "body" and self.cycle is not None
                                     and not self.cycle.response_started):
            try:
                self.transport.write(_raw_response(status, reason, message))
            except Exception:  # pragma: no cover - the peer is gone
                pass
        self._cancel()
        self.transport.close()

    # ---------------------------------------------------------------- the cap
    def _enforce_cap(self) -> None:
        live = [p for p in self.connections if p.transport is not None and not p.transport.is_closing()]
        excess = len(live) - self.max_connections
        if excess <= 0:
            return
        victims = sorted((p for p in live if p is not self and isinstance(p, _Guard) and p._phase in _RANK),
                         key=lambda p: (_RANK[p._phase], p._since))
        for p in victims[:excess]:
            self._count("evicted")
            p._close(503, "Service Unavailable", "too many connections: this one waited longest")
        if excess > len(victims):
            self._count("refused")
            self._close(503, "Service Unavailable", "too many connections in use; retry later")

    @classmethod
    def _count(cls, what: str) -> None:
        cls.stats[what] = cls.stats.get(what, 0) + 1


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the guard: the fallback when httptools is not installed."""

    def _parser_phase(self) -> str:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "head" if self.conn.trailing_data[0] else "idle"
        return "body" if state is h11.SEND_BODY else "busy"


def _httptools_protocol() -> type | None:
    """The guarded httptools protocol class, or None when httptools (or uvicorn's protocol for it) is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol (the parser in C) with the guard. httptools parses as bytes arrive (h11
        waits for the app), so the parser's own position is tracked from its callbacks; a request the app is
        handling is busy whatever the client sends behind it, except the body of that same request."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._parsing = "none"  # none | head | body: where the parser is in the latest request
            super().__init__(*args, **kwargs)

        def on_message_begin(self) -> None:
            self._parsing = "head"
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._parsing, self._head_bytes = "body", 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._parsing, self._head_bytes = "none", 0
            super().on_message_complete()

        def _head_open(self) -> bool:
            return self._parsing != "body"  # also behind a busy request: httptools reads on

        def _cycles(self) -> list[Any]:
            return [self.cycle, *(c for c, _ in self.pipeline)] if self.pipeline else [self.cycle]

        def _parser_phase(self) -> str:
            if self._parsing == "body" and not self.pipeline:
                return "body"
            if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
                return "busy"
            return "head" if self._parsing == "head" else "idle"

    return GuardedHttpToolsProtocol


GuardedHttpToolsProtocol = _httptools_protocol()
#: the HTTP implementations the servers can run: ``auto`` is httptools when installed, else h11
HTTP_IMPLEMENTATIONS = ("auto", "httptools", "h11")


def protocol_base(http: str = "auto") -> type[_Guard]:
    """The guarded protocol class for ``http`` (auto | httptools | h11)."""
    if http not in HTTP_IMPLEMENTATIONS:
        raise ValueError(f"http must be one of {', '.join(HTTP_IMPLEMENTATIONS)}, not {http!r}")
    if http == "h11" or (http == "auto" and GuardedHttpToolsProtocol is None):
        return GuardedH11Protocol
    if GuardedHttpToolsProtocol is None:
        raise ValueError("http = httptools, but the httptools package is not installed (pip install httptools)")
    return GuardedHttpToolsProtocol


def guarded_protocol(limits: NetLimits, max_connections: int | None = None, http: str = "auto") -> type[_Guard]:
    """A protocol class enforcing ``limits`` (with the cap ``max_connections``, default ``limits``') on the
    ``http`` implementation."""
    cap = limits.max_connections if max_connections is None else max_connections
    base = protocol_base(http)
    return type(base.__name__, (base,), {"limits": limits, "max_connections": cap, "stats": {}})


def uvicorn_options(limits: NetLimits | None = None, raise_limit: bool = True, http: str = "auto"
                    ) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` that apply ``limits``: the guarded protocol (``http``: auto |
    httptools | h11), the backlog,
    keep-alive, head-size limit, and ``limit_concurrency`` just above the cap (uvicorn counts idle connections
    against it and answers 503 to whatever arrives past it, so it only backs up the cap, never undercuts it).
    ``raise_limit``: raise the soft descriptor limit first (the cap is then fitted to it)."""
    limits = limits or NetLimits()
    if raise_limit:
        soft, _ = raise_nofile_limit()
    else:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except ImportError:  # pragma: no cover
            soft = 1 << 20
    cap, backlog = fit_to_descriptors(limits, soft)
    if cap < limits.max_connections or backlog < limits.backlog:
        log.warning("connection cap %d -> %d, listen backlog %d -> %d to fit the open-file limit (%d)",
                    limits.max_connections, cap, limits.backlog, backlog, soft)
    # h11's own limit is a backstop (its buffer can hold a body too): the guard answers an oversized head first
    return {"http": guarded_protocol(limits, cap, http), "backlog": backlog,
            "timeout_keep_alive": limits.keep_alive_s,
            "h11_max_incomplete_event_size": limits.max_head_bytes + HEAD_SLACK,
            "limit_concurrency": cap + 8}
