"""Running an ASGI app on uvicorn: in the foreground for ``trustmesh server|agent``
(one ready line, clean stop on SIGTERM) or in a background thread (simulated clusters,
the demo, tests)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from trustmesh.common.addresses import url_for


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets created with it; without, every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
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


def _config(app: Any, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        date_header=False,
        **kwargs,
    )


def serve_foreground(app: Any, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn installs the handlers and drains connections).
    ``on_ready`` gets the base URL once the socket accepts connections and startup ran."""
    serve_socket(app, bind_socket(host, port), on_ready)


def serve_socket(
    app: Any,
    sock: socket.socket,
    on_ready: Callable[[str], None],
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """As serve_foreground, on a socket bound beforehand (so the app can know its URL)."""
    host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(_config(app))

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            on_ready(url_for(host, bound_port))
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

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = bind_socket(host, port)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.url = url_for(host, self.port)
        self._server = uvicorn.Server(_config(app))
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
