"""``trustmesh server --workers N``: N control-plane processes serving one port.

One Python process spends a core on the exchange path (HTTP, the two signatures, the
audit event) and no more; N processes use N. Each worker is a full replica in the
sense of ``server/snapshots.py``: its own snapshots, refreshed from the database every
second, its own audit recorder (its own audit source) and group commit. The audit log
keeps one sequencer at a time, as replicas on PostgreSQL always have: every append
takes the sequencer's lock (PostgreSQL's advisory lock; on SQLite a lock file beside
the database, taken before SQLite's own write lock, so workers queue on it in the
kernel rather than retrying SQLite's busy handler), catches up with what the others
appended, and only then gives indices. A token still leaves only after the commit that
holds its event.

The supervising process (this module) does the first-time set-up once (migrations,
keys, the admin credential), holds the port (bound with ``SO_REUSEPORT``, never
listening, so the kernel hands connections only to the workers, which bind it too),
starts the workers, prints the one ready line when all are ready, restarts a worker
that dies, and on SIGTERM or SIGINT stops them all (each drains its connections) and
exits 0. With ``--analytics process`` (the default) it also starts the one analytics
child (``server/analysis.py``): the workers only serve; with ``--analytics thread``
every worker runs the runner as a loop of its own (the lease keeps one active).

What is per worker, as it is per replica: ``/metrics`` (the worker that answers the
scrape), the refusal-folding windows, the long-poll limits, the SA-token cache, the TLS
certificate (``--tls-cert``/``--tls-key``: each worker loads the files and reloads
them when they change, as one server does; the supervisor loads them once first so a
bad pair fails before any worker starts); a
change made through one worker reaches the others within a second."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from trustmesh.common.addresses import parse_listen, url_for
from trustmesh.common.errors import ConfigError
from trustmesh.common.limits import HttpLimits
from trustmesh.common.tls import ServerTls
from trustmesh.server.analysis import AnalyticsProcess, stop_with_supervisor
from trustmesh.server.controlplane import ControlPlane, ServerConfig

log = logging.getLogger("trustmesh.server")

READY_TIMEOUT = 60.0  # seconds a worker has to open its state and start serving
RESTART_PAUSE = 1.0  # seconds between restarts of workers that keep dying


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``: every worker binds one
    and the kernel spreads new connections over those that listen."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("--workers needs SO_REUSEPORT (Linux, BSD, macOS)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets created with it (common/serving.py, bind_socket).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_main(
    config: ServerConfig,
    issuer: str,
    host: str,
    port: int,
    limits: HttpLimits,
    tls_files: tuple[Path, Path] | None,
    ready: Connection,
) -> None:
    """One worker: bind the shared port, load the TLS certificate (``tls_files``: the
    certificate and key files; each worker loads and reloads them itself), open the
    state, serve until SIGTERM."""
    from trustmesh.common.serving import serve_socket
    from trustmesh.common.tls import server_tls
    from trustmesh.server.app import build_app

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop_with_supervisor(os.getppid())
    tls = server_tls(*tls_files) if tls_files is not None else None
    sock = reuseport_socket(host, port)
    sock.listen(1024)
    plane = ControlPlane(config, issuer)
    plane.open()
    serve_socket(
        build_app(plane),
        sock,
        lambda url: ready.send("ready"),
        plane.snapshots.begin_stopping,
        limits,
        tls=tls,
    )


class Supervisor:
    """Starts, watches and stops the workers (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        issuer: str,
        host: str,
        port: int,
        limits: HttpLimits,
        tls: ServerTls | None = None,
    ) -> None:
        tls_files = (tls.cert, tls.key) if tls is not None else None
        self.args = (config, issuer, host, port, limits, tls_files)
        self.context = multiprocessing.get_context("spawn")  # no state crosses a fork
        self.workers: list[BaseProcess] = []
        self.stopping = False
        self.restarts = 0

    def start_worker(self) -> BaseProcess:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main, args=(*self.args, send), name="trustmesh-server-worker"
        )
        process.start()
        send.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while not receive.poll(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                process.kill()
                process.join()
                raise ConfigError(
                    f"a server worker did not start (exit code {process.exitcode}); "
                    "see its error above"
                )
        receive.recv()
        receive.close()
        return process

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def supervise(self) -> None:
        """Restart workers that die until asked to stop, then stop them all."""
        while not self.stopping:
            wait([w.sentinel for w in self.workers], timeout=0.2)
            for i, worker in enumerate(self.workers):
                if worker.is_alive() or self.stopping:
                    continue
                log.warning(
                    "server worker %s exited with %s; starting another", worker.pid, worker.exitcode
                )
                worker.join()
                if self.restarts:
                    time.sleep(RESTART_PAUSE)
                self.restarts += 1
                try:
                    self.workers[i] = self.start_worker()
                except ConfigError as exc:
                    log.error("%s", exc)
        for worker in self.workers:
            if worker.is_alive() and worker.pid is not None:
                worker.terminate()  # SIGTERM: uvicorn drains, the recorder writes what it holds
        for worker in self.workers:
            worker.join(15)
            if worker.is_alive():
                worker.kill()
                worker.join()


def run_workers(
    config: ServerConfig,
    listen: str,
    limits: HttpLimits,
    workers: int,
    tls: ServerTls | None = None,
) -> None:
    """``trustmesh server --workers N`` (N >= 2); see the module docstring. ``tls``: the
    certificate loaded here once (so a bad pair is one error before any worker starts);
    every worker loads the same files again and watches them itself."""
    host, port = parse_listen(listen)
    holder = reuseport_socket(host, port)  # holds the port, never listens
    port = holder.getsockname()[1]
    scheme = "https" if tls else "http"
    issuer = config.issuer or url_for(host, port, scheme)
    plane = ControlPlane(config, issuer)  # the first-time set-up, once, before any worker
    plane.open()
    created = plane.admin_token_created
    dialect, trust_domain = plane.db.dialect, plane.trust_domain
    plane.db.dispose()

    supervisor = Supervisor(config, plane.issuer, host, port, limits, tls)
    analytics = AnalyticsProcess(config, plane.issuer) if config.analytics == "process" else None
    previous = {sig: signal.signal(sig, supervisor.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(workers):
            supervisor.workers.append(supervisor.start_worker())
        if analytics is not None:
            analytics.start()
        note = f"; admin credential written to {config.data_dir / 'admin.token'}" if created else ""
        print(
            f"trustmesh server listening on {url_for(host, port, scheme)} (issuer {plane.issuer}, trust "
            f"domain spiffe://{trust_domain}, {dialect}, {workers} workers){note}",
            flush=True,
        )
        supervisor.supervise()
    finally:
        supervisor.stopping = True
        for worker in supervisor.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in supervisor.workers:
            worker.join(15)
        if analytics is not None:
            analytics.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
        sys.stdout.flush()
