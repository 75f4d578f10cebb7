"""The anomaly detectors in a process of their own (``server/analysis.py``, ``trustmesh
server --analytics process|thread|off``; issue 15): a real server's analytics child is
found among its real children; killed (SIGKILL) mid-life, it is started again and the
new one takes the lease over from the stored cursor, every finding recorded once in the
table and in the log; SIGTERM to the server stops the child (it gives the lease up) and
leaves no process behind, with one server process and with ``--workers 2``; and with
``--analytics off`` no detector runs (the backlog metric counts what none has read)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from anomaly_support import anomalies, wait_for
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import (
    TRUST_DOMAIN,
    Server,
    child_pids,
    eventually,
    kill_leftover_children,
    register_federation,
    start_server,
)
from trustmesh.sim import SimulatedCluster

POLICY = """apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: test}
spec:
  detectors:
    refusal_burst: {warmup: 0, threshold: 3, window: 600, baselineWindow: 3600}
"""
SPAWNED = "multiprocessing.spawn"  # a spawned child's command line (not the resource tracker)


def spawned_children(server: Server) -> set[int]:
    """The server's children started by multiprocessing's spawn (its analytics child,
    and with --workers its workers)."""
    pid = server.process.proc.pid
    children: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):  # the thread that started it counts
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                children |= {int(p) for p in f.read().split()}
    found = set()
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if SPAWNED.encode() in f.read():
                found.add(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def runner_state(server: Server) -> tuple[str | None, int]:
    """The analytics lease's holder and the runner's cursor, from the SQLite file."""
    database = server.data_dir / "trustmesh.db"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        holder, cursor = conn.execute(
            "SELECT holder, cursor FROM analytics_state WHERE name = 'runner'"
        ).fetchone()
    return holder, int(cursor)


def burst(server: Server, audience: str, issuer: str) -> None:
    """Four service-account tokens claiming ``issuer`` (no cluster's), signed by an
    attacker's key: each refused at the exchange, a refusal_burst of that issuer."""
    forger = ec.generate_private_key(ec.SECP256R1())
    for _ in range(4):
        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": "system:serviceaccount:shop:payments",
            "aud": [issuer],
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        forged = jwt.encode(claims, forger, algorithm="ES256")
        assert server.exchange(forged, audience).status_code in (400, 401)


def finding_of(server: Server, issuer: str) -> list[dict[str, Any]]:
    return [a for a in anomalies(server, "refusal_burst") if a["subject"] == {"issuer": issuer}]


def logged_keys(server: Server) -> list[str]:
    answer = server.admin.get("/v1/audit/query", params={"type": "anomaly.detected"})
    assert answer.status_code == 200, answer.text
    return sorted(e["event"]["detail"]["key"] for e in answer.json()["entries"])


@pytest.mark.slow
def test_a_killed_analytics_process_is_restarted_and_reports_nothing_twice(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "cp", analytics="process")
    try:
        fed = register_federation(server, sim_cluster)
        server.apply(POLICY)
        (first,) = eventually(lambda: spawned_children(server), "the analytics child")
        one, two = f"https://forged-1.{TRUST_DOMAIN}", f"https://forged-2.{TRUST_DOMAIN}"
        burst(server, fed.audience, one)
        wait_for("the first finding", lambda: finding_of(server, one))

        os.kill(first, signal.SIGKILL)
        (second,) = eventually(
            lambda: (c := spawned_children(server)) and first not in c and c,
            "another analytics child",
        )
        assert second != first
        burst(server, fed.audience, two)
        wait_for(
            "the second finding (the new child holds the lease)", lambda: finding_of(server, two)
        )
        time.sleep(3)  # several more rounds over the same entries' neighbourhood

        found = anomalies(server, "refusal_burst")
        keys = sorted(a["key"] for a in found)
        assert keys == [f"refusal_burst:issuer:{one}", f"refusal_burst:issuer:{two}"]
        assert logged_keys(server) == keys
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'trustmesh_anomalies_total{detector="refusal_burst"} 2.0' in metrics
        stderr = server.process.stderr()
        assert f"the analytics process {first} exited with -9; starting another" in stderr
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_the_analytics_process_and_releases_its_lease(
    tmp_path: Path, workers: int
) -> None:
    expected = 1 if workers == 1 else workers + 1  # --workers 1 serves in the one process
    before = child_pids()
    server = start_server(tmp_path / "cp", None, "--workers", str(workers), analytics="process")
    try:
        children = eventually(
            lambda: len(c := spawned_children(server)) == expected and c,
            "the workers and the analytics child",
        )
        holder = eventually(lambda: runner_state(server)[0], "the analytics lease taken")
        assert isinstance(holder, str)
        code = server.process.stop(signal.SIGTERM)
        stderr = server.process.log_path.read_text()
        assert code == 0, stderr
        assert not [pid for pid in children if running(pid)]
        assert runner_state(server)[0] is None  # given up, not left to lapse
        assert "Traceback" not in stderr, stderr
    finally:
        server.stop()
    assert not kill_leftover_children(before), "the server left child processes running"


def test_analytics_off_runs_no_detectors(tmp_path: Path, sim_cluster: SimulatedCluster) -> None:
    server = start_server(tmp_path / "cp", None, "--analytics", "off")
    try:
        fed = register_federation(server, sim_cluster)
        server.apply(POLICY)
        issuer = f"https://forged-off.{TRUST_DOMAIN}"
        burst(server, fed.audience, issuer)

        def backlog() -> float:
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            (line,) = [
                x for x in metrics.splitlines() if x.startswith("trustmesh_analytics_backlog")
            ]
            return float(line.split()[1])

        # the refusals are in the log; nothing reads them: the backlog only grows
        first = eventually(lambda: backlog() >= 4 and backlog(), "the refusals in the backlog")
        time.sleep(3)  # three rounds' worth of the runner's interval
        assert backlog() >= first
        assert runner_state(server) == (None, -1)  # no runner ever took the lease
        assert anomalies(server, "refusal_burst") == []
        assert logged_keys(server) == []
        assert spawned_children(server) == set()
    finally:
        server.stop()
