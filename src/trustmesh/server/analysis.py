"""The analytics process: the anomaly detectors beside ``trustmesh server``, in a child
process of their own (``--analytics process``, the default; DESIGN §11).

**Why a process.** The runner's work (the JSON of each leaf, the detectors, the commit
of findings and snapshots) is CPU work; in the serving process it shares one
interpreter lock with the audit sequencer and slows ingestion (issue 15, "Measure").
In a process of its own it competes only for cores.

**What the child is.** A replica that only analyses: it opens the same ``ServerConfig``
as a ``ControlPlane`` (the database, the master key, its own replica id and audit
source, its snapshots refreshed every ``refresh_interval`` so an AnomalyPolicy change or
a suspension reaches it, the Suspender for quarantine, the push outbox) and runs only
the snapshots' refresh and the runner's rounds (``ControlPlane.analyse``). The serving
process's push sender drains the deliveries it enqueues. The lease in the database
keeps one runner per deployment, so N servers on PostgreSQL each start a child and one
of them runs.

**Supervision** (:class:`AnalyticsProcess`, a thread of the serving process, or of the
``--workers`` supervisor): the child is started once the parent has opened (and so
migrated) the database; a child that dies is started again after a pause that doubles
up to ``MAX_BACKOFF`` (and starts over once a child ran ``STEADY`` seconds); one that
fails to open says why in one line. On stop the child gets SIGTERM: it ends its round,
gives the lease up (another replica need not wait it out) and exits; one that does not
within ``STOP_TIMEOUT`` is killed. A child whose parent is gone (killed) stops itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from trustmesh.server.controlplane import ControlPlane, ServerConfig

log = logging.getLogger("trustmesh.server")

READY_TIMEOUT = 60.0  # seconds a child has to open its state
FIRST_BACKOFF = 1.0  # seconds before the first restart of a child that died
MAX_BACKOFF = 30.0  # the longest pause between restarts
STEADY = 60.0  # a child that ran this long was healthy: the next restart is prompt again
STOP_TIMEOUT = 15.0  # seconds a child has to release its lease and exit on SIGTERM
POLL = 0.2  # seconds between the supervising thread's looks


def stop_with_supervisor(supervisor: int) -> None:
    """A child whose supervisor is gone (killed: it could not stop its children) stops
    itself, as on SIGTERM, rather than run on unsupervised."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _analytics_main(config: ServerConfig, issuer: str, ready: Connection) -> None:
    """The child: open the state, say ``ready`` (or why not), analyse until SIGTERM."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop_with_supervisor(os.getppid())
    # SIGINT (a terminal's ^C reaches the whole group) waits for the parent's SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    plane = ControlPlane(config, issuer)
    try:
        plane.open()
    except Exception as exc:
        ready.send(f"cannot open the control plane's state: {_one_line(exc)}")
        sys.exit(1)
    asyncio.run(_analyse(plane, ready))


async def _analyse(plane: ControlPlane, ready: Connection) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    ready.send("ready")
    ready.close()
    await plane.analyse(stopping)


class AnalyticsProcess:
    """Starts, watches, restarts and stops the analytics child (module docstring)."""

    def __init__(self, config: ServerConfig, issuer: str) -> None:
        self.config = config
        self.issuer = issuer
        self.context = multiprocessing.get_context("spawn")  # no state crosses a fork
        self.process: BaseProcess | None = None
        self.starts = 0  # children started (the first one and each restart)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the child and the thread that supervises it; returns at once."""
        self._thread = threading.Thread(
            target=self._supervise, name="analytics-supervisor", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM to the child, wait for it (the lease released), stop supervising."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT + READY_TIMEOUT)

    # -- the supervising thread ---------------------------------------------------------
    def _supervise(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stopping.is_set():
            started = time.monotonic()
            process = self._run_child()
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= STEADY:
                backoff = FIRST_BACKOFF
            log.warning(
                "the analytics process %s exited with %s; starting another in %.0f s",
                process.pid, process.exitcode, backoff,
            )  # fmt: skip
            self._stopping.wait(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    def _run_child(self) -> BaseProcess:
        """One child, from its start until it exits or we stop (then it is stopped)."""
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_analytics_main,
            args=(self.config, self.issuer, send),
            name="trustmesh-analytics",
        )
        process.start()
        send.close()
        self.process = process
        self.starts += 1
        try:
            self._await_ready(process, receive)
            while process.is_alive() and not self._stopping.is_set():
                wait([process.sentinel], timeout=POLL)
        finally:
            receive.close()
            if process.is_alive():
                process.terminate()  # SIGTERM: the round ends, the lease is released
                process.join(STOP_TIMEOUT)
            if process.is_alive():
                log.error("the analytics process %s did not stop; killing it", process.pid)
                process.kill()
            process.join()
        return process

    def _await_ready(self, process: BaseProcess, receive: Connection) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._stopping.is_set():
            if receive.poll(POLL):
                try:
                    said = receive.recv()
                except EOFError:
                    said = None
                if said == "ready":
                    return
                process.join(STOP_TIMEOUT)
                reason = said if isinstance(said, str) else f"exit code {process.exitcode}"
                log.error("the analytics process did not start: %s", reason)
                return
            if not process.is_alive():
                log.error(
                    "the analytics process did not start (exit code %s); see its error above",
                    process.exitcode,
                )
                return
            if time.monotonic() > deadline:
                log.error(
                    "the analytics process did not start within %.0f s; stopping it",
                    READY_TIMEOUT,
                )
                with contextlib.suppress(OSError):
                    process.kill()
                return
