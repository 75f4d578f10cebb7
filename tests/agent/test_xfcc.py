"""Authorization from a forwarded client certificate (``--trust-xfcc``), in-process on a
clock the test moves: the XFCC header as Envoy writes it (the last element counts,
ambiguity refused), the X.509-SVID checks (shape, validity, chain to the bundle of its
own trust domain), claims from the bundle's inventory, revocation by notBefore, the
cache, the audit record (serial and hash, never the certificate), the gateway claims on
ext_authz, and that without ``--trust-xfcc`` the header is ignored. The agent is built
as ``trustmesh agent`` builds it; certificates are signed by the CA code the control
plane signs with (``identity/x509ca.py``, ``identity/x509svid.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from agent_support import FakeClock, client_of, local_agent, reason
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.agent.controlplane import ControlPlaneState
from trustmesh.agent.decide import EXT_AUTHZ, Outcome
from trustmesh.agent.envoy import header_value, parse_gateway_claims
from trustmesh.agent.main import Agent
from trustmesh.agent.spool import segment_name
from trustmesh.agent.xfcc import MAX_XFCC_BYTES, XfccHeader, client_certificate, elements
from trustmesh.audit.events import check_event
from trustmesh.common.errors import ConfigError, InvalidToken
from trustmesh.common.tracing import Span
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.identity.svid import mint_svid
from trustmesh.identity.x509ca import ActiveRoot, build_root, bundle_jwk, fingerprint
from trustmesh.identity.x509svid import sign_svid
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import BUNDLE_KIND
from trustmesh.request import parse_request
from trustmesh.revocation import Revocation
from trustmesh.revocation.model import revocation_expiry
from trustmesh.spiffeid import cluster_audience

TRUST_DOMAIN = "corp.example"
ISSUER = "https://trustmesh.test"
CLUSTER = "east"
PAYMENTS = f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/payments"
REPORTS = f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/reports"
HOST = "orders.shop.svc"
GET_ORDERS = parse_request({"host": HOST, "path": "/api/orders", "method": "GET"})
SPAN = Span(trace_id="a" * 32, span_id="b" * 16, parent_span_id=None)


def claims_of(workload: str, tier: str) -> dict[str, str]:
    return {
        "workload_id": workload,
        "project": "shop",
        "environment": "prod",
        "tier": tier,
        "cluster": "west",
        "namespace": "shop",
        "service_account": workload,
    }


def bundle() -> dict[str, Any]:
    """Gold may read orders; the inventory knows payments (gold) and reports (bronze)."""
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": BUNDLE_KIND,
        "cluster": CLUSTER,
        "revision": 3,
        "registryRevision": 1,
        "roles": {"reader": [{"services": [HOST], "paths": ["/api/**"], "methods": ["GET"]}]},
        "bindings": [
            {
                "name": "gold-reads",
                "role": "reader",
                "effect": "allow",
                "subjects": [{"claims": {"tier": "gold"}}],
                "namespaces": None,
            }
        ],
        "identities": {
            PAYMENTS: {"workload": "payments", "claims": claims_of("payments", "gold")},
            REPORTS: {"workload": "reports", "claims": claims_of("reports", "bronze")},
        },
    }


def new_root(now: float, trust_domain: str = TRUST_DOMAIN) -> ActiveRoot:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = build_root(key, trust_domain, now)
    return ActiveRoot(fingerprint(certificate), certificate, key, now + 365 * 86400)


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def xfcc(certificate: x509.Certificate, uri: str | None = None, **extra: str) -> str:
    """One element as Envoy's SANITIZE_SET writes it (By, Hash, Cert, URI)."""
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    [own] = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    parts = {
        "By": f"spiffe://{TRUST_DOMAIN}/cluster/east/ns/shop/sa/orders",
        "Hash": hashlib.sha256(der(certificate)).hexdigest(),
        "Cert": '"' + quote(pem(certificate), safe="") + '"',
        "URI": uri or own,
        **extra,
    }
    return ";".join(f"{key}={value}" for key, value in parts.items())


