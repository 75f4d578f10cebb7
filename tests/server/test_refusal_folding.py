"""Refused exchanges on a real control plane: a flood from one client is a bounded
number of log entries whose ``audit.refusals_folded`` summaries add up exactly; every
source (caller address, claimed issuer) keeps its first refusals as events of their
own; a successful exchange is always recorded; what is folded when the server stops is
written on the way down and read back after a restart; and the log with its new event
type still verifies and renders (``trustmesh audit verify`` / ``query``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from helpers import (
    EXCHANGE_GRANT,
    JWT_TYPE,
    Server,
    register_federation,
    start_server,
    trustmesh_cmd,
)
from trustmesh.audit import events as ev
from trustmesh.sim import SimulatedCluster

LIMITS = ["--audit-refusal-per-source", "5", "--audit-refusal-quota", "20"]


def query(server: Server, type_: str) -> list[dict[str, Any]]:
    response = server.admin.get("/v1/audit/query", params={"type": type_, "limit": "1000"})
    assert response.status_code == 200, response.text
    return [entry["event"] for entry in response.json()["entries"]]


def refuse(server: Server, subject_token: str, source: str = "127.0.0.1", n: int = 1) -> None:
    """``n`` refused exchanges of ``subject_token``, sent from the address ``source``."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=server.url, transport=transport, timeout=10) as http:
        for _ in range(n):
            answer = http.post(
                "/oauth2/token",
                data={
                    "grant_type": EXCHANGE_GRANT,
                    "subject_token": subject_token,
                    "subject_token_type": JWT_TYPE,
                    "audience": "spiffe://example.org/cluster/x",
                },
            )
            assert answer.status_code in (400, 401), answer.text


def restart(server: Server, *extra: str) -> Server:
    assert server.stop() == 0
    return start_server(server.data_dir, server.db, *extra)


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRUSTMESH_SERVER": server.url,
        "TRUSTMESH_TOKEN": server.admin_token,
        "TRUSTMESH_CONFIG": "/nonexistent",
        "COLUMNS": "250",
    }
    return subprocess.run(
        trustmesh_cmd(*args), capture_output=True, text=True, timeout=120, env=env
    )


def test_a_flood_from_one_client_is_a_bounded_log_that_adds_up(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "data", None, "--audit-refusal-window", "3600", *LIMITS)
    try:
        fed = register_federation(server, sim_cluster)
        before = int(server.admin.get("/readyz").json()["audit_size"])
        refuse(server, "not-a-token", n=300)
        failed = query(server, ev.TOKEN_EXCHANGE_FAILED)
        assert len(failed) == 5  # the first of the source: each fully visible
        first = failed[0]
        assert first["identity"]["token_sha256"] == ev.token_sha256("not-a-token")
        assert first["decision"]["allowed"] is False and first["detail"]["error"]
        assert query(server, ev.REFUSALS_FOLDED) == []  # the window is still open
        # a successful exchange is never folded, whatever the refusals did
        fed.svid()
        assert len(query(server, ev.TOKEN_ISSUED)) == 1

        server = restart(server, "--audit-refusal-window", "3600", *LIMITS)
        (summary,) = query(server, ev.REFUSALS_FOLDED)  # written on the way down
        detail = summary["detail"]
        assert detail["folded"] == 295 and detail["folded_type"] == ev.TOKEN_EXCHANGE_FAILED
        assert detail["by"]["address"] == {"values": {"127.0.0.1": 295}}
        assert sum(detail["by"]["error"]["values"].values()) == 295
        assert detail["sample_token_sha256"] == [ev.token_sha256("not-a-token")]
        assert detail["limits"] == {"window_ms": 3_600_000, "quota": 20, "per_source": 5}
        size = int(server.admin.get("/readyz").json()["audit_size"])
        assert size - before == 5 + 1 + 1  # five refusals, one issuance, one summary

        verified = cli(server, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        shown = cli(server, "audit", "query", "--type", ev.REFUSALS_FOLDED)
        assert shown.returncode == 0 and "folded=295" in shown.stdout, shown.stdout + shown.stderr
    finally:
        server.stop()


def test_every_source_keeps_its_first_refusals(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "data", None, "--audit-refusal-window", "3600", *LIMITS)
    try:
        fed = register_federation(server, sim_cluster)
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            refuse(server, "not-a-token", source, n=10)
        assert len(query(server, ev.TOKEN_EXCHANGE_FAILED)) == 15
        # tokens claiming one issuer from many addresses: the issuer has its limit too
        wrong_audience = fed.sa_token(audience="someone-else")
        for n in range(10):
            refuse(server, wrong_audience, f"127.0.1.{n + 1}", n=2)
        failed = query(server, ev.TOKEN_EXCHANGE_FAILED)
        claimed = [e for e in failed if e["detail"].get("claimed", {}).get("iss")]
        assert len(claimed) == 5 and len(failed) == 20  # the quota: 20 a window

        server = restart(server, "--audit-refusal-window", "3600", *LIMITS)
        (summary,) = query(server, ev.REFUSALS_FOLDED)
        detail = summary["detail"]
        assert detail["folded"] == 30 - 15 + 20 - 5
        addresses = detail["by"]["address"]["values"]
        assert {a: addresses[a] for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")} == {
            "127.0.0.2": 5,
            "127.0.0.3": 5,
            "127.0.0.4": 5,
        }
        issuers = detail["by"]["issuer"]
        assert issuers == {"values": {sim_cluster.issuer: 15}, "absent": 15}
    finally:
        server.stop()


def test_a_window_that_ends_is_summarised_without_a_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", None, "--audit-refusal-window", "2", *LIMITS)
    try:
        refuse(server, "not-a-token", n=12)
        deadline = time.monotonic() + 15
        while True:
            failed = query(server, ev.TOKEN_EXCHANGE_FAILED)
            folded = sum(e["detail"]["folded"] for e in query(server, ev.REFUSALS_FOLDED))
            if len(failed) + folded == 12 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(failed) + folded == 12 and folded > 0  # every refusal accounted for
        metrics = httpx.get(server.url + "/metrics").text
        assert f"trustmesh_audit_refusals_folded {float(folded)}" in metrics
    finally:
        server.stop()


def test_forwarding_headers_do_not_make_new_sources(tmp_path: Path) -> None:
    """The source is the TCP peer: a caller cannot escape its per-source limit by
    naming other addresses in ``X-Forwarded-For`` (which uvicorn would otherwise trust
    from a loopback peer)."""
    server = start_server(tmp_path / "data", None, "--audit-refusal-window", "3600", *LIMITS)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for i in range(12):
                answer = http.post(
                    "/oauth2/token",
                    data={
                        "grant_type": EXCHANGE_GRANT,
                        "subject_token": "not-a-token",
                        "subject_token_type": JWT_TYPE,
                        "audience": "spiffe://example.org/cluster/x",
                    },
                    headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.1.0.{i}"},
                )
                assert answer.status_code == 400, answer.text
        assert len(query(server, ev.TOKEN_EXCHANGE_FAILED)) == 5
    finally:
        server.stop()
