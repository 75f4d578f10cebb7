"""Decisions reach the central audit log: real control plane, real agent processes on
loopback, every surface, read back through the admin API. The agent is killed with
SIGKILL mid-traffic, the control plane is stopped mid-traffic: every answered decision
lands exactly once, numbered without holes."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Federation,
    Process,
    Server,
    register_federation,
    start_agent,
    start_server,
    trustmesh_cmd,
)
from trustmesh.sim import SimulatedCluster

HOST = "audited.internal"
POLICY = f"""
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: audited-reader}}
spec:
  rules:
  - services: [{HOST}]
    paths: [/public/**]
    methods: [GET]
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [get]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-audited}}
spec:
  role: audited-reader
  subjects: [{{claims: {{project: shop}}}}]
"""
ALLOWED = {"host": HOST, "path": "/public/a", "method": "GET"}
DENIED = {"host": HOST, "path": "/private/b", "method": "GET"}
SPOOL_SOURCE = Path("audit-spool") / "source"


# --- reading the central log ---------------------------------------------------------


def log_entries(server: Server) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    while True:
        response = server.admin.get(
            "/v1/audit/entries", params={"start": len(entries), "end": len(entries) + 1000}
        )
        assert response.status_code == 200, response.text
        page = response.json()["entries"]
        if not page:
            return entries
        entries.extend(page)


def agent_events(server: Server, source: str) -> list[dict[str, Any]]:
    return [
        e["event"]
        for e in log_entries(server)
        if e["event"]["source"].get("kind") == "agent" and e["event"]["source"]["id"] == source
    ]


def wait_for_events(
    server: Server, source: str, count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = agent_events(server, source)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def source_of(data_dir: Path) -> str:
    return (data_dir / SPOOL_SOURCE).read_text().strip()


def assert_exactly_once(events: list[dict[str, Any]], decision_ids: list[str]) -> None:
    """Every answered decision once, no duplicate, seqs 1..N without a hole."""
    seqs = [e["source"]["seq"] for e in events]
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), "seqs are not contiguous"
    logged = Counter(e["decision"].get("decision_id") for e in events)
    missing = [d for d in decision_ids if logged[d] == 0]
    doubled = [d for d, n in logged.items() if d is not None and n > 1]
    assert not missing, f"{len(missing)} answered decisions are not in the log"
    assert not doubled, f"decisions logged twice: {doubled[:5]}"


def no_gaps(server: Server, source: str) -> None:
    sources = server.admin.get("/v1/audit/sources").json()["sources"]
    mine = [s for s in sources if s["source"] == source]
    assert mine and mine[0]["gaps"] == [], mine


# --- traffic ---------------------------------------------------------------------------


class Traffic:
    """Callers on their own threads asking an agent, keeping the decision id of every
    answer they got (connection errors while the agent is down are not answers)."""

    def __init__(self, url: str, token: str, callers: int = 3) -> None:
        self.url = url
        self.token = token
        self.answered: list[str] = []
        self.errors = 0
        self.not_answered: Counter[int] = Counter()  # statuses other than 200
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        with httpx.Client(timeout=5) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {"token": self.token, "request": ALLOWED if n % 2 else DENIED}
                try:
                    response = client.post(self.url + "/v1/authorize", json=body)
                except httpx.HTTPError:
                    with self._lock:
                        self.errors += 1
                    time.sleep(0.01)
                    continue
                with self._lock:
                    if response.status_code == 200:
                        self.answered.append(response.json()["decision_id"])
                    else:
                        self.not_answered[response.status_code] += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, answers: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answered) < answers:
            assert time.monotonic() < deadline, f"only {len(self.answered)} answers"
            time.sleep(0.02)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("audit-server") / "data")
    server.apply(POLICY)
    yield server
    assert server.stop() == 0, server.process.stderr()


@pytest.fixture
def federation(server: Server, sim_cluster: SimulatedCluster) -> Federation:
    return register_federation(server, sim_cluster)


def agent_for(federation: Federation, data_dir: Path, *flags: str) -> Agent:
    server = federation.server
    if not flags:
        return start_agent(
            federation.target_name,
            [server.url],
            data_dir,
            server.credential(federation.target_name),
        )
    # as helpers.start_agent, with extra flags
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir.parent / f"{data_dir.name}.credential"
    token_file.write_text(server.credential(federation.target_name))
    args = ["agent", "--cluster", federation.target_name, "--server", server.url]
    args += ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
    args += ["--token-file", str(token_file), *flags]
    process = Process(trustmesh_cmd(*args), data_dir.parent / f"{data_dir.name}.agent.log")
    line = process.wait_line("trustmesh agent for cluster ")
    return Agent(
        process=process, url=line.split()[7], cluster=federation.target_name, ready_line=line
    )


# --- the tests ---------------------------------------------------------------------------


def test_every_surface_is_audited_once(federation: Federation, tmp_path: Path) -> None:
    server = federation.server
    agent = agent_for(federation, tmp_path / "agent")
    try:
        token = federation.svid()
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{federation.origin_name}/ns/shop/sa/payments"
        allowed = agent.authorize(token, ALLOWED).json()
        denied = agent.authorize(token, DENIED).json()
        assert allowed["allowed"] is True and denied["allowed"] is False
        assert agent.authorize("not-a-token", ALLOWED).status_code == 401
        check = httpx.get(
            agent.url + "/ext_authz/public/x",
            headers={"host": HOST, "authorization": f"Bearer {token}"},
        )
        assert check.status_code == 200
        assert (
            httpx.get(agent.url + "/ext_authz/public/x", headers={"host": HOST}).status_code == 401
        )
        review = httpx.post(
            agent.url + "/k8s/authenticate",
            json={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            },
        ).json()
        assert review["status"]["authenticated"] is True
        access = httpx.post(
            agent.url + "/k8s/authorize",
            json={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": spiffe_id,
                    "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "a"},
                },
            },
        ).json()
        assert access["status"]["allowed"] is False and "denied" not in access["status"]

        source = source_of(tmp_path / "agent")
        events = wait_for_events(server, source, 7)
        assert len(events) == 7
        assert_exactly_once(
            events,
            [
                allowed["decision_id"],
                denied["decision_id"],
                check.headers["x-trustmesh-decision-id"],
            ],
        )
        by_surface = Counter(e["request"]["surface"] for e in events)
        assert by_surface == {
            "authorize": 3,
            "ext_authz": 2,
            "tokenreview": 1,
            "subjectaccessreview": 1,
        }
        for event in events:
            assert event["type"] == "authz.decision" and event["cluster"] == federation.target_name
            assert event["source"]["agent"] and len(event["trace_id"]) == 32
            assert token not in str(event)

        first = events[0]
        assert first["actor"] == spiffe_id
        assert first["request"] == {"surface": "authorize", **ALLOWED}
        assert first["identity"] == {
            "spiffe_id": spiffe_id,
            "workload": federation.workload,
            "origin_cluster": federation.origin_name,
            "jti": first["identity"]["jti"],
            "kid": first["identity"]["kid"],
            "token_sha256": first["identity"]["token_sha256"],
        }
        decision = first["decision"]
        assert decision["allowed"] is True and decision["bindings"] == ["shop-reads-audited"]
        assert (
            decision["roles"] == ["audited-reader"]
            and decision["decision_id"] == allowed["decision_id"]
        )
        assert decision["policy_revision"] == allowed["policy_revision"]

        refused = events[2]
        assert refused["decision"]["allowed"] is False
        assert refused["decision"]["reason"] == "unauthenticated: malformed"
        assert set(refused["identity"]) == {"token_sha256"} and "actor" not in refused
        missing = events[4]
        assert missing["decision"]["reason"] == "unauthenticated: missing_token"
        assert "identity" not in missing
        assert events[5]["decision"]["allowed"] is True and events[5]["actor"] == spiffe_id
        assert events[6]["decision"]["reason"].startswith("no opinion: ")
        assert events[6]["request"]["user"] == spiffe_id and events[6]["request"]["verb"] == "list"

        checkpoint = server.admin.get("/v1/audit/checkpoint")
        assert checkpoint.status_code == 200
        assert checkpoint.headers["content-type"].startswith("text/plain")
        size = int(checkpoint.text.splitlines()[1])
        assert size >= 1
        no_gaps(server, source)

        ready = httpx.get(agent.url + "/readyz").json()["audit"]
        assert ready["source"] == source and ready["backlog"] == 0
        assert ready["acknowledged_seq"] == 7 and ready["last_ship_error"] is None
        metrics = httpx.get(agent.url + "/metrics").text
        assert "trustmesh_agent_audit_spooled_total 7.0" in metrics
        assert "trustmesh_agent_audit_shipped_total 7.0" in metrics
        assert "trustmesh_agent_audit_spool_backlog 0.0" in metrics
        assert "trustmesh_agent_audit_ship_failures_total 0.0" in metrics
    finally:
        assert agent.stop() == 0, agent.process.stderr()


def test_traceparent_is_continued_and_passed_upstream(
    federation: Federation, tmp_path: Path
) -> None:
    agent = agent_for(federation, tmp_path / "agent")
    try:
        token = federation.svid()
        trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        traceparent = f"00-{trace}-{parent}-01"
        response = httpx.post(
            agent.url + "/v1/authorize",
            json={"token": token, "request": ALLOWED},
            headers={"traceparent": traceparent},
        )
        assert response.status_code == 200
        check = httpx.get(
            agent.url + "/ext_authz/public/y",
            headers={"host": HOST, "authorization": f"Bearer {token}", "traceparent": traceparent},
        )
        assert check.status_code == 200
        upstream = check.headers["traceparent"]
        untraced = agent.authorize(token, ALLOWED)
        assert untraced.status_code == 200

        events = wait_for_events(federation.server, source_of(tmp_path / "agent"), 3)
        assert [e["trace_id"] for e in events[:2]] == [trace, trace]
        assert all(e["span_id"] != parent for e in events)
        assert events[0]["span_id"] != events[1]["span_id"]
        # the upstream's parent is the decision's span
        assert upstream == f"00-{trace}-{events[1]['span_id']}-01"
        assert events[2]["trace_id"] != trace  # no traceparent: a new trace
    finally:
        assert agent.stop() == 0, agent.process.stderr()


def test_sigterm_ships_what_is_left(federation: Federation, tmp_path: Path) -> None:
    """Stopped with events not yet fsynced, so not yet shippable (a 60 s fsync
    interval): the agent fsyncs and ships them on its way out."""
    agent = agent_for(federation, tmp_path / "agent", "--audit-fsync-interval", "60")
    token = federation.svid()
    answered = [agent.authorize(token, ALLOWED).json()["decision_id"] for _ in range(20)]
    time.sleep(0.3)
    source = source_of(tmp_path / "agent")
    assert agent_events(federation.server, source) == []
    assert httpx.get(agent.url + "/readyz").json()["audit"]["backlog"] == 20
    assert agent.stop() == 0, agent.process.stderr()
    events = agent_events(federation.server, source)
    assert len(events) == 20
    assert_exactly_once(events, answered)


def test_agent_killed_mid_traffic_loses_and_repeats_nothing(
    federation: Federation, tmp_path: Path
) -> None:
    data_dir = tmp_path / "agent"
    agent = agent_for(federation, data_dir)
    token = federation.svid()
    with Traffic(agent.url, token) as traffic:
        traffic.wait_for(300)
        agent.process.kill()  # SIGKILL, in the middle of answering
        killed_at = len(traffic.answered)
    cursor = data_dir / "audit-spool" / "cursor"
    acknowledged = int(cursor.read_text()) if cursor.exists() else 0
    assert acknowledged < killed_at  # the restarted agent has events left to ship
    restarted = agent_for(federation, data_dir)
    try:
        with Traffic(restarted.url, token) as more:
            more.wait_for(100)
        answered = traffic.answered + more.answered
        assert killed_at >= 300
        source = source_of(data_dir)
        events = wait_for_events(federation.server, source, len(answered))
        # requests in flight at the kill may have been spooled without an answer
        assert len(events) >= len(answered)
        assert_exactly_once(events, answered)
        no_gaps(federation.server, source)
    finally:
        assert restarted.stop() == 0, restarted.process.stderr()
    final = agent_events(federation.server, source)
    assert len(final) == len({e["source"]["seq"] for e in final})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_control_plane_outage_mid_traffic_delivers_everything_once(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    port = free_port()
    listen = ("--listen", f"127.0.0.1:{port}")
    server = start_server(tmp_path / "server", None, *listen)
    server.apply(POLICY)
    federation = register_federation(server, sim_cluster)
    agent = agent_for(federation, tmp_path / "agent")
    token = federation.svid()
    try:
        with Traffic(agent.url, token) as traffic:
            traffic.wait_for(200)
            assert server.stop() == 0, server.process.stderr()
            during = len(traffic.answered)
            traffic.wait_for(during + 300)  # answered from cache meanwhile
            ready = httpx.get(agent.url + "/readyz").json()["audit"]
            assert ready["backlog"] > 0
            server = start_server(tmp_path / "server", None, *listen)
            traffic.wait_for(len(traffic.answered) + 100)
        assert traffic.errors == 0 and not traffic.not_answered
        source = source_of(tmp_path / "agent")
        events = wait_for_events(server, source, len(traffic.answered), timeout=30)
        assert len(events) == len(traffic.answered)
        assert_exactly_once(events, traffic.answered)
        no_gaps(server, source)
        metrics = httpx.get(agent.url + "/metrics").text
        failures = [
            line
            for line in metrics.splitlines()
            if line.startswith("trustmesh_agent_audit_ship_failures_total")
        ]
        assert failures and float(failures[0].split()[1]) > 0
    finally:
        assert agent.stop() == 0, agent.process.stderr()
        server.stop()
