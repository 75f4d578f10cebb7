"""Running an ASGI app on uvicorn: in the foreground for ``trustmesh server|agent``
(one ready line, clean stop on SIGTERM) or in a background thread (simulated clusters,
the demo, tests) — always behind the same bounds on what an unauthenticated peer can
make the process hold (:class:`HttpLimits`).

**The HTTP implementation is pinned**: httptools (llhttp, C), through
:class:`BoundedHttpToolsProtocol`, never uvicorn's ``auto`` choice (which depends on
what happens to be installed). Neither of uvicorn's HTTP/1.1 implementations bounds
enough on its own: with httptools nothing bounds a request head (header values and the
URL are joined piece by piece, so the CPU cost grows with the square of their size)
nor the number of header fields; h11 refuses a head only while it is incomplete and
over ``h11_max_incomplete_event_size`` (a head that arrives whole in one read passes,
whatever its field count; the answer is a text 400), and is twice as slow. With both, a connection that never completes its headers is
kept forever (``timeout_keep_alive`` only runs between requests, after a response),
and ``limit_concurrency`` accepts every connection and answers a text 503 only once a
request head is complete. So the bounds are enforced here, on httptools:

- a request head larger than ``max_header_bytes`` or with more than ``max_headers``
  fields is answered 431 and the connection closed, before the parser has buffered
  more than the bound (trailers of a chunked body too);
- a request's head must be complete within ``header_timeout`` seconds of the connection
  opening or of its previous response (408, or a silent close if nothing was sent),
  its body within ``body_timeout`` seconds of the head; an idle connection between
  requests is closed after ``keep_alive_timeout``;
- beyond ``max_connections`` open connections a new one is answered 503 (JSON,
  ``Retry-After``) to its first request and closed; beyond twice that it is closed at
  once, unanswered.

Over HTTPS (``tls``, ``common/tls.py``) the same protocol takes the TCP connection and
puts the TLS layer (asyncio's ``SSLProtocol``, what ``create_server(ssl=…)`` would put)
under itself at once, so every bound holds over TLS too: a connection counts against
``max_connections`` from its TCP accept, not from the end of its handshake; the
handshake must end within ``header_timeout`` (a peer that stalls in it is cut off,
unanswered: nothing may be written in clear into a TLS stream), and the request head
then within ``header_timeout`` as over HTTP; a closed connection waits at most
``TLS_SHUTDOWN_TIMEOUT`` for the peer's close_notify. uvicorn's own ``ssl`` options are
not used: its listener does the handshake before the protocol exists, with asyncio's
60 s handshake timeout and uncounted. Once the handshake is done the protocol is handed
the TLS transport and sees it as it sees a TCP one: the one-write responses and the
fast paths below work over HTTPS unchanged (an answer is one write into the TLS layer),
under the same bounds.

A response leaves in one ``write(2)`` where uvicorn would make two (its head, then its
body): the head is held until the body's first bytes or the end of the event loop's
iteration, whichever comes first (:class:`_HeldHead`). On loopback the second write and
its TCP segment cost the server as much as a third of an agent decision.

**Fast paths.** An app may also hand the server :class:`FastPaths`: requests they
claim (by method, path and headers) are answered by a plain function of the request
— no ASGI scope, task, messages or response cycle; the answer in one write — when it
can answer without awaiting (else it returns an awaitable, run as a task). Only what
cannot change the answer is skipped: every bound above applies as it does to any
request (a fast request is parsed by the same parser, under the same head, field,
timeout and connection bounds); a connection over capacity, a pipelined request
behind an unfinished one, ``Expect: 100-continue`` and chunked bodies take the ASGI
path. uvicorn's own work per request costs about twice the rest of its HTTP handling.

Every answer given here is JSON in the shape of ``common/errors.py``."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import http
import json
import logging
import signal
import socket
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
)

from trustmesh.common.addresses import url_for
from trustmesh.common.errors import (
    HeadersTooLarge,
    InvalidRequest,
    RequestTimeout,
    TrustmeshError,
    Unavailable,
)
from trustmesh.common.limits import DEFAULT_LIMITS, HttpLimits
from trustmesh.common.tls import ServerTls

TLS_SHUTDOWN_TIMEOUT = 2.0


class _TooManyHeaders(Exception):
    """Raised from the parser's header callback; turned into a 431 answer."""


def _answer(error: TrustmeshError) -> bytes:
    """A complete HTTP/1.1 response for ``error``, which closes the connection."""
    body = json.dumps(error.to_json()).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "cache-control": "no-store",
        "connection": "close",
        **{name.lower(): value for name, value in error.headers.items()},
    }
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def _over_capacity(limits: HttpLimits) -> Callable[..., Any]:
    error = Unavailable(
        f"this server holds its limit of {limits.max_connections} connections; retry shortly",
        headers={"Retry-After": "1"},
    )
    answer = json.dumps(error.to_json()).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                    (b"cache-control", b"no-store"),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    return app


