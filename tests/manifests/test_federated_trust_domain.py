"""The ``FederatedTrustDomain`` kind (DESIGN §9): its defaults, every refusal with the
field and the line, and the checks across documents (our own trust domain, one
partner federated twice) with the file and line of the document."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import self_signed_ca
from trustmesh.common.errors import ManifestError, RegistryConflict
from trustmesh.manifests import FederatedTrustDomainSpec, parse_text
from trustmesh.registry import build_registry

HEAD = """apiVersion: trustmesh.io/v1alpha1
kind: FederatedTrustDomain
metadata:
  name: partner
spec:
"""  # spec fields start on line 6
GOOD = (
    HEAD
    + """  trustDomain: partner.example
  bundleEndpointURL: https://bundle.partner.example/spiffe
"""
)


def ca_pem() -> str:
    certificate = self_signed_ca(ec.generate_private_key(ec.SECP256R1()), "partner CA")
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_defaults_and_the_typed_spec() -> None:
    (doc,) = parse_text(GOOD)
    assert doc.body["spec"] == {
        "trustDomain": "partner.example",
        "bundleEndpointURL": "https://bundle.partner.example/spiffe",
        "profile": "https_web",
        "maxStale": 7 * 86400,
    }
    assert doc.spec == FederatedTrustDomainSpec(
        trust_domain="partner.example",
        bundle_endpoint_url="https://bundle.partner.example/spiffe",
        profile="https_web",
        ca_bundle=None,
        refresh_hint=None,
        max_stale=604800,
    )
    pem = ca_pem()
    block = "\n".join("    " + line for line in pem.splitlines())
    (full,) = parse_text(GOOD + f"  refreshHint: 30s\n  maxStale: 2h\n  caBundle: |\n{block}\n")
    assert isinstance(full.spec, FederatedTrustDomainSpec)
    assert (full.spec.refresh_hint, full.spec.max_stale) == (30, 7200)
    assert full.spec.ca_bundle is not None and "BEGIN CERTIFICATE" in full.spec.ca_bundle
    (loopback,) = parse_text(
        GOOD.replace("https://bundle.partner.example", "http://127.0.0.1:8080")
    )
    assert isinstance(loopback.spec, FederatedTrustDomainSpec)


@pytest.mark.parametrize(
    ("replace", "by", "line", "message"),
    [
        (
            "https://bundle.partner.example",
            "http://bundle.partner.example",
            7,
            "must use https (plain http is allowed only on loopback)",
        ),
        (
            "https://bundle.partner.example/spiffe",
            "bundle.partner.example",
            7,
            "is not an absolute http(s) URL",
        ),
        ("https://bundle.partner", "https://me:pw@bundle.partner", 7, "must not carry credentials"),
        ("/spiffe", "/spiffe?x=1", 7, "must not have a query or fragment"),
        ("partner.example\n", "Partner.Example\n", 6, "trust domain 'Partner.Example' is invalid"),
        ("partner.example\n", "spiffe://partner.example\n", 6, "give the trust domain name alone"),
        ("/spiffe\n", "/spiffe\n  profile: https_spiffe\n", 8, "'https_spiffe' is not supported"),
        ("/spiffe\n", "/spiffe\n  profile: web\n", 8, "'web' is not one of https_web"),
        ("/spiffe\n", "/spiffe\n  refreshHint: 1s\n", 8, "must be between 5 and 86400 seconds"),
        ("/spiffe\n", "/spiffe\n  maxStale: 1000h\n", 8, "must be between 5 and 2592000 seconds"),
        (
            "/spiffe\n",
            "/spiffe\n  caBundle: not a certificate\n",
            8,
            "caBundle is not PEM certificates",
        ),
        (
            "/spiffe\n",
            "/spiffe\n  caBundle: '-----BEGIN PRIVATE KEY-----'\n",
            8,
            "holds a private key",
        ),
        ("/spiffe\n", "/spiffe\n  trustBundle: x\n", 8, "unknown field 'trustBundle'"),
        ("  trustDomain: partner.example\n", "", 5, "spec.trustDomain: required field is missing"),
    ],
)
def test_refusals_name_the_field_and_line(replace: str, by: str, line: int, message: str) -> None:
    text = GOOD.replace(replace, by)
    assert text != GOOD
    with pytest.raises(ManifestError) as refused:
        parse_text(text, "fed.yaml")
    problem = str(refused.value.problems[0])
    assert problem.startswith(f"fed.yaml:{line}:"), problem
    assert message in problem, problem


def test_our_own_trust_domain_and_a_partner_twice_are_refused_across_documents() -> None:
    own = parse_text(GOOD.replace("partner.example\n", "corp.example\n"), "own.yaml")
    with pytest.raises(RegistryConflict) as refused:
        build_registry("corp.example", 1, own)
    assert "own.yaml:1: FederatedTrustDomain partner" in str(refused.value.problems[0])
    assert "our own trust domain" in str(refused.value.problems[0])
    twice = parse_text(GOOD + "---\n" + GOOD.replace("name: partner", "name: again"), "two.yaml")
    with pytest.raises(RegistryConflict) as refused:
        build_registry("corp.example", 1, twice)
    assert "two.yaml:1: FederatedTrustDomain partner" in str(refused.value.problems[0])
    assert "already federated by FederatedTrustDomain again" in str(refused.value.problems[0])
    registry = build_registry("corp.example", 1, parse_text(GOOD))
    federation = registry.federation_of("partner.example")
    assert federation is not None and federation.max_stale == 604800
    assert registry.federation_of("corp.example") is None
