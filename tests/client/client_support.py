"""What the SDK tests share besides fixtures: a fake clock, a switchable network and a
dead URL."""

from __future__ import annotations

import socket

import httpx


class FakeClock:
    """An injectable clock: the refresh and backoff decisions follow it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Network(httpx.BaseTransport):
    """Real HTTP, except while ``down``: then every request fails to connect."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.down = False
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.url.scheme}://{request.url.netloc.decode()}")
        if self.down:
            raise httpx.ConnectError("network is down (test)", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def dead_url() -> str:
    """A loopback URL nobody listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
