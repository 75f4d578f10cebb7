"""CA root rotation on evidence (DESIGN §9): a real control plane, a real agent that
fetches and reports the roots it holds, and a sidecar's reports through
``POST /v1/x509-svid`` (``bundle_sha256``); ``trustmesh keys rotate --ca`` and
``trustmesh get clusters`` run as users run them. The bundle (PEM and SPIFFE JSON) is
checked across the rotations, and certificates issued before a rotation keep
chaining to it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from helpers import (
    Agent,
    Federation,
    Server,
    register_federation,
    serve_cluster,
    start_agent,
    start_server,
    trustmesh_cmd,
)
from trustmesh.identity.x509svid import csr_pem

AGENT_CATCH_UP = 75.0  # seconds: a key sync (<= 30 s) and the report that follows it


@dataclass
class Setup:
    server: Server
    fed: Federation
    agent: Agent
    agent_id: str


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    server = start_server(tmp_path / "cp")
    cluster = serve_cluster("rot")
    agent: Agent | None = None
    try:
        fed = register_federation(server, cluster)
        issued = server.admin.post(f"/v1/clusters/{fed.origin_name}/credentials")
        assert issued.status_code == 200, issued.text
        agent_id = issued.json()["agent"]
        agent = start_agent(
            fed.origin_name, [server.url], tmp_path / "agent", issued.json()["token"]
        )
        yield Setup(server, fed, agent, agent_id)
    finally:
        if agent is not None:
            agent.process.proc.send_signal(signal.SIGCONT)  # a test may have frozen it
            agent.stop()
        cluster.stop()
        assert server.stop() == 0


def ca_status(server: Server) -> dict[str, Any]:
    answer = server.admin.get("/v1/ca")
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


def wait_for(check: Any, what: str, bound: float = AGENT_CATCH_UP) -> dict[str, Any]:
    """Poll until ``check(status)`` holds; the bound only stops a test that would hang."""
    deadline = time.monotonic() + bound
    while True:
        status = check()
        if status is not None:
            return dict(status)
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.5)


def agent_holds_prepared(setup: Setup) -> Any:
    status = ca_status(setup.server)
    agents = [h for h in status["holders"] if h["kind"] == "agent"]
    if agents and all(status["prepared"] in h["roots"] for h in agents):
        return status
    return None


def cli(
    server: Server, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "TRUSTMESH_CONFIG": "/nonexistent",
            "TRUSTMESH_SERVER": server.url,
            "TRUSTMESH_TOKEN": server.admin_token,
            **(env or {}),
        },
    )


def sidecar_renews(
    fed: Federation, holds: list[str], pod: str = "payments-abcde"
) -> dict[str, Any]:
    """What a sidecar does at renewal: a CSR, its SA token, the roots it holds."""
    answer = httpx.post(
        fed.server.url + "/v1/x509-svid",
        json={
            "subject_token": fed.sa_token(pod_name=pod),
            "csr": csr_pem(ec.generate_private_key(ec.SECP256R1())),
            "bundle_sha256": holds,
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def fingerprints(bundle_pem: str) -> list[str]:
    return [
        hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
        for c in x509.load_pem_x509_certificates(bundle_pem.encode())
    ]


def chains(leaf_pem: str, bundle_pem: str) -> bool:
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    roots = x509.load_pem_x509_certificates(bundle_pem.encode())
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    try:
        verifier.verify(leaf, [])
    except Exception:
        return False
    return True


def bundles(server: Server) -> tuple[str, dict[str, Any]]:
    pem = httpx.get(server.url + "/v1/bundle.pem").text
    document = httpx.get(server.url + "/.well-known/spiffe-bundle").json()
    return pem, document


def x509_fingerprints(document: dict[str, Any]) -> list[str]:
    return [
        hashlib.sha256(base64.b64decode(k["x5c"][0])).hexdigest()
        for k in document["keys"]
        if k["use"] == "x509-svid"
    ]


@pytest.mark.slow
def test_rotation_waits_for_every_holder_and_force_overrides(setup: Setup) -> None:
    server, fed = setup.server, setup.fed
    # the agent fetched both published roots at start and reports them
    status = wait_for(lambda: agent_holds_prepared(setup), "the agent's first report")
    assert {h["holder"] for h in status["holders"]} == {setup.agent_id}
    first_active = next(r["id"] for r in status["roots"] if r["state"] == "active")
    first_prepared = status["prepared"]
    pem, document = bundles(server)
    assert fingerprints(pem) == x509_fingerprints(document)
    assert set(fingerprints(pem)) == {first_active, first_prepared}

    # a sidecar that holds only the active root lags: the rotation is refused, naming it
    old = sidecar_renews(fed, [first_active])
    refused = cli(server, "keys", "rotate", "--ca")
    assert refused.returncode == 1, refused
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "sidecar of pod" in line and "--force" in line
    assert setup.agent_id not in line  # the agent holds it
    clusters = cli(server, "get", "clusters", "-o", "json")
    assert clusters.returncode == 0, clusters.stderr
    origin = next(
        c for c in json.loads(clusters.stdout) if c["metadata"]["name"] == fed.origin_name
    )
    lagging = origin["status"]["caRoots"]["lagging"]
    assert len(lagging) == 1 and lagging[0].startswith("pod ")
    assert origin["status"]["caRoots"]["holdersReporting"] == 2  # the agent and the sidecar
    table = cli(server, "get", "clusters", env={"COLUMNS": "400"})
    assert "CA ROOTS" in table.stdout and f"LAG: {lagging[0]}" in table.stdout
    assert ca_status(server)["prepared"] == first_prepared  # nothing changed

    # the sidecar renews holding the bundle it was given: no laggard, the rotation runs.
    # The agent is frozen first (SIGSTOP): it holds the root made active now, but it
    # cannot fetch the next prepared one, so it lags behind that one for certain.
    current = sidecar_renews(fed, fingerprints(old["bundle"]))
    setup.agent.process.proc.send_signal(signal.SIGSTOP)
    rotated = cli(server, "keys", "rotate", "--ca", "-o", "json")
    assert rotated.returncode == 0, rotated.stderr
    status = ca_status(server)
    states = {r["id"]: r["state"] for r in status["roots"]}
    assert states[first_active] == "retired" and states[first_prepared] == "active"
    second_prepared = status["prepared"]
    assert second_prepared not in (first_active, first_prepared)
    # the retired root stays published: certificates it signed are valid for up to 1 h
    pem, document = bundles(server)
    assert fingerprints(pem) == x509_fingerprints(document)
    assert set(fingerprints(pem)) == {first_active, first_prepared, second_prepared}
    assert chains(old["svid"][0], pem) and chains(current["svid"][0], pem)
    new = sidecar_renews(fed, fingerprints(pem))
    leaf = x509.load_pem_x509_certificate(new["svid"][0].encode())
    signer = next(
        c for c in x509.load_pem_x509_certificates(pem.encode()) if c.subject == leaf.issuer
    )
    assert hashlib.sha256(signer.public_bytes(serialization.Encoding.DER)).hexdigest() == (
        first_prepared
    )

    # the sidecar holds the new bundle, the frozen agent does not: refused, naming it
    sidecar_renews(fed, fingerprints(pem))
    refused = cli(server, "keys", "rotate", "--ca")
    assert refused.returncode == 1, refused
    line = refused.stderr.strip().splitlines()[-1]
    assert f"agent {setup.agent_id} of cluster {fed.origin_name}" in line
    assert "sidecar" not in line
    table = cli(server, "get", "clusters", env={"COLUMNS": "400"})
    assert f"LAG: agent {setup.agent_id}" in table.stdout
    forced = cli(server, "keys", "rotate", "--ca", "--force", "-o", "json")
    assert forced.returncode == 0, forced.stderr
    status = ca_status(server)
    assert next(r["id"] for r in status["roots"] if r["state"] == "active") == second_prepared
    events = server.admin.get(
        "/v1/audit/query", params={"type": "key.rotated", "limit": "100"}
    ).json()["entries"]
    ca_events = [
        e["event"]["detail"] for e in events if e["event"]["detail"].get("kind") == "x509-ca"
    ]
    assert [d["reason"] for d in ca_events] == ["requested", "requested"]
    assert "forced" not in ca_events[0] and ca_events[1]["forced"] is True
    assert ca_events[1]["laggard_count"] >= 1

    # thawed, the agent fetches the new prepared root by itself and says so
    setup.agent.process.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: agent_holds_prepared(setup), "the agent to report the new root")


def test_reports_and_rotation_requests_are_checked(setup: Setup) -> None:
    server = setup.server
    wait_for(lambda: agent_holds_prepared(setup), "the agent's first report")
    # an agent report needs an agent's credential and well-formed fingerprints
    answer = server.admin.post("/v1/agent/roots", json={"roots": []})
    assert answer.status_code == 403
    credential = server.credential(setup.fed.origin_name)
    bad = httpx.post(
        server.url + "/v1/agent/roots",
        json={"roots": ["not-hex"]},
        headers={"Authorization": f"Bearer {credential}"},
    )
    assert bad.status_code == 400 and "roots must be a list" in bad.json()["error_description"]
    rotate = server.admin.post("/v1/ca/rotate", json={"force": "yes"})
    assert rotate.status_code == 400 and "force must be" in rotate.json()["error_description"]
    force_without_ca = cli(server, "keys", "rotate", "--force")
    assert force_without_ca.returncode == 1 and "--ca" in force_without_ca.stderr
    listing = cli(server, "keys", "list", "--ca")
    assert listing.returncode == 0 and "prepared" in listing.stdout and "active" in listing.stdout


def test_a_revoked_ca_root_leaves_the_bundle_and_what_it_signed_is_refused(
    setup: Setup, tmp_path: Path
) -> None:
    """``trustmesh revoke --key <root fingerprint>``: a compromised root leaves the
    bundle at once (no waiting for holders), the prepared root signs from then on, a new
    one is prepared, and an agent with --trust-xfcc refuses certificates the revoked
    root signed (the revocation list entry names its fingerprint)."""
    server, fed = setup.server, setup.fed

    def active(status: dict[str, Any]) -> str:
        return str(next(r["id"] for r in status["roots"] if r["state"] == "active"))

    before = ca_status(server)
    compromised = active(before)
    leaf = sidecar_renews(fed, [])["svid"][0]
    agent = start_agent(
        fed.origin_name,
        [server.url],
        tmp_path / "xfcc-agent",
        server.credential(fed.origin_name),
        "--trust-xfcc",
    )
    try:
        certificate = x509.load_pem_x509_certificate(leaf.encode())
        [uri] = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        header = f'Cert="{quote(leaf, safe="")}";URI={uri}'

        def ext_authz() -> httpx.Response:
            return httpx.get(
                agent.url + "/ext_authz/api/orders",
                headers={"host": "orders.internal", "x-forwarded-client-cert": header},
                timeout=10,
            )

        # authenticated (the policy may deny it, the identity is the certificate's)
        assert ext_authz().status_code in (200, 403)
        revoked = cli(server, "revoke", "--key", compromised, "--reason", "root key leaked")
        assert revoked.returncode == 0, revoked.stderr
        after = ca_status(server)
        assert active(after) == before["prepared"]
        assert after["prepared"] not in (compromised, before["prepared"])
        pem, document = bundles(server)
        assert compromised not in fingerprints(pem)
        assert compromised not in x509_fingerprints(document)
        fresh = sidecar_renews(fed, [])
        assert chains(fresh["svid"][0], pem)
        assert not chains(leaf, pem)
        deadline = time.monotonic() + 30
        answer = ext_authz()
        while answer.status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.1)
            answer = ext_authz()
        assert answer.status_code == 401, answer.text
        assert answer.json()["reason"] in ("revoked", "untrusted")
        events = server.audit_events_until(
            "key.rotated", lambda found: any(e.get("detail", {}).get("revoked_root") for e in found)
        )
        [event] = [e for e in events if e.get("detail", {}).get("revoked_root")]
        assert event["detail"]["revoked_root"] == compromised
        assert event["detail"]["active_root"] == active(after)
        again = cli(server, "revoke", "--key", "ab" * 32)
        assert again.returncode == 1 and "no published signing key or CA root" in again.stderr
    finally:
        assert agent.stop() == 0