@dataclass
class Mesh:
    """An agent with our roots and bundle, and the CA that signs workload certificates."""

    agent: Agent
    clock: FakeClock
    root: ActiveRoot
    key: ActiveKey

    def svid(self, spiffe_id: str = PAYMENTS, ttl: float = 3600, **kw: Any) -> x509.Certificate:
        now = self.clock()
        return sign_svid(
            kw.get("root", self.root),
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            spiffe_id,
            kw.get("not_before", now - 30),
            now + ttl,
        )

    def decide(self, header: str | list[str]) -> Outcome:
        lines = [header] if isinstance(header, str) else header
        credential = XfccHeader(tuple(line.encode("latin-1") for line in lines))
        return asyncio.run(self.agent.decider.decide(credential, GET_ORDERS, EXT_AUTHZ, SPAN))

    def jwt(self, subject: str = PAYMENTS) -> str:
        now = int(self.clock())
        claims = claims_of("payments", "gold")
        return mint_svid(
            self.key,
            {
                "iss": ISSUER,
                "sub": subject,
                "aud": [cluster_audience(TRUST_DOMAIN, CLUSTER)],
                "iat": now,
                "nbf": now,
                "exp": now + 300,
                "jti": secrets.token_urlsafe(12),
                **claims,
            },
        )

    def set_roots(self, *roots: ActiveRoot) -> None:
        _, jwk = self.key, public_jwk(self.key.private_key, "ES256")
        self.agent.roots.update(
            ControlPlaneState(
                cluster=CLUSTER,
                trust_domain=TRUST_DOMAIN,
                issuer=ISSUER,
                jwks={"keys": [jwk, *(bundle_jwk(r.certificate) for r in roots)]},
                sequence=1,
                refresh_hint=30,
                server="http://127.0.0.1:9",
                received_at=self.clock(),
            )
        )

    def spooled(self) -> list[dict[str, Any]]:
        self.agent.spool.sync()
        path = self.agent.config.data_dir / "audit-spool" / segment_name(1)
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def build_mesh(tmp_path: Path, clock: FakeClock, **config: Any) -> Mesh:
    private = generate_private_key("ES256")
    jwk = public_jwk(private, "ES256")
    key = ActiveKey(jwk["kid"], "ES256", private)
    agent = local_agent(tmp_path / "agent", CLUSTER, clock, **config)
    agent.decider.authn.configure(issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [jwk]})
    assert agent.policy.install(sign_bundle(bundle(), key))
    agent.revocations.apply(1, [], full=True)
    mesh = Mesh(agent, clock, new_root(clock()), key)
    mesh.set_roots(mesh.root)
    return mesh


@pytest.fixture
def mesh(tmp_path: Path, clock: FakeClock) -> Iterator[Mesh]:
    mesh = build_mesh(tmp_path, clock, trust_xfcc=True)
    yield mesh
    mesh.agent.spool.close()


# --- the header -------------------------------------------------------------------------


def test_envoys_documented_examples_parse_and_the_last_element_counts() -> None:
    """The examples of Envoy's XFCC documentation: keys case-insensitive, a quoted
    Subject with commas and equals signs inside, DNS repeated, two elements."""
    one = (
        "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com;'
        "DNS=lyft.com;DNS=www.lyft.com"
    )
    [element] = elements(one)
    assert ("subject", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client") in element
    assert [v for k, v in element if k == "dns"] == ["lyft.com", "www.lyft.com"]
    two = (
        "By=http://frontend.lyft.com;Hash=468ed33b;URI=http://testclient.lyft.com,"
        "By=http://backend.lyft.com;Hash=9ba61d64;URI=http://frontend.lyft.com"
    )
    parsed = elements(two)
    assert len(parsed) == 2 and ("uri", "http://frontend.lyft.com") in parsed[-1]
    assert elements('a="x\\"y,z";b=1') == [[("a", 'x"y,z'), ("b", "1")]]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "URI",
        "URI=a;",
        "URI=a,",
        "URI=a,,URI=b",
        'Cert="unterminated',
        'Cert="a"b',
        "URI=a b\x01",
        "Ünï=x",
        "=x",
        "URI=a\\b",
    ],
)
def test_quoting_errors_and_empty_parts_are_refused(header: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        elements(header)
    assert refused.value.reason == "malformed_xfcc"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_header_parses_or_is_refused_as_malformed(text: str) -> None:
    try:
        parsed = elements(text)
    except InvalidToken as exc:
        assert exc.reason == "malformed_xfcc"
    else:
        assert parsed and all(parsed)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.text("abcXYZ", min_size=1, max_size=5),
                st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
            ),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_values_quoted_as_envoy_quotes_them_read_back(
    given_elements: list[list[tuple[str, str]]],
) -> None:
    def encode(value: str) -> str:
        if any(c in value for c in ',;="\\'):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return value

    header = ",".join(";".join(f"{k}={encode(v)}" for k, v in e) for e in given_elements)
    assert elements(header) == [[(k.lower(), v) for k, v in e] for e in given_elements]


