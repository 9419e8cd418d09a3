"""The connection guard (core/netguard.py) on both HTTP implementations uvicorn runs here, httptools and h11:
the head-size limit, no false limit on a body that arrives with its head, a busy request never cut off by the
guard, pipelined and kept-alive requests answered in order, and the choice of implementation itself.

A real uvicorn server on loopback (its own thread), raw sockets as the clients; a tiny ASGI app whose
``/slow`` route holds its answer for longer than the head deadline."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from edgeadapt.core import netguard
from edgeadapt.core.netguard import NetLimits, guarded_protocol, uvicorn_options

pytestmark = pytest.mark.timeout(60)

HTTP = ["httptools", "h11"]
LIMITS = NetLimits(max_connections=16, header_timeout_s=0.6, body_timeout_s=0.8, max_head_bytes=4096)


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(LIMITS.header_timeout_s * 2)
    out = b"%s %d" % (scope["path"].encode(), len(body))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(out))]})
    await send({"type": "http.response.body", "body": out})


class Server:
    def __init__(self, http: str):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        opts = uvicorn_options(LIMITS, raise_limit=False, http=http)
        self.protocol = opts["http"]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False, lifespan="off",
                                                    **opts))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


def read_until_closed(s: socket.socket, wait_s: float = 5.0) -> bytes:
    s.settimeout(wait_s)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return got


def read_answers(s: socket.socket, n: int, wait_s: float = 5.0) -> list[bytes]:
    """``n`` complete responses (each with a content-length) from a kept-alive connection -> their bodies."""
    s.settimeout(wait_s)
    buf, bodies = b"", []
    while len(bodies) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed after {len(bodies)} of {n} answers: {buf[:200]!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        while len(buf) < length:
            buf += s.recv(65536)
        bodies.append(buf[:length])
        buf = buf[length:]
    return bodies


@pytest.mark.parametrize("http", HTTP)
def test_the_implementation_is_the_one_asked_for(http):
    base = netguard.protocol_base(http)
    assert base.__name__ == ("GuardedHttpToolsProtocol" if http == "httptools" else "GuardedH11Protocol")
    assert issubclass(guarded_protocol(LIMITS, http=http), base)
    assert netguard.protocol_base("auto") is netguard.GuardedHttpToolsProtocol  # installed here: the default
    with pytest.raises(ValueError, match="http must be one of"):
        netguard.protocol_base("h2")


@pytest.mark.parametrize("http", HTTP)
def test_a_head_over_the_limit_gets_431_and_the_server_serves_on(http):
    with Server(http) as srv:
        s = srv.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(5):  # 5 x 1000 bytes, in pieces the server reads one by one: the count runs across reads
            s.sendall(b"X-Pad: " + b"a" * 991 + b"\r\n")  # (the 5th crosses 4096: nothing is sent after it)
            time.sleep(0.05)
        got = read_until_closed(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 431"), got[:200]
        assert srv.protocol.stats.get("head_too_large") == 1
        # in one read too
        s = srv.connect()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 8000)
        got = read_until_closed(s)
        s.close()
        assert got.startswith(b"HTTP/1.1 431"), got[:200]
        s = srv.connect()
        s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(s, 1) == [b"/after 0"]
        s.close()


@pytest.mark.parametrize("http", HTTP)
def test_a_body_larger_than_the_head_limit_is_not_taken_for_a_head(http):
    """A POST whose head and 200 KiB body arrive together (one write): the head limit counts head bytes only."""
    with Server(http) as srv:
        s = srv.connect()
        body = b"z" * (200 * 1024)
        req = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        s.sendall(req + req)  # and a second one right behind it (pipelined)
        assert read_answers(s, 2) == [b"/up %d" % len(body)] * 2
        s.close()
        assert not srv.protocol.stats.get("head_too_large")


@pytest.mark.parametrize("http", HTTP)
def test_a_busy_request_outlives_the_head_deadline_and_pipelined_ones_follow_in_order(http):
    """The app holds /slow for twice the head deadline: the guard must not cut it off (a request the app is
    handling is never closed), and requests pipelined behind it are answered after it, in order."""
    with Server(http) as srv:
        s = srv.connect()
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert read_answers(s, 3) == [b"/slow 0", b"/a 0", b"/b 3"]
        # kept alive: a later request on the same connection, after a pause shorter than keep-alive
        time.sleep(0.2)
        s.sendall(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(s, 1) == [b"/later 0"]
        s.close()
        assert not srv.protocol.stats.get("head_timeouts")


@pytest.mark.parametrize("http", HTTP)
def test_a_partial_head_behind_a_busy_request_gets_its_own_deadline(http):
    """Half a head pipelined behind /slow: /slow is answered; the half head then runs out of time (408)."""
    with Server(http) as srv:
        s = srv.connect()
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        got = read_until_closed(s, 10)
        s.close()
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        assert b"HTTP/1.1 408" in got, got[-300:]
        # /slow took 2x the head deadline; the half head's deadline then ran from /slow's answer
        assert time.monotonic() - t0 < LIMITS.header_timeout_s * 2 + LIMITS.header_timeout_s + 2


def _read_head(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(1)  # byte by byte: nothing past the head is consumed
        assert chunk, f"closed: {buf!r}"
        buf += chunk
    return buf


@pytest.mark.parametrize("http", HTTP)
def test_head_answers_and_100_continue_are_not_held_back(http):
    """The response head is held for its body (one write per answer, core/netguard.py OneWrite): a HEAD answer,
    which has no body, still arrives, and so does ``100 Continue``, written before the response starts."""
    with Server(http) as srv:
        s = srv.connect()
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        head = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 4" in head.lower(), head
        s.sendall(b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert _read_head(s).startswith(b"HTTP/1.1 100"), "no 100 Continue before the body was sent"
        s.sendall(b"abc")
        assert read_answers(s, 1) == [b"/c 3"]
        s.close()
