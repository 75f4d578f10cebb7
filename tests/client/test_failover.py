"""The failover round every control-plane client shares (``common/failover.py``),
against real sockets on loopback: a connection dropped before its answer is asked once
more on the same URL, a refused one moves on at once."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from trustmesh.common.errors import Unreachable
from trustmesh.common.failover import Failover

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@contextmanager
def dropping_server(drops: int) -> Iterator[tuple[str, list[int]]]:
    """A server that closes its first ``drops`` connections as soon as a request
    arrives (what a replica killed mid-request, or a stale kept-alive connection, does),
    then answers ``ok``. Yields its URL and the count of connections it saw."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)  # so that the thread sees ``stop``
    seen = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                conn.recv(65536)
                seen[0] += 1
                if seen[0] > drops:
                    conn.sendall(ANSWER)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def refusing_url() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_connection_dropped_before_its_answer_is_asked_again_on_the_same_url() -> None:
    with dropping_server(drops=1) as (url, seen), httpx.Client() as http:
        # the only other URL refuses: without the second try the round would fail
        failover = Failover([url, refusing_url()])
        assert failover.run_sync(lambda base: http.get(base + "/x").text) == "ok"
        assert seen[0] == 2 and failover.preferred == url


def test_a_url_that_drops_every_connection_is_tried_twice_then_the_next_answers() -> None:
    with (
        dropping_server(drops=100) as (bad, seen),
        dropping_server(drops=0) as (good, _),
        httpx.Client() as http,
    ):
        failover = Failover([bad, good])
        assert failover.run_sync(lambda base: http.get(base + "/x").text) == "ok"
        assert seen[0] == 2 and failover.preferred == good


def test_a_refused_connection_is_not_retried_and_the_round_says_what_each_url_did() -> None:
    dead = [refusing_url(), refusing_url()]
    with httpx.Client() as http, pytest.raises(Unreachable) as raised:
        Failover(dead).run_sync(lambda base: http.get(base + "/x").text)
    described = str(raised.value)
    assert all(f"{url}: ConnectError" in described for url in dead)
    assert described.count("ConnectError") == 2


def test_the_async_round_asks_a_dropped_connection_again_too() -> None:
    async def main(url: str) -> str:
        async with httpx.AsyncClient() as http:

            async def get(base: str) -> str:
                return (await http.get(base + "/x")).text

            return await Failover([url]).run(get)

    with dropping_server(drops=1) as (url, seen):
        assert asyncio.run(main(url)) == "ok"
        assert seen[0] == 2
