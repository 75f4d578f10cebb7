"""A response leaves in one write where it can (``common/serving.py``: the head waits
for the body's first bytes, at most until the end of the event loop's iteration) — and
nothing that needs the head first waits for a body: a streamed response, a ``100
Continue``, a response abandoned after its head. Real sockets, the bounded server."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from trustmesh.common.serving import BackgroundServer

release = threading.Event()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
    if scope["path"] == "/later":  # the body only once the test says so
        await send(start)
        await asyncio.to_thread(release.wait, 10)
        await send({"type": "http.response.body", "body": b"done"})
    elif scope["path"] == "/echo":  # reads the body first
        message = await receive()
        await send(start)
        await send({"type": "http.response.body", "body": message["body"][:4]})
    elif scope["path"] == "/broken":  # a head, then the app fails
        await send({**start, "headers": [(b"content-length", b"100")]})
        raise RuntimeError("the app fails after its head")
    else:
        await send(start)
        await send({"type": "http.response.body", "body": b"fine"})


@pytest.fixture
def served() -> Iterator[BackgroundServer]:
    release.clear()
    with BackgroundServer(app) as server:
        yield server
    release.set()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def connect(served: BackgroundServer) -> socket.socket:
    return socket.create_connection((served.host, served.port), timeout=10)


def test_a_response_arrives_whole_and_the_connection_is_kept(served: BackgroundServer) -> None:
    with connect(served) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = read_until(sock, b"fine")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nfine")


def test_the_head_of_a_later_body_is_not_held_back(served: BackgroundServer) -> None:
    with connect(served) as sock:
        sock.sendall(b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n")
        head = read_until(sock, b"\r\n\r\n")  # arrives while the app still waits
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"done" not in head
        release.set()
        assert read_until(sock, b"done").endswith(b"done")


def test_100_continue_reaches_the_client_before_it_sends_the_body(
    served: BackgroundServer,
) -> None:
    with connect(served) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert read_until(sock, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ping")
        answer = read_until(sock, b"ping")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ping")


def test_a_head_abandoned_by_the_app_is_sent_before_the_close(served: BackgroundServer) -> None:
    with connect(served) as sock:
        sock.sendall(b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\n")
        received = read_until(sock, b"never")  # until the server closes
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 100" in received
