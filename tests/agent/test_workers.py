"""``trustmesh agent --workers N`` as real processes against a real control plane:
workers share the port and each ships its own spool as a source of the one credential;
``/readyz`` and ``/metrics`` answer for all of them; a killed worker loses no decision
it answered and is restarted; SIGTERM stops every worker; a refused credential stops
the whole agent; spools an earlier run left behind are shipped."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    Agent,
    Federation,
    Process,
    Server,
    eventually,
    register_federation,
    start_agent,
    start_server,
    trustmesh_cmd,
)
from trustmesh.agent.audit import DecisionAudit
from trustmesh.agent.spool import AuditSpool
from trustmesh.common.tracing import Span
from trustmesh.sim import SimulatedCluster

WAIT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("workers") / "server")
    yield server
    assert server.stop() == 0, server.process.stderr()


@pytest.fixture
def federation(server: Server, sim_cluster: SimulatedCluster) -> Federation:
    return register_federation(server, sim_cluster)


def start_workers(fed: Federation, data_dir: Path, count: int = 2) -> Agent:
    credential = fed.server.credential(fed.target_name)
    return start_agent(
        fed.target_name, [fed.server.url], data_dir, credential, "--workers", str(count)
    )


def workers_of(agent: Agent) -> set[int]:
    pid = agent.process.proc.pid
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found |= {int(child) for child in handle.read().split()}
    return found


def logged(fed: Federation) -> list[dict[str, Any]]:
    """The control plane's audit sources of the federation's target cluster."""
    sources = fed.server.admin.get("/v1/audit/sources").json()["sources"]
    return [s for s in sources if s["cluster"] == fed.target_name]


def events_logged(fed: Federation) -> int:
    return sum(s["next_seq"] - 1 for s in logged(fed))


def decide(agent: Agent, token: str, times: int) -> None:
    """``times`` decisions, each on a new connection (so the kernel spreads them)."""
    for _ in range(times):
        answer = agent.authorize(token)
        assert answer.status_code == 200, answer.text


def test_workers_share_the_port_and_each_ships_its_own_spool(
    federation: Federation, tmp_path: Path
) -> None:
    agent = start_workers(federation, tmp_path / "agent")
    try:
        assert "(2 workers; " in agent.ready_line
        assert len(workers_of(agent)) == 2
        decide(agent, federation.svid(), 40)
        eventually(lambda: events_logged(federation) == 40, "40 events logged")
        sources = logged(federation)
        assert len(sources) == 2 and all(s["next_seq"] > 1 for s in sources)
        assert not any(s["gaps"] for s in sources)
        for spool in ("audit-spool", "audit-spool-2"):
            assert (tmp_path / "agent" / spool / "source").exists()

        # each worker answers /readyz from its siblings' snapshots, which are up to a
        # second old: a sibling's first snapshot may predate its readiness
        detail = eventually(
            lambda: (
                (d := httpx.get(agent.url + "/readyz").json())["audit"]["backlog"] == 0
                and d["ready"]
                and d
            ),
            "ready, with an empty backlog",
        )
        assert detail["ready"] is True
        assert detail["workers"] == {"expected": 2, "running": 2, "ready": 2}

        def decided() -> list[tuple[str, str]]:
            metrics = httpx.get(agent.url + "/metrics").text
            return re.findall(
                r'^trustmesh_agent_decisions_total\{outcome="deny",worker="(\d)"\} (\S+)$',
                metrics,
                re.MULTILINE,
            )

        # a sibling's snapshot is up to a second old
        counts = eventually(
            lambda: sum(float(n) for _, n in decided()) == 40 and decided(), "40 decisions counted"
        )
        assert {worker for worker, _ in counts} == {"1", "2"}
    finally:
        assert agent.stop() == 0, agent.process.stderr()


def test_a_killed_worker_loses_no_answered_decision_and_is_restarted(
    federation: Federation, tmp_path: Path
) -> None:
    agent = start_workers(federation, tmp_path / "agent")
    try:
        token = federation.svid()
        decide(agent, token, 30)
        victim = min(workers_of(agent))
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: victim not in workers_of(agent), "the killed worker gone")
        decide(agent, token, 30)  # the other worker answers meanwhile
        eventually(
            lambda: len(workers_of(agent)) == 2 and victim not in workers_of(agent),
            "a new worker started",
        )
        eventually(
            lambda: httpx.get(agent.url + "/readyz").json()["workers"]["running"] == 2,
            "two workers running",
        )
        eventually(lambda: events_logged(federation) == 60, "all 60 answered decisions logged")
        assert not any(s["gaps"] for s in logged(federation))
        assert "exited with -9" in agent.process.stderr()
    finally:
        assert agent.stop() == 0, agent.process.stderr()


def test_sigterm_stops_every_worker(federation: Federation, tmp_path: Path) -> None:
    agent = start_workers(federation, tmp_path / "agent", 3)
    workers = workers_of(agent)
    assert len(workers) == 3
    decide(agent, federation.svid(), 10)
    assert agent.stop() == 0, agent.process.stderr()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert events_logged(federation) == 10  # each worker shipped before it stopped


def test_a_refused_credential_stops_the_whole_agent(federation: Federation, tmp_path: Path) -> None:
    token_file = tmp_path / "credential"
    token_file.write_text("tmc_not_a_credential")
    token_file.chmod(0o600)
    process = Process(
        trustmesh_cmd(
            "agent",
            "--cluster",
            federation.target_name,
            "--server",
            federation.server.url,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "agent"),
            "--token-file",
            str(token_file),
            "--workers",
            "2",
        ),
        tmp_path / "agent.log",
    )
    assert process.proc.wait(WAIT) == 1
    assert "error: " in process.stderr()
    assert "restarting" not in process.stderr()


def test_spools_left_by_more_workers_are_shipped(federation: Federation, tmp_path: Path) -> None:
    """An agent that ran with three workers and is restarted with two: worker 1 ships
    what the third spool still holds."""
    data_dir = tmp_path / "agent"
    data_dir.mkdir(mode=0o700)
    spool = AuditSpool.open(data_dir / "audit-spool-3", fsync_interval=0)
    audit = DecisionAudit(spool, federation.target_name, "abc123")
    span = Span(trace_id="a" * 32, span_id="b" * 16, parent_span_id=None)
    for _ in range(3):
        audit.record(
            span, {"surface": "authorize"}, {"allowed": False, "reason": "x", "policy_revision": 1}
        )
    stranded = spool.source_id
    spool.close()
    agent = start_workers(federation, data_dir)
    try:
        eventually(
            lambda: any(s["source"].endswith("/" + stranded) for s in logged(federation)),
            "the stranded spool's source logged",
        )
        (source,) = [s for s in logged(federation) if s["source"].endswith("/" + stranded)]
        assert source["next_seq"] == 4 and not source["gaps"]
    finally:
        assert agent.stop() == 0, agent.process.stderr()
