"""Federation with another trust domain (DESIGN §9), with real parts only: a partner
trust domain that is a second trustmesh control plane (``--trust-domain
partner.example``: its own keys, its own SPIFFE bundle endpoint, its own simulated
cluster and token exchange), our control plane polling it, and our agent deciding on
the partner's JWT-SVIDs. The partner federates with us too, so its exchange issues
tokens for our clusters' audiences."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers import (
    TRUST_DOMAIN,
    Agent,
    BundleHost,
    Server,
    cluster_yaml,
    self_signed_ca,
    serve_cluster,
    signer_of,
    start_agent,
    start_server,
    trustmesh_cmd,
    workload_yaml,
)
from trustmesh.identity.svid import mint_svid
from trustmesh.sim import SimulatedCluster

PARTNER = "partner.example"
FLAKY = "flaky.example"
REQUEST = {"host": "api.test", "path": "/reports", "method": "GET"}
WAIT = 60.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def federated_yaml(
    name: str, trust_domain: str, url: str, *, refresh: str = "5s", max_stale: str = "30s"
) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: FederatedTrustDomain
metadata:
  name: {name}
spec:
  trustDomain: {trust_domain}
  bundleEndpointURL: "{url}"
  profile: https_web
  refreshHint: {refresh}
  maxStale: {max_stale}
"""


POLICY = """apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: reports-reader}
spec:
  rules:
  - {services: [api.test], paths: [/reports/**, /reports], methods: [GET]}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-reads}
spec:
  role: reports-reader
  subjects: [{claims: {project: shop}}]
"""

PARTNER_BINDING = """apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: partner-reads}
spec:
  role: reports-reader
  subjects: [{spiffeId: "spiffe://partner.example/**"}]
"""


def trust_domains(server: Server) -> dict[str, dict[str, Any]]:
    items = server.admin.get("/v1/trustdomains").json()["items"]
    return {item["spec"]["trustDomain"]: item["status"]["bundle"] for item in items}


