"""``trustmesh agent --workers N``: N worker processes serving one port, each a whole
agent with its own audit spool, under a supervisor that restarts a worker that dies.

**Why.** One agent process decides on one core. Workers let the kernel spread the
connections over several (``SO_REUSEPORT``: each worker listens on the same address
with a socket of its own, and the kernel assigns each new connection to one of them
by its addresses); a connection stays with its worker.

**What they share, what they do not.** Every worker syncs keys, the policy bundle and
the revocation list with the control plane itself (two long polls each: a control
plane lets one credential hold ``DEFAULT_LONG_POLLS_PER_CREDENTIAL`` = 8 per replica,
hence at most :data:`MAX_WORKERS` workers) and persists them in the one data dir —
files replaced atomically, so a worker that starts or restarts restores the freshest
state any of them received and answers at once. Each worker writes its decisions to a
spool of its own (``audit-spool`` for worker 1, as a single agent; ``audit-spool-K``
for worker K) and ships it: a spool is a distinct source of the same credential
(``CLUSTER/AGENT/SPOOL``: the control plane binds any spool id an agent sends to the
credential's agent). Worker 1 (or a single agent) also ships what is left in the spools
of workers beyond ``N`` (an agent restarted with fewer workers), so nothing spooled is
stranded.

**The supervisor** (the ``trustmesh agent`` process) holds the port without listening
on it (so ``--listen HOST:0`` picks one port for all, and it stays ours while a worker
restarts), starts the workers, prints the one ready line once every worker is ready,
restarts a worker that exits (after 0.5 s, doubling to 10 s while it keeps dying
within 5 s of its start), and on SIGTERM or SIGINT stops them all (each drains as a
single agent does). A worker whose credential is refused stops the whole agent, with
that error. Workers die with the supervisor (``PR_SET_PDEATHSIG``).

**Readiness and metrics.** Each worker publishes a snapshot of its readiness and
metrics to ``DATA_DIR/workers/K.json`` every second (and on each ``/readyz`` or
``/metrics`` it answers). Whichever worker a probe reaches answers for the agent:
``/readyz`` is ready only if every worker is, with their reasons and failing syncs
together, the audit backlog summed, and ``workers`` (``expected``, ``running``,
``ready``); a worker without a snapshot newer than :data:`STALE_AFTER` seconds is
reported as not running. ``/metrics`` gives every worker's series with a ``worker``
label (``sum without (worker)`` adds them up)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from trustmesh.agent.spool import SPOOL_DIR
from trustmesh.common.clock import Clock

log = logging.getLogger("trustmesh.agent")

MAX_WORKERS = 4
STATUS_DIR = "workers"
STATUS_INTERVAL = 1.0
STALE_AFTER = 5.0
STOP_TIMEOUT = 15.0  # a worker's drain (5 s) and final audit shipping (2 s), with room
RESTART_DELAY = 0.5
RESTART_DELAY_CAP = 10.0
QUICK_DEATH = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """Worker ``index`` (1…``count``) of an agent with ``count`` workers."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count <= MAX_WORKERS:
            raise ValueError(f"worker {self.index} of {self.count}: at most {MAX_WORKERS}")

    @property
    def spool_dir(self) -> str:
        return spool_dir(self.index)


def spool_dir(index: int) -> str:
    """The spool directory of worker ``index`` (worker 1's is a single agent's)."""
    return SPOOL_DIR if index == 1 else f"{SPOOL_DIR}-{index}"


def stranded_spools(data_dir: Path, count: int) -> list[Path]:
    """Spools of workers beyond ``count`` that an earlier run left in ``data_dir``."""
    found = []
    prefix = SPOOL_DIR + "-"
    for path in data_dir.glob(prefix + "*"):
        suffix = path.name[len(prefix) :]
        if suffix.isdigit() and int(suffix) > count and path.is_dir():
            found.append(path)
    return sorted(found)


# -- the snapshots every worker publishes ---------------------------------------------


def _families(registry: CollectorRegistry) -> list[list[Any]]:
    return [
        [
            family.name,
            family.type,
            family.documentation,
            [[s.name, s.labels, s.value] for s in family.samples],
        ]
        for family in registry.collect()
    ]