def test_the_certificate_of_the_last_element_is_taken(mesh: Mesh) -> None:
    forged, real = mesh.svid(REPORTS), mesh.svid(PAYMENTS)
    header = xfcc(forged) + "," + xfcc(real)
    presented = client_certificate(XfccHeader((header.encode(),)))
    assert presented.uri == PAYMENTS and presented.leaf == der(real)
    outcome = mesh.decide(header)
    assert outcome.allowed and outcome.identity is not None
    assert outcome.identity.spiffe_id == PAYMENTS


@pytest.mark.parametrize(
    "problem",
    [
        "two header lines",
        "no Cert",
        "no URI",
        "two Cert",
        "two URI",
        "Hash of another certificate",
        "URI of another workload",
        "Cert not PEM",
        "Cert with text around",
        "Chain of another certificate",
        "too long",
    ],
)
def test_an_ambiguous_or_inconsistent_header_is_refused(mesh: Mesh, problem: str) -> None:
    certificate, other = mesh.svid(), mesh.svid(REPORTS)
    cert = '"' + quote(pem(certificate), safe="") + '"'
    header: str | list[str] = {
        "two header lines": [xfcc(certificate), xfcc(certificate)],
        "no Cert": f"URI={PAYMENTS}",
        "no URI": f"Cert={cert}",
        "two Cert": f"Cert={cert};Cert={cert};URI={PAYMENTS}",
        "two URI": f"Cert={cert};URI={PAYMENTS};URI={PAYMENTS}",
        "Hash of another certificate": xfcc(
            certificate, Hash=hashlib.sha256(der(other)).hexdigest()
        ),
        "URI of another workload": xfcc(certificate, uri=REPORTS),
        "Cert not PEM": f"Cert=hello;URI={PAYMENTS}",
        "Cert with text around": f'Cert="x{quote(pem(certificate), safe="")}";URI={PAYMENTS}',
        "Chain of another certificate": xfcc(
            certificate, Chain='"' + quote(pem(other), safe="") + '"'
        ),
        "too long": xfcc(certificate, DNS="x" * MAX_XFCC_BYTES),
    }[problem]
    outcome = mesh.decide(header)
    assert reason(outcome) in ("malformed_xfcc", "malformed_certificate"), outcome
    assert not outcome.allowed


# --- the certificate --------------------------------------------------------------------


def test_a_certificate_of_the_bundle_is_decided_with_the_registry_claims(mesh: Mesh) -> None:
    allowed = mesh.decide(xfcc(mesh.svid(PAYMENTS)))
    assert allowed.allowed and allowed.identity is not None
    assert allowed.identity.claims["tier"] == "gold"
    assert allowed.identity.claims["workload_id"] == "payments"
    assert allowed.identity.kid == mesh.root.id
    denied = mesh.decide(xfcc(mesh.svid(REPORTS)))  # bronze: no binding allows it
    assert denied.refusal is None and denied.decision is not None
    assert not denied.decision.allowed


