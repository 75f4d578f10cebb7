"""Push delivery of anomaly findings as signed SETs (RFC 8935; docs/ssf.md "Push
delivery"), with real parts only: a control plane process, and receivers that are a
Starlette app on loopback which verify every SET with PyJWT from the control plane's
JWKS alone, fetched over HTTP (``anomaly_support.py``, shared with the detectors' tests).

There is no detector on this branch: findings are put in the outbox with
``server/push.py``'s :func:`enqueue` — the function the analytics runner calls in the
transaction that writes each finding — on the control plane's own database file."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from anomaly_support import (
    TOKEN,
    Receivers,
    good_receiver,
    receiver_yaml,
    running_receivers,
    wait_for,
)

from helpers import Server, start_server, trustmesh_cmd
from trustmesh.oauth.rfc8417 import ANOMALY_EVENT
from trustmesh.server.push import enqueue
from trustmesh.storage import open_database


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    with running_receivers() as seen:
        yield seen


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, receivers: Receivers) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("push")
    # two worker processes: two claimants of every row, as two replicas would be
    server = start_server(root / "cp", None, "--workers", "2")
    server.apply(
        good_receiver(receivers, server, root)
        + "---\n"
        + receiver_yaml("flaky", receivers.url("/flaky"), events=["denial_burst"])
        + "---\n"
        + receiver_yaml("refuse", receivers.url("/refuse"), events=["new_edge"])
    )
    try:
        yield server
    finally:
        server.stop()


def finding(detector: str, key: str) -> dict[str, Any]:
    return {
        "detector": detector,
        "key": key,
        "subject": {"workload": "payments"},
        "summary": f"{detector} for payments",
        "evidence": [3, 4],
        "severity": "medium",
        "detected_at": time.time(),
        "window": [time.time() - 60, time.time()],
        "details": {},
    }


def put(server: Server, finding_id: str, body: dict[str, Any]) -> int:
    """The analytics runner's call, on the control plane's database."""
    db = open_database(None, server.data_dir)
    try:
        with db.engine.begin() as conn:
            return enqueue(conn, finding_id, body, time.time())
    finally:
        db.dispose()


def receiver_status(server: Server) -> dict[str, dict[str, Any]]:
    answer = server.admin.get("/v1/receivers")
    assert answer.status_code == 200, answer.text
    return {i["metadata"]["name"]: i["status"]["delivery"] for i in answer.json()["items"]}


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", "COLUMNS": "300"}
    env.update(TRUSTMESH_SERVER=server.url, TRUSTMESH_TOKEN=server.admin_token)
    return subprocess.run(trustmesh_cmd(*args), capture_output=True, text=True, timeout=60, env=env)


def test_a_finding_reaches_every_receiver_that_wants_it_as_a_verified_set(
    plane: Server, receivers: Receivers
) -> None:
    body = finding("denial_burst", "denial_burst:payments")
    # good (every detector) and flaky (denial_burst); refuse wants only new_edge
    assert put(plane, "101", body) == 2
    assert put(plane, "101", body) == 0  # a (finding, receiver) is queued once

    good = wait_for("the SET at /good", lambda: receivers.accepted.get("/good"))
    claims = good[0]
    assert claims["iss"] == receivers.issuer and claims["aud"] == "urn:test:good"
    assert claims["txn"] == "anomaly-101" and "sub" not in claims and "exp" not in claims
    assert claims["events"] == {ANOMALY_EVENT: body}
    assert receivers.answered["/good"] == [202]  # one attempt, by one of the workers
    request = receivers.headers["/good"][-1]
    assert request["content-type"] == "application/secevent+jwt"
    assert request["accept"] == "application/json"

    # flaky answers 503 twice: retried with backoff, then delivered, same jti
    flaky = wait_for("the SET at /flaky", lambda: receivers.accepted.get("/flaky"))
    assert receivers.answered["/flaky"] == [503, 503, 202]
    assert flaky[0]["events"] == {ANOMALY_EVENT: body} and flaky[0]["aud"] == "urn:test:flaky"
    assert flaky[0]["jti"] != claims["jti"] and flaky[0]["txn"] == claims["txn"]

    state = wait_for(
        "delivered at both", lambda: (s := receiver_status(plane))["flaky"]["delivered"] and s
    )
    assert state["good"] == {**state["good"], "delivered": 1, "pending": 0, "failed": 0}
    assert state["flaky"]["delivered"] == 1 and state["flaky"]["pending"] == 0
    assert state["flaky"]["lastError"] == "the receiver answered HTTP 503"
    rows = plane.admin.get("/v1/deliveries", params={"receiver": "flaky"}).json()["items"]
    assert [(r["state"], r["attempts"], r["lastStatus"]) for r in rows] == [("delivered", 3, 202)]

    # each worker counts its own attempts (docs/operations.md): the series are there
    metrics = httpx.get(plane.url + "/metrics", timeout=10).text
    assert "# TYPE trustmesh_push_deliveries_total counter" in metrics
    assert "# TYPE trustmesh_push_pending gauge" in metrics
    # the bearer token went to the receiver, never to the log
    log = (plane.data_dir.parent / "cp.server.log").read_text()
    assert TOKEN not in log


def test_a_400_is_a_permanent_failure_shown_with_the_receivers_error(
    plane: Server, receivers: Receivers
) -> None:
    assert put(plane, "202", finding("new_edge", "new_edge:payments|eu->us")) == 2
    state = wait_for(
        "the refusal recorded", lambda: (s := receiver_status(plane))["refuse"]["failed"] and s
    )
    assert state["refuse"]["lastError"] == "invalid_audience: not for this SIEM"
    assert state["refuse"]["pending"] == 0 and state["refuse"]["delivered"] == 0
    shown = cli(plane, "get", "receivers")
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("│ refuse"))
    assert "invalid_audience: not for this SIEM" in line and receivers.url("/refuse") in line
    failed = cli(plane, "get", "deliveries", "--state", "failed", "-o", "json")
    assert failed.returncode == 0, failed.stderr
    assert '"receiver": "refuse"' in failed.stdout and '"attempts": 1' in failed.stdout
    assert '"nextAttempt": null' in failed.stdout
    assert receivers.answered["/refuse"] == [400]  # attempted once, by one worker


def test_plain_http_to_another_host_and_inline_tokens_are_refused_at_apply(
    plane: Server, tmp_path: Path
) -> None:
    manifest = tmp_path / "siem.yaml"
    manifest.write_text(receiver_yaml("siem", "http://siem.example.com/events"))
    applied = cli(plane, "apply", "-f", str(manifest))
    assert applied.returncode == 1 and "Traceback" not in applied.stderr
    assert (
        f"{manifest}:5: spec.endpoint: endpoint 'http://siem.example.com/events' must use "
        "https (plain http is allowed only on loopback)"
    ) in applied.stderr
    manifest.write_text(
        receiver_yaml("siem", "https://siem.example.com/e") + "  token: s3cr3t-inline-XYZ\n"
    )
    applied = cli(plane, "apply", "-f", str(manifest))
    assert applied.returncode == 1 and "spec.token: a token is never written" in applied.stderr
    assert "s3cr3t-inline-XYZ" not in applied.stderr
    names = [i["metadata"]["name"] for i in plane.admin.get("/v1/receivers").json()["items"]]
    assert names == ["flaky", "good", "refuse"]
