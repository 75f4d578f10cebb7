"""trustmesh.client.AuthorizationMiddleware in front of a small Starlette app served on
loopback, asking a real agent (with a real policy from a real control plane)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_support import dead_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from helpers import Agent, Federation, start_agent, unique
from trustmesh.client import Authorization, AuthorizationMiddleware, TokenSource
from trustmesh.common.serving import BackgroundServer

HOST = "orders.client.test"


def policy(fed: Federation) -> str:
    role, binding = unique("orders-reader-"), unique("orders-readers-")
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {role}}}
spec:
  rules:
  - {{services: [{HOST}], paths: [/api/**], methods: [GET]}}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {binding}}}
spec:
  role: {role}
  subjects: [{{workload: {fed.workload}}}]
"""


def build_app() -> Starlette:
    async def orders(request: Request) -> Response:
        seen: Authorization = request.state.trustmesh
        assert request.scope["trustmesh"] is seen
        return JSONResponse(
            {
                "spiffe_id": seen.spiffe_id,
                "workload": seen.identity["workload_id"],
                "tier": seen.claims.get("tier"),
                "decision_id": seen.decision_id,
                "policy_revision": seen.policy_revision,
            }
        )

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/api/orders/{id}", orders, methods=["GET", "POST"]),
            Route("/healthz", healthz),
        ]
    )


@pytest.fixture(scope="module")
def agent(client_fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    server = client_fed.server
    server.apply(policy(client_fed))
    agent = start_agent(
        client_fed.target_name,
        [server.url],
        tmp_path_factory.mktemp("client-agent") / "agent",
        server.credential(client_fed.target_name),
    )
    yield agent
    assert agent.stop() == 0, agent.process.stderr()


@pytest.fixture(scope="module")
def service(agent: Agent) -> Iterator[str]:
    with BackgroundServer(AuthorizationMiddleware(build_app(), agent.url)) as served:
        yield served.url


@pytest.fixture(scope="module")
def token(client_fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sa = tmp_path_factory.mktemp("client-sa") / "token"
    sa.write_text(client_fed.sa_token())
    with TokenSource([client_fed.server.url], sa, [client_fed.audience]) as source:
        yield source.token()


def call(
    url: str, method: str = "GET", token: str | None = None, host: str = HOST, **kw: Any
) -> httpx.Response:
    headers = {"Host": host}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, url, headers=headers, timeout=10, **kw)


def test_allowed_request_reaches_the_app_with_the_identity(
    service: str, token: str, client_fed: Federation
) -> None:
    response = call(service + "/api/orders/42", token=token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["spiffe_id"].endswith(f"/cluster/{client_fed.origin_name}/ns/shop/sa/payments")
    assert body["workload"] == client_fed.workload and body["tier"] == "gold"
    assert body["decision_id"] and isinstance(body["policy_revision"], int)
    # The Host header as sent, lowercased: a rule host without a port ignores the port.
    assert call(service + "/api/orders/7", token=token, host="Orders.Client.Test:8443").is_success


def test_denied_request_gets_403(service: str, token: str) -> None:
    for response in (
        call(service + "/api/orders/42", "POST", token=token),
        call(service + "/api/orders/42", token=token, host="other.client.test"),
    ):
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["error"] == "forbidden" and body["decision_id"]
        assert set(body) == {"error", "decision_id"}  # no binding or role names


def test_missing_or_invalid_token_gets_401(service: str, token: str) -> None:
    missing = call(service + "/api/orders/42")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    basic = httpx.get(
        service + "/api/orders/42", headers={"Authorization": "Basic dTpw", "Host": HOST}
    )
    assert basic.status_code == 401
    bad = call(service + "/api/orders/42", token=token[:-4] + "AAAA")
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert bad.json() == {"error": "invalid_token", "reason": "bad_signature"}


def test_exempt_paths_and_odd_paths(service: str, token: str) -> None:
    assert call(service + "/healthz").text == "ok"
    odd = call(service + "/api/%2E%2E/admin", token=token)
    assert odd.status_code == 400 and "dot segment" in odd.json()["error_description"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("//api/orders/42", "empty segment"),
        ("/api/orders;x=1/42", "path parameter"),
        ("/api/orders%2F42", "encoded /"),
        ("/api/orders./42", "ending in a dot"),
    ],
)
def test_the_agent_reads_the_raw_path_and_refuses_ambiguous_spellings(
    service: str, token: str, path: str, problem: str
) -> None:
    """The decoded ASGI path would hide %2F; the agent sees the path as sent."""
    response = httpx.get(service + path, headers={"Authorization": f"Bearer {token}", "Host": HOST})
    assert response.status_code == 400, response.text
    assert problem in response.json()["error_description"]


def test_an_unreserved_encoding_is_the_same_path(service: str, token: str) -> None:
    response = call(service + "/api/%6Frders/42", token=token)
    assert response.status_code == 200, response.text


def test_agent_down_fails_closed_with_503(token: str, tmp_path: Path) -> None:
    with BackgroundServer(AuthorizationMiddleware(build_app(), dead_url())) as served:
        response = call(served.url + "/api/orders/42", token=token)
        assert response.status_code == 503
        assert response.json()["error"] == "temporarily_unavailable"
        assert call(served.url + "/healthz").status_code == 200
