"""A time-bound RoleBinding on a real control plane and a real agent (issue 14 item 5):
allowed through ``/v1/authorize`` while ``expiresAt`` is ahead, denied once it passes —
with no publish in between (the agent's policy revision does not move)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from helpers import (
    Agent,
    Federation,
    Server,
    eventually,
    register_federation,
    serve_cluster,
    start_agent,
    start_server,
)

REQUEST = {"host": "orders.shop.svc", "path": "/api/orders", "method": "GET"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = start_server(tmp_path / "cp")
    yield server
    assert server.stop() == 0, server.process.stderr()


@pytest.fixture
def federation(server: Server) -> Iterator[Federation]:
    with serve_cluster("origin") as origin:
        yield register_federation(server, origin)


@pytest.fixture
def agent(federation: Federation, tmp_path: Path) -> Iterator[Agent]:
    server = federation.server
    agent = start_agent(
        federation.target_name,
        [server.url],
        tmp_path / "agent",
        server.credential(federation.target_name),
    )
    yield agent
    assert agent.stop() == 0, agent.process.stderr()


def test_a_binding_stops_matching_at_its_expiry_without_a_publish(
    federation: Federation, agent: Agent
) -> None:
    expires = datetime.fromtimestamp(int(time.time()) + 8, UTC)
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    applied = federation.server.apply(
        f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-reader}}
spec:
  rules: [{{services: [orders.shop.svc], paths: [/api/**], methods: [GET]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: orders-for-a-while}}
spec:
  role: orders-reader
  expiresAt: {stamp}
  clusters: {{names: [{federation.target_name}]}}
  subjects: [{{workload: {federation.workload}}}]
"""
    )
    assert applied
    token = federation.svid()

    def decided() -> dict[str, object] | None:
        response = agent.authorize(token, REQUEST)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    allowed = eventually(lambda: (b := decided()) and b["allowed"] and b, "the binding in force")
    assert allowed["bindings"] == ["orders-for-a-while"]
    revision = allowed["policy_revision"]
    assert time.time() < expires.timestamp()
    # No publish from here on: the agent's engine drops the binding on its own clock.
    denied = eventually(lambda: (b := decided()) and not b["allowed"] and b, "the expiry", 30)
    assert time.time() >= expires.timestamp()
    assert denied["policy_revision"] == revision
    assert denied["denied"] is False  # a default deny: nothing allows it any more
    assert "no allow RoleBinding names this identity" in str(denied["reason"])
