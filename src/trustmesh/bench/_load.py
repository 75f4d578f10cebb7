"""A lean closed-loop HTTP/1.1 load generator on raw asyncio streams.

``concurrency`` keep-alive connections each send one pre-built request, read the status
line, the headers and exactly ``Content-Length`` bytes of body, and send the next: no
HTTP library, no per-request allocation beyond the response bytes, so the client costs
a small fraction of what the server spends on each request (the CPU time of both sides
is reported to show it). Runs on uvloop when it is installed.

Each request's latency is ``perf_counter_ns`` from just before the write to just after
the last body byte, queueing in the server included. Throughput counts the responses
completed inside the measurement window, which opens after the warm-up and is closed by
the clock, not by a request count."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["LoadResult", "Malformed", "request_bytes", "round_trip", "run_async", "run_load"]

_T = TypeVar("_T")

_HEADER_END = b"\r\n\r\n"
_MAX_HEADER = 64 * 1024


@dataclass
class LoadResult:
    latencies_ns: list[int]
    window_ns: int
    statuses: dict[int, int]
    non_200: int
    connection_errors: int
    warmup_requests: int
    client_cpu_s: float
    server_cpu_s: float | None
    first_error: str | None
    answered_200: int = 0  # 200 answers read in every phase: warm-up, window, drain

    @property
    def requests(self) -> int:
        return len(self.latencies_ns)

    @property
    def per_s(self) -> float:
        return self.requests / (self.window_ns / 1e9) if self.window_ns > 0 else 0.0


@dataclass
class _State:
    measuring: bool = False
    stopping: bool = False
    warm: int = 0
    latencies: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    non_200: int = 0
    connection_errors: int = 0
    first_error: str | None = None
    answered_200: int = 0


class Malformed(Exception):
    """A response this client does not read: not HTTP/1.1, or no Content-Length."""


def request_bytes(method: str, target: str, headers: Mapping[str, str], body: bytes = b"") -> bytes:
    """One HTTP/1.1 request, built once before the load: ``headers`` in their order,
    then ``Content-Length``."""
    head = f"{method} {target} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """Send one request, read one response -> (status, body, server closes)."""
    writer.write(request)
    head = await reader.readuntil(_HEADER_END)
    if not head.startswith(b"HTTP/1.1 ") or len(head) < 12:
        raise Malformed(f"unexpected status line {head[:40]!r}")
    status = int(head[9:12])
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        raise Malformed("response without Content-Length")
    end = lowered.index(b"\r\n", at + 2)
    length = int(lowered[at + 17 : end])
    body = await reader.readexactly(length) if length else b""
    return status, body, b"\r\nconnection: close\r\n" in lowered


async def _worker(host: str, port: int, next_request: Callable[[], bytes], state: _State) -> None:
    clock = time.perf_counter_ns
    latencies = state.latencies
    statuses = state.statuses
    reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEADER)
    try:
        while not state.stopping:
            request = next_request()
            started = clock()
            try:
                status, body, closing = await round_trip(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                state.connection_errors += 1
                if state.first_error is None:
                    state.first_error = f"connection: {exc!r}"[:300]
                writer.close()
                if state.stopping:
                    return
                await asyncio.sleep(0.01)
                reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEADER)
                continue
            elapsed = clock() - started
            if status == 200:
                state.answered_200 += 1
            if state.measuring:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
            else:
                state.warm += 1
            if status != 200:
                state.non_200 += 1
                if state.first_error is None:
                    state.first_error = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            if closing:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEADER)
    finally:
        writer.close()


async def _drive(
    host: str,
    port: int,
    requests: Sequence[bytes],
    seconds: float,
    concurrency: int,
    warmup: int,
    server_cpu: Callable[[], float | None],
) -> LoadResult:
    state = _State()
    pool = itertools.cycle(requests)
    next_request = pool.__next__  # one shared cycle: consecutive requests differ
    tasks = [
        asyncio.create_task(_worker(host, port, next_request, state)) for _ in range(concurrency)
    ]
    try:
        deadline = time.monotonic() + max(30.0, 10 * seconds)
        while state.warm < warmup:
            if any(task.done() for task in tasks):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"warm-up did not finish ({state.warm}/{warmup} requests)")
            await asyncio.sleep(0.005)
        for task in tasks:
            if task.done():
                task.result()  # a worker that could not connect: raise its error
        cpu_before, server_before = time.process_time(), server_cpu()
        started = time.perf_counter_ns()
        state.measuring = True
        await asyncio.sleep(seconds)
        state.measuring = False
        window = time.perf_counter_ns() - started
        cpu_after, server_after = time.process_time(), server_cpu()
        state.stopping = True
        await asyncio.gather(*tasks)
    finally:
        state.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    server_cpu_s = (
        None if server_before is None or server_after is None else server_after - server_before
    )
    return LoadResult(
        latencies_ns=state.latencies,
        window_ns=window,
        statuses=dict(sorted(state.statuses.items())),
        non_200=state.non_200,
        connection_errors=state.connection_errors,
        warmup_requests=state.warm,
        client_cpu_s=cpu_after - cpu_before,
        server_cpu_s=server_cpu_s,
        first_error=state.first_error,
        answered_200=state.answered_200,
    )


def run_async(coro: Coroutine[Any, Any, _T]) -> tuple[_T, str]:
    """Run ``coro`` on uvloop when it is installed (more requests per second from one
    process), else on asyncio -> (its result, the event loop used)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    result: _T = uvloop.run(coro)
    return result, "uvloop"


def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    seconds: float,
    concurrency: int,
    warmup: int,
    server_cpu: Callable[[], float | None] = lambda: None,
) -> tuple[LoadResult, str]:
    """Keep ``concurrency`` connections busy with ``requests`` (cycled) for ``seconds``
    after ``warmup`` untimed requests. ``server_cpu`` is sampled at the edges of the
    window. -> (result, event loop used)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    if not requests:
        raise ValueError("no requests to send")
    return run_async(_drive(host, port, requests, seconds, concurrency, warmup, server_cpu))