def bundle_state(
    server: Server, domain: str, what: str, done: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """``status.bundle`` of ``domain`` once ``done`` holds for it."""

    def check() -> dict[str, Any] | None:
        state = trust_domains(server)[domain]
        return state if done(state) else None

    found: dict[str, Any] = wait_for(what, check)
    return found


def events(server: Server, type_: str) -> list[dict[str, Any]]:
    entries = server.admin.get("/v1/audit/query", params={"type": type_, "limit": "1000"})
    return [entry["event"] for entry in entries.json()["entries"]]


@dataclass
class Mesh:
    ours: Server
    partner: Server
    partner_origin: SimulatedCluster
    agent: Agent
    target: str  # our cluster the agent serves
    audience: str

    def partner_svid(self) -> str:
        """A JWT-SVID of the partner's workload for our cluster, from the partner's own
        token exchange."""
        response = self.partner.exchange(
            self.partner_origin.mint("shop", "payments"), self.audience
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def authorize(self, token: str) -> httpx.Response:
        return self.agent.authorize(token, REQUEST)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("federation")
    ours = start_server(root / "ours")
    partner = start_server(root / "partner", trust_domain=PARTNER)
    with serve_cluster("partner-origin") as origin:
        target = "west"
        audience = f"spiffe://{TRUST_DOMAIN}/cluster/{target}"
        ours.apply(cluster_yaml(target, "http://127.0.0.1:9/west") + "---\n" + POLICY)
        partner.apply(
            "---\n".join(
                [
                    cluster_yaml("p-east", origin.issuer),
                    workload_yaml("p-payments", "p-east", "shop", "payments"),
                    # the partner federates with us: its exchange then issues for our clusters
                    federated_yaml("corp", TRUST_DOMAIN, ours.url + "/.well-known/spiffe-bundle"),
                ]
            )
        )
        agent = start_agent(target, [ours.url], root / "agent", ours.credential(target))
        yield Mesh(ours, partner, origin, agent, target, audience)
        agent.stop()
        partner.stop()
        ours.stop()


def test_our_bundle_endpoint_carries_sequence_and_refresh_hint(mesh: Mesh) -> None:
    bundle = httpx.get(mesh.ours.url + "/.well-known/spiffe-bundle").json()
    assert isinstance(bundle["spiffe_sequence"], int)
    assert isinstance(bundle["spiffe_refresh_hint"], int) and bundle["spiffe_refresh_hint"] > 0
    assert {key["use"] for key in bundle["keys"]} == {"jwt-svid", "x509-svid"}


def test_partner_tokens_accepted_only_after_the_manifest_and_by_a_pattern_binding(
    mesh: Mesh,
) -> None:
    token = mesh.partner_svid()
    refused = mesh.authorize(token)
    assert refused.status_code == 401, refused.text
    assert refused.json()["reason"] == "unknown_kid"

    applied = mesh.ours.apply(
        federated_yaml(
            "partner", PARTNER, mesh.partner.url + "/.well-known/spiffe-bundle", max_stale="1h"
        )
    )
    assert applied["changes"] == [
        {"kind": "FederatedTrustDomain", "name": "partner", "action": "created"}
    ]
    state = bundle_state(
        mesh.ours, PARTNER, "the partner's bundle", lambda s: s.get("sequence") is not None
    )
    assert state["state"] == "fresh" and state["jwt_keys"] >= 1 and state["x509_roots"] >= 1
    published = httpx.get(mesh.ours.url + "/v1/federation/bundles").json()["trust_domains"]
    partner_bundle = httpx.get(mesh.partner.url + "/.well-known/spiffe-bundle").json()
    assert published[PARTNER]["sequence"] == partner_bundle["spiffe_sequence"]
    assert {k["kid"] for k in published[PARTNER]["bundle"]["keys"] if "kid" in k} == {
        k["kid"] for k in partner_bundle["keys"] if k["use"] == "jwt-svid"
    }
    updated = events(mesh.ours, "federation.bundle_updated")
    assert any(e["detail"]["trust_domain"] == PARTNER for e in updated)

    # Authenticated now, but no binding names the partner: its project=shop claim is the
    # partner's assertion, never matched by our claim-based binding.
    # the agent learns of the bundle on its next key sync, which a token of an unknown
    # trust domain asks for (rate-limited)
    def authenticated() -> dict[str, Any] | None:
        answer: dict[str, Any] = mesh.authorize(token).json()
        return answer if answer["authenticated"] else None

    body = wait_for("the agent's key sync", authenticated)
    assert body["authenticated"] is True and body["allowed"] is False
    identity = body["identity"]
    assert identity["spiffe_id"].startswith(f"spiffe://{PARTNER}/")
    assert "project" not in identity["claims"] and identity["cluster"] is None

    mesh.ours.apply(PARTNER_BINDING)
    allowed = wait_for(
        "the binding at the agent", lambda: mesh.authorize(token).json().get("allowed")
    )
    assert allowed is True
    assert mesh.authorize(token).json()["bindings"] == ["partner-reads"]


def test_a_partner_key_vouches_only_for_partner_ids(mesh: Mesh) -> None:
    wait_for("the partner's bundle", lambda: mesh.authorize(mesh.partner_svid()).status_code == 200)
    signer = signer_of(mesh.partner)
    now = int(time.time())

    def forged(subject: str, **extra: Any) -> str:
        claims = {"sub": subject, "aud": [mesh.audience], "iat": now, "exp": now + 300, **extra}
        return mint_svid(signer, claims)

    ours = forged(f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/payments", jti="f1")
    assert mesh.authorize(ours).status_code == 401
    third = forged("spiffe://third.example/ns/shop/sa/payments", jti="f2")
    third_refusal = mesh.authorize(third)
    assert third_refusal.status_code == 401 and "not one we federate" in third_refusal.text
    # SPIRE-shaped: no iss, no jti; accepted (then decided by policy)
    bare = forged(f"spiffe://{PARTNER}/ns/shop/sa/spire-made")
    assert mesh.authorize(bare).json()["authenticated"] is True
    elsewhere = forged(f"spiffe://{PARTNER}/ns/shop/sa/x", aud=["spiffe://corp.example/other"])
    assert mesh.authorize(elsewhere).json()["reason"] == "wrong_audience"
    long_lived = forged(f"spiffe://{PARTNER}/ns/shop/sa/x", exp=now + 3 * 86400)
    assert mesh.authorize(long_lived).json()["reason"] == "lifetime_too_long"
    stranger = ec.generate_private_key(ec.SECP256R1())
    pem = stranger.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    kid = signer.kid
    unsigned = jwt.encode(
        {"sub": f"spiffe://{PARTNER}/x", "aud": [mesh.audience], "exp": now + 300},
        pem,
        algorithm="ES256",
        headers={"kid": kid},
    )
    assert mesh.authorize(unsigned).json()["reason"] == "bad_signature"


def test_revoking_a_federated_spiffe_id(mesh: Mesh) -> None:
    token = mesh.partner_svid()
    subject = wait_for(
        "an authenticated partner token",
        lambda: mesh.authorize(token).json().get("identity", {}).get("spiffe_id"),
    )
    response = mesh.ours.admin.post(
        "/v1/revocations", json={"kind": "subject", "value": subject, "reason": "partner asked"}
    )
    assert response.status_code in (200, 201), response.text
    entry = response.json()["revocation"]
    assert entry["expires_at"] - entry["revoked_at"] >= 86400
    reason = wait_for(
        "the revocation at the agent",
        lambda: mesh.authorize(token).json().get("reason") == "revoked",
    )
    assert reason is True
    unknown = mesh.ours.admin.post(
        "/v1/revocations", json={"kind": "subject", "value": "spiffe://third.example/x"}
    )
    assert unknown.status_code == 400 and "federated" in unknown.text


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", "COLUMNS": "300"}
    env.update(TRUSTMESH_SERVER=server.url, TRUSTMESH_TOKEN=server.admin_token)
    return subprocess.run(trustmesh_cmd(*args), capture_output=True, text=True, timeout=60, env=env)


def test_bad_federated_trust_domains_are_refused_with_file_and_line(
    mesh: Mesh, tmp_path: Path
) -> None:
    manifest = tmp_path / "partners.yaml"
    manifest.write_text(federated_yaml("plain", "plain.example", "http://plain.example/b"))
    applied = cli(mesh.ours, "apply", "-f", str(manifest))
    assert applied.returncode == 1 and "Traceback" not in applied.stderr
    last = applied.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "partners.yaml:7" in last and "must use https" in last
    own = mesh.ours.admin.post(
        "/v1/apply",
        json={
            "files": [
                {"path": "fed.yaml", "content": federated_yaml("self", TRUST_DOMAIN, mesh.ours.url)}
            ]
        },
    )
    assert own.status_code == 409 and "fed.yaml:1" in own.text and "own trust domain" in own.text
    cases = {
        "http://partner.example/bundle": "must use https",
        "ftp://127.0.0.1/bundle": "not an absolute http(s) URL",
        "https://user:pw@partner.example/bundle": "credentials",
    }
    for url, message in cases.items():
        answer = mesh.ours.admin.post(
            "/v1/apply",
            json={
                "files": [
                    {"path": "bad.yaml", "content": federated_yaml("bad", "bad.example", url)}
                ]
            },
        )
        assert answer.status_code == 400, answer.text
        problem = answer.json()["problems"][0]
        assert problem.startswith("bad.yaml:7") and message in problem, problem


def ec_bundle(sequence: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    jwk.update(kid=f"k{sequence}", use="jwt-svid")
    return json.dumps(
        {"keys": [jwk], "spiffe_sequence": sequence, "spiffe_refresh_hint": 5}
    ).encode()


@pytest.mark.slow
def test_an_oversized_or_malformed_bundle_keeps_the_last_good_one(mesh: Mesh) -> None:
    host = BundleHost()
    try:
        host.body = ec_bundle(7)
        mesh.ours.apply(federated_yaml("flaky", FLAKY, host.url, max_stale="1h"))
        good = bundle_state(mesh.ours, FLAKY, "a first bundle", lambda s: s.get("sequence"))
        assert good["sequence"] == 7 and good["state"] == "fresh"
        for bad, why in (
            (b"x" * (300 * 1024), "more than 262144 bytes"),
            (b"{not json", "not UTF-8 JSON"),
            (
                b'{"keys": [{"kty": "EC", "use": "jwt-svid", "crv": "P-256", "x": "AA", "y": "AA"}]}',
                "kid",
            ),
        ):
            host.body = bad
            state = bundle_state(
                mesh.ours,
                FLAKY,
                f"the refusal ({why})",
                lambda s, why=why: why in (s["error"] or ""),
            )
            assert state["state"] == "stale" and state["sequence"] == 7
            published = httpx.get(mesh.ours.url + "/v1/federation/bundles").json()
            assert published["trust_domains"][FLAKY]["sequence"] == 7
        listed = cli(mesh.ours, "get", "trustdomains")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if " flaky " in line)
        assert FLAKY in row and " 7 " in row and "stale: " in row, listed.stdout
        as_json = json.loads(cli(mesh.ours, "get", "federation", "-o", "json").stdout)
        assert {item["spec"]["trustDomain"] for item in as_json} >= {FLAKY, PARTNER}
    finally:
        host.close()


def tls_for_loopback(directory: Path) -> tuple[ssl.SSLContext, str]:
    """A server TLS context for 127.0.0.1 whose certificate a private CA signed, and
    that CA's PEM (what a FederatedTrustDomain's caBundle holds)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = self_signed_ca(ca_key, "partner private CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "tls.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "tls.pem", directory / "tls.key")
    return context, ca.public_bytes(serialization.Encoding.PEM).decode()


def test_tls_with_the_ca_bundle_and_redirects_under_the_same_rules(
    mesh: Mesh, tmp_path: Path
) -> None:
    context, ca_pem = tls_for_loopback(tmp_path)
    private, plain = BundleHost(context), BundleHost()
    try:
        private.body = ec_bundle(3)
        ca_block = "\n".join("    " + line for line in ca_pem.splitlines())
        trusted = federated_yaml("private", "private.example", private.url, max_stale="1h")
        untrusted = federated_yaml("public-roots", "untrusted.example", private.url)
        mesh.ours.apply(trusted + f"  caBundle: |\n{ca_block}\n---\n" + untrusted)
        fetched = bundle_state(mesh.ours, "private.example", "TLS", lambda s: s.get("sequence"))
        assert fetched["sequence"] == 3 and fetched["state"] == "fresh"
        refused = bundle_state(mesh.ours, "untrusted.example", "no TLS", lambda s: s.get("error"))
        assert refused["state"] == "pending" and "could not be reached" in refused["error"]

        # a redirect is followed under the same rules: to https (whose CA our system
        # roots do not know here), and never off loopback over plain http
        plain.redirect = private.url
        mesh.ours.apply(federated_yaml("moved", "moved.example", plain.url))
        moved = bundle_state(mesh.ours, "moved.example", "a redirect", lambda s: s.get("error"))
        assert "could not be reached" in moved["error"]
        plain.redirect = "http://bundles.partner.example/b"
        mesh.ours.apply(federated_yaml("moved", "moved.example", plain.url + "/x"))
        away = bundle_state(
            mesh.ours,
            "moved.example",
            "a refused redirect",
            lambda s: "redirect" in str(s.get("error")),
        )
        assert "must use https" in away["error"]
    finally:
        private.close()
        plain.close()


@pytest.mark.slow
def test_a_partner_endpoint_that_goes_away_breaks_nothing_until_max_stale(mesh: Mesh) -> None:
    """Last in the module: it stops the partner."""
    mesh.ours.apply(
        federated_yaml("partner", PARTNER, mesh.partner.url + "/.well-known/spiffe-bundle")
        + "---\n"
        + PARTNER_BINDING
    )  # maxStale 30 s from now on
    used, unused_before, unused_after = (mesh.partner_svid() for _ in range(3))
    wait_for("the partner's token", lambda: mesh.authorize(used).json().get("allowed"))
    assert mesh.partner.stop() == 0
    stale = bundle_state(mesh.ours, PARTNER, "a failed poll", lambda s: s.get("error"))
    assert stale["state"] == "stale"
    assert mesh.authorize(used).json()["allowed"] is True  # what worked still works
    assert mesh.authorize(unused_before).json()["allowed"] is True
    dropped = bundle_state(mesh.ours, PARTNER, "the drop", lambda s: s["state"] == "dropped")
    assert dropped["droppedAt"] is not None
    event = events(mesh.ours, "federation.bundle_dropped")
    assert event and event[-1]["detail"]["trust_domain"] == PARTNER
    published = httpx.get(mesh.ours.url + "/v1/federation/bundles").json()["trust_domains"]
    assert PARTNER not in published
    refusal = mesh.authorize(unused_after).json()
    assert refusal["authenticated"] is False and refusal["reason"] in (
        "stale_bundle",
        "unknown_kid",
    )