class _HeldHead:
    """The transport as one response cycle sees it. The cycle's first write (the head of
    the response, or a ``100 Continue``) is held and sent with the next write (the body)
    as one; if no next write comes in the same event-loop iteration (a streamed body,
    an app that awaits between head and body, a client that must see its ``100
    Continue`` before it sends), the head is sent alone at the end of the iteration.
    Closing sends what is held first."""

    __slots__ = ("_first", "_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._handle: asyncio.Handle | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._handle = self._loop.call_soon(self._send_held)
            return
        held = self._held
        if held is not None:
            self._held = None
            self._handle.cancel()  # type: ignore[union-attr]
            data = held + data
        self._transport.write(data)

    def _send_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        if self._held is not None:
            self._handle.cancel()  # type: ignore[union-attr]
            self._send_held()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


log = logging.getLogger("trustmesh.http")


@dataclass(frozen=True, slots=True)
class FastRequest:
    """A request a fast path answers: the method, the path percent-decoded (as ASGI's
    ``scope["path"]``) and as it was sent, the header fields (names lowercase, in
    order), the body (None: the route answers without reading it), and the peer's
    address as the connection gives it (None: not an IP connection)."""

    method: str
    path: str
    raw_path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    client: str | None = None


@dataclass(frozen=True, slots=True)
class FastAnswer:
    """Status, header fields (``content-length`` included) and body of an answer."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


FastHandler = Callable[[FastRequest], "FastAnswer | Awaitable[FastAnswer]"]


@dataclass(frozen=True, slots=True)
class FastRoute:
    """How a fast path answers a request: ``handler``, after the whole body when
    ``read_body`` (the server holds at most ``max_header_bytes`` of unanswered body
    framing, and a declared ``Content-Length`` the route accepted), else at once."""

    handler: FastHandler
    read_body: bool


class FastPaths(Protocol):
    def route(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> FastRoute | None:
        """The route of a request, or None: the ASGI app answers it."""


class _NoEvent:
    """What uvicorn's protocol sets on a cycle's ``message_event``: nothing waits."""

    __slots__ = ()

    def set(self) -> None:
        return None


_NO_EVENT = _NoEvent()


class _FastCycle:
    """A fast request's state, in the attributes through which uvicorn's protocol (and
    the bounds here) look at a request's cycle."""

    __slots__ = (
        "body",
        "disconnected",
        "headers",
        "keep_alive",
        "message_event",
        "method",
        "more_body",
        "path",
        "raw_path",
        "response_complete",
        "response_started",
        "route",
    )

    def __init__(
        self,
        route: FastRoute,
        method: str,
        path: str,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self.route = route
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.message_event = _NO_EVENT
        self.response_started = False
        self.response_complete = False
        self.disconnected = False


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HttpLimits` enforced (see the module
    docstring). The bytes of a request head are counted before the parser sees them:
    the parser is fed at most what is left of the bound, so an oversized head costs
    at most ``max_header_bytes`` of parsing however much was sent."""

    limits: HttpLimits = DEFAULT_LIMITS
    fast: FastPaths | None = None
    tls: ServerTls | None = None
    _tcp: asyncio.Transport | None = None  # over TLS: the connection under the TLS layer

    @classmethod
    def with_limits(
        cls, limits: HttpLimits, fast: FastPaths | None = None, tls: ServerTls | None = None
    ) -> type[BoundedHttpToolsProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits, "fast": fast, "tls": tls})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.tls is not None and self._tcp is None:
            self._accept_tls(transport, self.tls)
            return  # called again, with the TLS transport, once the handshake is done
        super().connection_made(transport)
        # Bytes fed since the parser last made progress: in a head, since it began; in
        # a body, since the last body bytes or chunk header (what is left is chunk
        # framing and trailers, which the parser buffers like header fields).
        self._unproductive = 0
        self._progressed = False
        self._in_head = True
        self._head_begun = False
        self._header_count = 0
        self._refusal: TrustmeshError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fast_paths = self.fast
        open_connections = len(self.connections)
        if open_connections > 2 * self.limits.max_connections:
            transport.close()
            return
        if open_connections > self.limits.max_connections:
            self.app = _over_capacity(self.limits)
            self._fast_paths = None  # every request of this connection is answered 503
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- TLS -----------------------------------------------------------------------------
    def _accept_tls(self, tcp: asyncio.Transport, tls: ServerTls) -> None:
        """Count the TCP connection at once and start its TLS handshake, bounded by
        ``header_timeout``."""
        self._tcp = tcp
        self.transport = tcp  # what a shutdown closes while the handshake runs
        self.connections.add(self)
        if len(self.connections) > 2 * self.limits.max_connections:
            self.connections.discard(self)
            tcp.abort()
            return
        handshake: asyncio.Future[None] = self.loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        layer = asyncio.sslproto.SSLProtocol(
            self.loop,
            self,
            tls.context(),
            handshake,
            server_side=True,
            ssl_handshake_timeout=self.limits.header_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        tcp.set_protocol(layer)
        layer.connection_made(tcp)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        # The TLS layer tells the protocol nothing of a connection lost in its
        # handshake (refused, timed out, reset): forget it here.
        if handshake.cancelled() or handshake.exception() is not None:
            self.connections.discard(self)

    # -- timers --------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_head and self._head_begun:
            limit, part = self.limits.header_timeout, "headers"
        elif not self._in_head and not self.cycle.response_complete:
            limit, part = self.limits.body_timeout, "body"
        else:  # idle, or the rest of a body already answered: nothing to say
            self.transport.close()
            return
        self._refuse(RequestTimeout(f"the request {part} did not arrive within {limit:g} s"))

    def _refuse(self, error: TrustmeshError) -> None:
        """Answer ``error`` and close. The app's cycle, if its response has not begun,
        is told the peer is gone (its own answer is dropped); while a response is being
        written, or requests wait behind it, only close (an answer would land inside)."""
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if not self.pipeline and (cycle is None or not cycle.response_started):
            if cycle is not None:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(_answer(error))
        elif not self.pipeline and cycle.response_complete:
            self.transport.write(_answer(error))
        self.transport.close()

    # -- bytes in ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        bound = self.limits.max_header_bytes
        view = memoryview(data)  # the parser takes slices of it without copies
        offset = 0
        while offset < len(data) and not self.transport.is_closing():
            room = bound - self._unproductive
            piece = data if offset == 0 and len(data) <= room else view[offset : offset + room]
            offset += len(piece)
            self._progressed = False
            super().data_received(piece)  # type: ignore[arg-type]
            if self._progressed:
                self._unproductive = 0
            else:
                self._unproductive += len(piece)
            if self._unproductive >= bound and not self.transport.is_closing():
                if self._in_head:
                    self._refuse(HeadersTooLarge(f"the request head is larger than {bound} bytes"))
                else:
                    self._refuse(
                        InvalidRequest(f"chunk framing or trailers larger than {bound} bytes")
                    )

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        self._refuse(refusal or InvalidRequest("the request is not valid HTTP/1.1"))

    # -- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_begun = True
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = HeadersTooLarge(
                f"the request has more than {self.limits.max_headers} header fields"
            )
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_begun = False
        self._progressed = True
        self._arm(self.limits.body_timeout)
        cycle = self.cycle
        if self._fast_paths is not None and self._start_fast(cycle):
            return
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:  # a new request's cycle
            self.cycle.transport = _HeldHead(self.transport, self.loop)  # type: ignore[assignment]

    # -- fast paths ----------------------------------------------------------------------
    def _start_fast(self, previous: Any) -> bool:
        """Whether a fast path took the request whose head is complete."""
        if self.pipeline or (previous is not None and not previous.response_complete):
            return False  # behind an unfinished request: in order, through the pipeline
        if self.expect_100_continue or self.parser.should_upgrade():
            return False
        headers = self.headers
        if any(name == b"transfer-encoding" for name, _ in headers):
            return False  # a chunked body: the ASGI path bounds it
        try:
            raw_path = httptools.parse_url(self.url).path
            path = raw_path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return False  # uvicorn's path says what is wrong with it
        if "%" in path:
            path = urllib.parse.unquote(path)
        method = self.parser.get_method().decode("ascii")
        assert self._fast_paths is not None
        route = self._fast_paths.route(method, path, headers)
        if route is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        cycle = _FastCycle(route, method, path, raw_path, headers, keep_alive)
        self.cycle = cycle  # type: ignore[assignment]
        if not route.read_body:
            self._answer_fast(cycle, None)
        return True

    def _answer_fast(self, cycle: _FastCycle, body: bytes | None) -> None:
        cycle.response_started = True
        peer = self.client[0] if self.client else None
        request = FastRequest(cycle.method, cycle.path, cycle.raw_path, cycle.headers, body, peer)
        try:
            answer = cycle.route.handler(request)
        except Exception:
            log.exception("%s %s: the fast path failed", cycle.method, cycle.path)
            self.transport.close()
            return
        if isinstance(answer, FastAnswer):
            self._send_fast(cycle, answer)
            return
        task = self.loop.create_task(self._answer_later(cycle, answer))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_later(self, cycle: _FastCycle, answer: Awaitable[FastAnswer]) -> None:
        try:
            ready = await answer
        except Exception:
            log.exception("%s %s: the fast path failed", cycle.method, cycle.path)
            self.transport.close()
            return
        self._send_fast(cycle, ready)

    def _send_fast(self, cycle: _FastCycle, answer: FastAnswer) -> None:
        """The answer in one write, as uvicorn's cycle would have written it."""
        if cycle.disconnected or self.transport.is_closing():
            cycle.response_complete = True
            return
        parts = [STATUS_LINE[answer.status]]
        for name, value in answer.headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                log.error("%s %s: an invalid response header", cycle.method, cycle.path)
                self.transport.close()
                return
            parts += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if cycle.method != "HEAD":
            parts.append(answer.body)
        self.transport.write(b"".join(parts))
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def on_body(self, body: bytes) -> None:
        self._progressed = True
        cycle: Any = self.cycle
        if type(cycle) is _FastCycle:  # bounded by the Content-Length the route accepted
            if not cycle.response_started:
                cycle.body += body
            return
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._progressed = True

    def on_message_complete(self) -> None:
        self._in_head = True
        self._progressed = True
        cycle: Any = self.cycle
        if cycle.response_complete and not self.pipeline:
            self._arm(self.limits.header_timeout)  # answered before its body ended
        else:
            self._disarm()  # the head timer starts again once the response is complete
        if type(cycle) is _FastCycle:
            cycle.more_body = False
            if not cycle.response_started:
                self._answer_fast(cycle, bytes(cycle.body))
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        waiting = bool(self.pipeline)  # a next request whose head already arrived
        super().on_response_complete()
        if not waiting and not self.transport.is_closing() and self._timer is None:
            self._arm(self.limits.header_timeout)


def bind_socket(
    host: str, port: int, *, listen: bool = True, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), listening unless told not
    to. ``reuse_port``: ``SO_REUSEPORT``, so several processes each listen on the port
    with a socket of their own and the kernel spreads new connections over them (one
    that binds it without listening holds the port for them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets created with it; without, every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it is, with uvicorn[standard]); else the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _config(
    app: Any, limits: HttpLimits, fast: FastPaths | None = None, tls: ServerTls | None = None
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=BoundedHttpToolsProtocol.with_limits(limits, fast, tls),
        ws="none",  # no WebSocket surface: an Upgrade request is served as plain HTTP
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=limits.keep_alive_timeout,
        server_header=False,
        date_header=False,
        # The caller is the TCP peer: forwarding headers are not trusted from anyone,
        # so a caller cannot pick the address its refusals are counted under.
        proxy_headers=False,
    )


def serve_foreground(
    app: Any,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    limits: HttpLimits = DEFAULT_LIMITS,
    tls: ServerTls | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn installs the handlers and drains connections).
    ``on_ready`` gets the base URL once the socket accepts connections and startup ran.
    ``tls``: serve HTTPS with that certificate (``common/tls.py``)."""
    serve_socket(app, bind_socket(host, port), on_ready, limits=limits, tls=tls)


def serve_socket(
    app: Any,
    sock: socket.socket,
    on_ready: Callable[[str], None],
    on_stopping: Callable[[], None] | None = None,
    limits: HttpLimits = DEFAULT_LIMITS,
    fast: FastPaths | None = None,
    tls: ServerTls | None = None,
) -> None:
    """As serve_foreground, on a socket bound beforehand (so the app can know its URL);
    ``fast``: requests answered without ASGI (see the module docstring)."""
    host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(_config(app, limits, fast, tls))

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            on_ready(url_for(host, bound_port, "https" if tls else "http"))
        if on_stopping is not None:
            while not task.done() and not server.should_exit:
                await asyncio.wait({task}, timeout=0.1)
            on_stopping()  # e.g. let long polls end now instead of at the drain timeout
        await task

    # uvicorn (>= 0.29) drains, restores the handlers it found and then re-raises the
    # signal that stopped it: with the default handlers that kills the process with
    # SIGTERM (exit 143) or raises KeyboardInterrupt. Stopping on a signal is the clean,
    # normal end here, so the handlers it finds (and re-raises into) are its own
    # handle_exit, which is idempotent; signals before it takes over also stop it.
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """An ASGI app served by uvicorn on its own thread and event loop."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: HttpLimits = DEFAULT_LIMITS,
        fast: FastPaths | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self._sock = bind_socket(host, port)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.url = url_for(host, self.port, "https" if tls else "http")
        self._server = uvicorn.Server(_config(app, limits, fast, tls))
        self._thread = threading.Thread(target=self._run, name=f"serve-{self.port}", daemon=True)

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(self._server.serve(sockets=[self._sock]))

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} failed to start")
            if waited > timeout:
                raise TimeoutError(f"server on {self.url} did not start in {timeout} s")
            threading.Event().wait(0.01)
            waited += 0.01
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
