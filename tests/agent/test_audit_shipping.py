"""Decisions reach the central audit log: real control plane, real agent processes on
loopback, every surface, read back through the admin API. The agent is killed with
SIGKILL mid-traffic, the control plane is stopped mid-traffic: every answered decision
lands exactly once, numbered without holes. Another cluster's credential cannot write
into, or squat, an agent's audit source (issue 10, finding 1)."""

from __future__ import annotations

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
    cluster_yaml,
    eventually,
    free_port,
    log_entries,
    register_federation,
    start_agent,
    start_server,
    trustmesh_cmd,
    unique,
)
from trustmesh.audit import events as ev
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


def of_spool(source_id: str, spool: str) -> bool:
    """Whether a source in the log (``CLUSTER/AGENT/SPOOL``) is this spool's."""
    return source_id.rsplit("/", 1)[-1] == spool


def agent_events(server: Server, spool: str, cluster: str | None = None) -> list[dict[str, Any]]:
    return [
        e["event"]
        for e in log_entries(server)
        if e["event"]["source"].get("kind") == "agent"
        and of_spool(e["event"]["source"]["id"], spool)
        and (cluster is None or e["event"]["cluster"] == cluster)
    ]


def wait_for_events(
    server: Server, source: str, count: int, timeout: float = 20.0, cluster: str | None = None
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = agent_events(server, source, cluster)
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
    mine = [s for s in sources if of_spool(s["source"], source)]
    assert len(mine) == 1 and mine[0]["gaps"] == [], mine


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


def agent_for(
    federation: Federation, data_dir: Path, *flags: str, credential: str | None = None
) -> Agent:
    """An agent of the federation's target cluster with a new credential (or the given
    one: a restarted agent keeps its credential, and so its audit source)."""
    server = federation.server
    credential = credential or server.credential(federation.target_name)
    if not flags:
        return start_agent(federation.target_name, [server.url], data_dir, credential)
    # as helpers.start_agent, with extra flags
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir.parent / f"{data_dir.name}.credential"
    token_file.write_text(credential)
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
        check = httpx.get(  # as Envoy asks: the client's address in x-trustmesh-source
            agent.url + "/ext_authz/public/x",
            headers={
                "host": HOST,
                "authorization": f"Bearer {token}",
                "x-trustmesh-source": "2001:DB8:0:0::7",
            },
        )
        assert check.status_code == 200
        unsourced = {"host": HOST, "x-trustmesh-source": "10.0.0.1:80"}  # not an address
        assert httpx.get(agent.url + "/ext_authz/public/x", headers=unsourced).status_code == 401
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
        # where the question came from: the HTTP peer, Envoy's header (canonical), or
        # nothing (not an address; the Kubernetes webhooks: the API server asks)
        assert first["request"] == {"surface": "authorize", **ALLOWED, "source": "127.0.0.1"}
        assert [e["request"].get("source") for e in events] == [
            "127.0.0.1",
            "127.0.0.1",
            "127.0.0.1",
            "2001:db8::7",
            None,
            None,
            None,
        ]
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

        ready = httpx.get(agent.url + "/readyz").json()
        assert ready["audit"]["backlog"] == 0 and ready["failing"] == []
        assert source not in str(ready)  # no internal id on an unauthenticated endpoint
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
    credential = (data_dir.parent / f"{data_dir.name}.credential").read_text()
    restarted = agent_for(federation, data_dir, credential=credential)
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


def oldest_unshipped(url: str) -> float:
    """The agent's ``trustmesh_agent_audit_oldest_unshipped_age_seconds``."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("trustmesh_agent_audit_oldest_unshipped_age_seconds "):
            return float(line.split()[1])
    raise AssertionError("the agent exposes no trustmesh_agent_audit_oldest_unshipped_age_seconds")


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
            # the oldest event not acknowledged is reported, and ages
            first = eventually(lambda: oldest_unshipped(agent.url), "an unshipped event's age")
            eventually(lambda: oldest_unshipped(agent.url) > first, "the age growing")
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
        eventually(lambda: oldest_unshipped(agent.url) == 0, "nothing left unshipped")
    finally:
        assert agent.stop() == 0, agent.process.stderr()
        server.stop()


def test_another_clusters_credential_cannot_silence_an_agents_audit(
    federation: Federation, tmp_path: Path
) -> None:
    """Issue 10, finding 1, reproduced end to end: two clusters, two agent processes.
    The attacker holds cluster A's credential and B's spool id (it used to be printed
    on B's unauthenticated /readyz) and sends an event under it. Before the fix that
    event claimed B's source, and every later batch of B's agent was refused with 403:
    B kept deciding and nothing reached the log. Now each credential writes only into
    its own source (CLUSTER/AGENT/SPOOL): B's events still arrive."""
    server = federation.server
    cluster_a, cluster_b = federation.target_name, unique("victim-")
    server.apply(cluster_yaml(cluster_b, f"http://127.0.0.1:9/{cluster_b}"))
    credential_a = server.credential(cluster_a)
    agent_a = start_agent(cluster_a, [server.url], tmp_path / "a", credential_a)
    agent_b = start_agent(cluster_b, [server.url], tmp_path / "b", server.credential(cluster_b))
    try:
        spool_b = source_of(tmp_path / "b")
        instance_b = (tmp_path / "b" / "agent-id").read_text().strip()
        for agent in (agent_a, agent_b):
            ready = httpx.get(agent.url + "/readyz")
            assert ready.status_code == 200
            assert spool_b not in ready.text and instance_b not in ready.text
            assert source_of(tmp_path / "a") not in ready.text

        squat = [
            ev.new_event(
                ev.AUTHZ_DECISION,
                source={"kind": "agent", "id": spool_b, "agent": instance_b, "seq": seq},
                cluster=cluster_a,
                request={"surface": "authorize"},
                decision={"allowed": False, "reason": "squatting", "policy_revision": 1},
            )
            for seq in (1, 2, 3, 50)
        ]
        answer = httpx.post(
            server.url + "/v1/audit/events",
            json={"events": squat},
            headers={"Authorization": f"Bearer {credential_a}"},
        )
        assert answer.status_code == 200, answer.text  # into A's own source, not B's
        as_b = [dict(e, cluster=cluster_b) for e in squat]
        refused = httpx.post(
            server.url + "/v1/audit/events",
            json={"events": as_b},
            headers={"Authorization": f"Bearer {credential_a}"},
        )
        assert refused.status_code == 403  # A cannot write B's events at all

        response = server.exchange(
            federation.sa_token(), f"spiffe://{TRUST_DOMAIN}/cluster/{cluster_b}"
        )
        token = response.json()["access_token"]
        answered = [agent_b.authorize(token, ALLOWED).json()["decision_id"] for _ in range(5)]
        events = wait_for_events(server, spool_b, 5, cluster=cluster_b)
        assert len(events) == 5, "B's decisions never reached the log"
        assert_exactly_once(events, answered)
        assert {e["source"]["id"].rsplit("/", 1)[0] for e in events} == {
            f"{cluster_b}/{events[0]['source']['agent']}"
        }
        no_gaps_in = [
            s for s in server.admin.get("/v1/audit/sources").json()["sources"]
            if of_spool(s["source"], spool_b)
        ]  # fmt: skip
        assert {s["cluster"] for s in no_gaps_in} == {cluster_a, cluster_b}
        mine = next(s for s in no_gaps_in if s["cluster"] == cluster_b)
        assert mine["gaps"] == [] and mine["next_seq"] == 6
        metrics = httpx.get(agent_b.url + "/metrics").text
        assert "trustmesh_agent_audit_ship_failures_total 0.0" in metrics
        assert httpx.get(agent_b.url + "/readyz").json()["failing"] == []
    finally:
        assert agent_a.stop() == 0, agent_a.process.stderr()
        assert agent_b.stop() == 0, agent_b.process.stderr()