def _leaf(mesh: Mesh, **change: Any) -> x509.Certificate:
    """A leaf signed by our root with one property changed."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.fromtimestamp(mesh.clock(), UTC)
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    usage.update(change.get("usage", {}))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(mesh.root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=change.get("ca", False), path_length=None), True)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), True)
        .add_extension(
            x509.ExtendedKeyUsage(change.get("eku", [ExtendedKeyUsageOID.CLIENT_AUTH])), False
        )
        .add_extension(mesh.root.authority_key_identifier, False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in change.get("uris", [PAYMENTS])]
            ),
            True,
        )
    )
    return builder.sign(mesh.root.private_key, hashes.SHA256())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"ca": True}, "not_an_svid"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "not_an_svid"),
        ({"usage": {"key_cert_sign": True}}, "not_an_svid"),
        ({"uris": [PAYMENTS, REPORTS]}, "not_an_svid"),
        ({"uris": ["https://payments.example/"]}, "not_an_svid"),
        ({}, "ok"),
    ],
)
def test_only_a_client_x509_svid_authenticates(
    mesh: Mesh, change: dict[str, Any], expected: str
) -> None:
    certificate = _leaf(mesh, **change)
    cert = '"' + quote(pem(certificate), safe="") + '"'
    uri = change.get("uris", [PAYMENTS])[0]
    outcome = mesh.decide(f"Cert={cert};URI={uri}")
    assert (reason(outcome) or "ok") == expected


def test_validity_is_checked_on_the_decision_clock_also_from_the_cache(
    mesh: Mesh, clock: FakeClock
) -> None:
    early = mesh.svid(not_before=clock() + 60)
    assert reason(mesh.decide(xfcc(early))) == "not_yet_valid"
    header = xfcc(mesh.svid(ttl=100))
    assert mesh.decide(header).allowed
    cache = mesh.agent.decider.certificates
    assert len(cache) == 1 and cache.misses == 2
    assert mesh.decide(header).allowed and cache.hits == 1
    clock.advance(101)
    assert reason(mesh.decide(header)) == "expired"
    assert len(cache) == 0


def test_a_certificate_of_another_ca_or_trust_domain_is_untrusted(mesh: Mesh) -> None:
    stranger = new_root(mesh.clock())
    assert reason(mesh.decide(xfcc(mesh.svid(root=stranger)))) == "untrusted"
    # our root signing an ID of another trust domain vouches for nothing there
    partner_id = "spiffe://partner.example/ns/shop/sa/payments"
    assert reason(mesh.decide(xfcc(mesh.svid(partner_id)))) == "untrusted"


def test_an_id_the_inventory_does_not_hold_is_unregistered(mesh: Mesh) -> None:
    stranger = f"spiffe://{TRUST_DOMAIN}/cluster/west/ns/shop/sa/nobody"
    assert reason(mesh.decide(xfcc(mesh.svid(stranger)))) == "unregistered"


def test_a_change_of_roots_empties_the_cache_and_a_dropped_root_stops_vouching(
    mesh: Mesh,
) -> None:
    header = xfcc(mesh.svid())
    assert mesh.decide(header).allowed
    successor = new_root(mesh.clock())
    mesh.set_roots(mesh.root, successor)  # a prepared root joins: still trusted
    assert mesh.decide(header).allowed
    mesh.set_roots(successor)  # ours leaves the bundle: the cached verification goes too
    assert reason(mesh.decide(header)) == "untrusted"
    assert len(mesh.agent.decider.certificates) == 0


def test_a_subject_revocation_covers_certificates_whose_not_before_precedes_it(
    mesh: Mesh, clock: FakeClock
) -> None:
    before = xfcc(mesh.svid())
    assert mesh.decide(before).allowed  # cached
    cut_off = float(int(clock()))
    entry = Revocation(2, "subject", PAYMENTS, cut_off, revocation_expiry(cut_off), "t", "admin")
    mesh.agent.revocations.apply(2, [entry], full=False)
    assert reason(mesh.decide(before)) == "revoked"
    after = xfcc(mesh.svid(not_before=cut_off + 1))
    clock.advance(2)
    assert mesh.decide(after).allowed  # issued after the cut-off: valid again
    cluster_wide = Revocation(
        3, "cluster", "west", clock(), revocation_expiry(clock()), "t", "admin"
    )
    mesh.agent.revocations.apply(3, [cluster_wide], full=False)
    assert reason(mesh.decide(after)) == "revoked"


def test_the_audit_record_names_the_certificate_never_holds_it(mesh: Mesh) -> None:
    certificate = mesh.svid()
    assert mesh.decide(xfcc(certificate)).allowed
    assert reason(mesh.decide(xfcc(mesh.svid(root=new_root(mesh.clock()))))) == "untrusted"
    allowed, refused = mesh.spooled()
    assert allowed["identity"] == {
        "spiffe_id": PAYMENTS,
        "workload": "payments",
        "origin_cluster": "west",
        "credential": "x509-svid",
        "x509_serial": format(certificate.serial_number, "x"),
        "x509_sha256": hashlib.sha256(der(certificate)).hexdigest(),
    }
    assert refused["identity"]["credential"] == "x509-svid"
    assert refused["decision"]["reason"] == "unauthenticated: untrusted"
    body = pem(certificate).splitlines()[1]
    for event in (allowed, refused):
        check_event({**event, "source": {**event["source"], "seq": 1}})
        assert body not in orjson.dumps(event).decode()


# --- over HTTP: ext_authz -----------------------------------------------------------------


def check(mesh: Mesh, **headers: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client_of(mesh.agent) as client:
            return await client.get("/ext_authz/api/orders", headers={"host": HOST, **headers})

    return asyncio.run(go())


def test_ext_authz_answers_from_the_certificate_with_the_gateway_claims(mesh: Mesh) -> None:
    answer = check(mesh, **{"x-forwarded-client-cert": xfcc(mesh.svid())})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-trustmesh-spiffe-id"] == PAYMENTS
    claims = {k: v for k, v in answer.headers.items() if k.startswith("x-trustmesh-claim-")}
    assert claims == {
        "x-trustmesh-claim-project": "shop",
        "x-trustmesh-claim-environment": "prod",
        "x-trustmesh-claim-tier": "gold",
        "x-trustmesh-claim-cluster": "west",
    }
    denied = check(mesh, **{"x-forwarded-client-cert": xfcc(mesh.svid(REPORTS))})
    assert denied.status_code == 403
    assert not any(k.startswith("x-trustmesh-claim-") for k in denied.headers)
    refused = check(mesh, **{"x-forwarded-client-cert": "URI=nothing"})
    assert refused.status_code == 401 and refused.json()["reason"] == "malformed_xfcc"


def test_a_bearer_token_comes_first_and_gets_the_same_claims(mesh: Mesh) -> None:
    answer = check(
        mesh,
        authorization=f"Bearer {mesh.jwt()}",
        **{"x-forwarded-client-cert": xfcc(mesh.svid(REPORTS))},
    )
    assert answer.status_code == 200
    assert answer.headers["x-trustmesh-claim-tier"] == "gold"


def test_without_trust_xfcc_the_header_is_ignored(tmp_path: Path, clock: FakeClock) -> None:
    mesh = build_mesh(tmp_path, clock, gateway_claims=("tier",))
    try:
        answer = check(mesh, **{"x-forwarded-client-cert": xfcc(mesh.svid())})
        assert answer.status_code == 401 and answer.json()["reason"] == "missing_token"
        allowed = check(mesh, authorization=f"Bearer {mesh.jwt()}")
        assert {k for k in allowed.headers if k.startswith("x-trustmesh-claim-")} == {
            "x-trustmesh-claim-tier"
        }
    finally:
        mesh.agent.spool.close()


def test_gateway_claim_names_and_values_are_header_safe() -> None:
    assert parse_gateway_claims("project, tier,") == ("project", "tier")
    assert parse_gateway_claims("") == ()
    for bad in ("Project", "a b", "x\r\ny", "tier,tier"):
        with pytest.raises(ConfigError):
            parse_gateway_claims(bad)
    assert header_value("gold") == "gold"
    assert header_value("a\r\nx-evil: 1") == "a%0D%0Ax-evil:%201"
    assert header_value("café 100%") == "caf%C3%A9%20100%25"