class _Replayed(Collector):
    """Metric families read from workers' snapshots, each sample labelled by worker."""

    def __init__(self, snapshots: Iterable[dict[str, Any]]) -> None:
        self.snapshots = list(snapshots)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for snapshot in self.snapshots:
            worker = str(snapshot["worker"])
            for name, kind, documentation, samples in snapshot["metrics"]:
                family = merged.get(name)
                if family is None:
                    family = merged[name] = Metric(name, documentation, kind)
                for sample_name, labels, value in samples:
                    family.add_sample(sample_name, {**labels, "worker": worker}, value)
        yield from merged.values()


class WorkerStatus:
    """One worker's side: publishes its snapshot, and answers ``/readyz`` and
    ``/metrics`` for all workers from theirs."""

    def __init__(
        self,
        data_dir: Path,
        spec: WorkerSpec,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        registry: CollectorRegistry,
        clock: Clock,
    ) -> None:
        self.directory = data_dir / STATUS_DIR
        self.spec = spec
        self.readiness = readiness
        self.registry = registry
        self.clock = clock

    def _path(self, index: int) -> Path:
        return self.directory / f"{index}.json"

    def publish(self) -> dict[str, Any]:
        """Write this worker's snapshot (replaced whole: readers never see half)."""
        ready, detail = self.readiness()
        snapshot = {
            "worker": self.spec.index,
            "pid": os.getpid(),
            "at": self.clock(),
            "ready": ready,
            "detail": detail,
            "metrics": _families(self.registry),
        }
        self.directory.mkdir(mode=0o700, exist_ok=True)
        path = self._path(self.spec.index)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(snapshot, handle)  # the stdlib: keeps inf (an age never known)
        os.replace(temp, path)
        return snapshot

    async def run(self) -> None:
        """Publish every :data:`STATUS_INTERVAL` seconds."""
        while True:
            try:
                await asyncio.to_thread(self.publish)
            except Exception:  # the loop must survive anything
                log.exception("workers: cannot publish worker %d's status", self.spec.index)
            await asyncio.sleep(STATUS_INTERVAL)

    def snapshots(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(this worker's fresh snapshot, every worker's that is not stale)."""
        own = self.publish()
        found = []
        now = self.clock()
        for index in range(1, self.spec.count + 1):
            if index == self.spec.index:
                found.append(own)
                continue
            try:
                snapshot = json.loads(self._path(index).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(snapshot, dict) and now - float(snapshot.get("at", 0)) <= STALE_AFTER:
                found.append(snapshot)
        return own, found

    def merged_readiness(self) -> tuple[bool, dict[str, Any]]:
        own, found = self.snapshots()
        detail = dict(own["detail"])
        running = {int(s["worker"]) for s in found}
        ready = {int(s["worker"]) for s in found if s.get("ready")}
        reasons: list[str] = []
        failing: list[str] = []
        for snapshot in sorted(found, key=lambda s: int(s["worker"])):
            reasons += [r for r in snapshot["detail"].get("reasons", []) if r not in reasons]
            failing += [f for f in snapshot["detail"].get("failing", []) if f not in failing]
        missing = sorted(set(range(1, self.spec.count + 1)) - running)
        reasons += [f"worker {index} is not running" for index in missing]
        ages = [
            s["detail"]["audit"]["last_ship_age_seconds"]
            for s in found
            if s["detail"]["audit"]["last_ship_age_seconds"] is not None
        ]
        detail.update(
            ready=len(ready) == self.spec.count,
            reasons=reasons,
            failing=failing,
            audit={
                "backlog": sum(int(s["detail"]["audit"]["backlog"]) for s in found),
                "last_ship_age_seconds": max(ages) if ages else None,
            },
            workers={"expected": self.spec.count, "running": len(running), "ready": len(ready)},
        )
        return bool(detail["ready"]), detail

    def merged_metrics(self) -> bytes:
        _, found = self.snapshots()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Replayed(found))
        return generate_latest(registry)


# -- the supervisor ---------------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker stopped the agent: ``kind`` names the error type, ``message`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


WorkerMain = Callable[[WorkerSpec, Connection], None]
"""Runs one worker until SIGTERM; reports ``("ready", text)`` once it is ready and
``("fatal", kind, message)`` before it exits on an error that restarting cannot cure."""


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Worker:
    spec: WorkerSpec
    process: Any  # multiprocessing.process.BaseProcess
    messages: Connection
    started: float
    ready: bool = False
    said_all: bool = False  # its end of the pipe is closed
    delay: float = RESTART_DELAY
    restart_at: float | None = None


def _child(main: WorkerMain, spec: WorkerSpec, messages: Connection, reserved: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # not the supervisor's: stop, until serving
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent()
    with contextlib.suppress(OSError):
        os.close(reserved)  # the supervisor's hold on the port, not ours
    main(spec, messages)


class Supervisor:
    """Starts ``count`` workers running ``main`` and keeps them running until SIGTERM
    or SIGINT (see the module docstring). ``announce`` gets the first ready text once
    every worker is ready."""

    def __init__(
        self,
        count: int,
        main: WorkerMain,
        reserved: socket.socket,
        announce: Callable[[str], None],
    ) -> None:
        WorkerSpec(count, count)  # validates count
        self.count = count
        self.main = main
        self.reserved = reserved
        self.announce = announce
        self.context = multiprocessing.get_context("fork")
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.fatal: WorkerFailed | None = None
        self.announced = False
        self.restarts = 0

    def _start(self, index: int, delay: float = RESTART_DELAY) -> _Worker:
        receive, send = self.context.Pipe(duplex=False)
        spec = WorkerSpec(index, self.count)
        process = self.context.Process(
            target=_child,
            args=(self.main, spec, send, self.reserved.fileno()),
            name=f"trustmesh-agent-worker-{index}",
        )
        process.start()
        send.close()
        worker = _Worker(spec, process, receive, time.monotonic(), delay=delay)
        self.workers[index] = worker
        return worker

    def _stop_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> None:
        """Until stopped; raises WorkerFailed when a worker stopped the agent."""
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._stop_signal) for sig in handled}
        try:
            for index in range(1, self.count + 1):
                self._start(index)
            while not self.stopping:
                self._step(0.2)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.fatal is not None:
            raise self.fatal

    def _step(self, timeout: float) -> None:
        waiting: list[Any] = []
        for worker in self.workers.values():
            if worker.restart_at is None:
                waiting.append(worker.process.sentinel)
                if not worker.said_all:
                    waiting.append(worker.messages)
        for ready in wait(waiting, timeout):
            for worker in list(self.workers.values()):
                if ready is worker.messages:
                    self._read(worker)
                elif ready == worker.process.sentinel and worker.restart_at is None:
                    self._exited(worker)
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.restart_at is not None and now >= worker.restart_at and not self.stopping:
                self.restarts += 1
                self._start(worker.spec.index, worker.delay)

    def _read(self, worker: _Worker) -> None:
        """Every message the worker has sent so far."""
        try:
            while not worker.said_all and worker.messages.poll():
                self._message(worker, worker.messages.recv())
        except (EOFError, OSError):
            worker.said_all = True  # it closed its end: it is gone or going

    def _message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        if message[0] == "ready":
            worker.ready = True
            everyone = len(self.workers) == self.count and all(
                w.ready for w in self.workers.values()
            )
            if everyone and not self.announced:
                self.announced = True
                self.announce(str(message[1]))
        elif message[0] == "fatal":
            if self.fatal is None:
                self.fatal = WorkerFailed(str(message[1]), str(message[2]))
            self.stopping = True

    def _exited(self, worker: _Worker) -> None:
        self._read(worker)  # what it said before it went (a fatal error)
        worker.process.join()
        code = worker.process.exitcode
        worker.messages.close()
        worker.said_all = True
        if self.stopping:
            worker.restart_at = float("inf")  # gone for good
            return
        lived = time.monotonic() - worker.started
        log.error(
            "agent worker %d (pid %s) exited with %s after %.1f s; restarting it in %.1f s",
            worker.spec.index,
            worker.process.pid,
            code,
            lived,
            worker.delay,
        )
        worker.restart_at = time.monotonic() + worker.delay
        worker.delay = (
            min(RESTART_DELAY_CAP, worker.delay * 2) if lived < QUICK_DEATH else RESTART_DELAY
        )

    def _stop_all(self) -> None:
        running = [w for w in self.workers.values() if w.restart_at is None]
        for worker in running:
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in running:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("agent worker %d did not stop in time; killing it", worker.spec.index)
                worker.process.kill()
                worker.process.join()
            self._read(worker)
            worker.messages.close()
