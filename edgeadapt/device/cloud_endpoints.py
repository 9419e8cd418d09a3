"""The cloud replicas a device talks to: ``cloud_url = "https://a:8700,https://b:8700"`` (stateless replicas sharing
one store, issue 18). The uploader, the updater and the heartbeats all use the current one; a request to it that
fails on the network (connection refused or reset, timeout) moves every part of the device to the next, so a
replica that dies costs one failed request, not an outage. One URL: nothing changes."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


def parse_cloud_urls(value: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (trailing slashes dropped); ValueError when there is none or one is not
    http(s)."""
    urls = [u.strip().rstrip("/") for u in str(value).split(",") if u.strip()]
    if not urls:
        raise ValueError("cloud_url names no URL")
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ValueError(f"cloud_url must be http:// or https:// URLs, comma-separated; not {bad[0]!r}")
    if len(set(urls)) != len(urls):
        raise ValueError("cloud_url names the same URL twice")
    return urls


class CloudEndpoints:
    def __init__(self, cloud_url: str | list[str]):
        self.urls = parse_cloud_urls(cloud_url) if isinstance(cloud_url, str) else list(cloud_url)
        self._i = 0
        self._lock = threading.Lock()
        self.switches = 0
        self.last_switch: tuple[float, str, str] | None = None  # (time.time(), from, why)

    @property
    def current(self) -> str:
        return self.urls[self._i]

    def failed(self, url: str, why: str) -> bool:
        """A request to ``url`` failed on the network: move on to the next replica (if ``url`` is still the current
        one: two threads failing on the same replica switch once). -> whether it switched."""
        with self._lock:
            if len(self.urls) < 2 or url.rstrip("/") != self.urls[self._i]:
                return False
            self._i = (self._i + 1) % len(self.urls)
            self.switches += 1
            self.last_switch = (time.time(), url, why[:200])
        log.warning("cloud %s unreachable (%s): switching to %s", url, why[:200], self.current)
        return True

    def request_failed(self, exc: BaseException) -> bool:
        """``failed`` for the replica an httpx network error's request went to (threads share the endpoints, so the
        current one may have moved since the request started)."""
        try:
            target = str(exc.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # no request attached
            return False
        url = next((u for u in self.urls if target.startswith(u)), None)
        return url is not None and self.failed(url, f"{type(exc).__name__}: {exc}")

    def status(self) -> dict:
        return {"urls": list(self.urls), "current": self.current, "switches": self.switches,
                "last_switch": None if self.last_switch is None else
                {"at": self.last_switch[0], "from": self.last_switch[1], "why": self.last_switch[2]}}
