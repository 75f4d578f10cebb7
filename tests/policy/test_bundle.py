"""Signed bundles at the agent: only a bundle signed by a known key, typed as a bundle,
for this cluster, and newer than the one in force is installed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from attacks import swapped_payload
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.policy import PolicyHolder
from trustmesh.common.errors import InvalidToken
from trustmesh.identity.keys import ActiveKey, generate_private_key, public_jwk
from trustmesh.identity.svid import mint_svid
from trustmesh.policy.bundle import sign_bundle, verify_bundle
from trustmesh.policy.compiler import BUNDLE_KIND


def key() -> tuple[ActiveKey, dict[str, object]]:
    private = generate_private_key("ES256")
    jwk = public_jwk(private, "ES256")
    return ActiveKey(jwk["kid"], "ES256", private), jwk


def bundle(revision: int, registry_revision: int = 1, cluster: str = "beta") -> dict[str, object]:
    return {
        "apiVersion": "trustmesh.io/v1alpha1",
        "kind": BUNDLE_KIND,
        "cluster": cluster,
        "revision": revision,
        "registryRevision": registry_revision,
        "roles": {"r": [{"services": ["api"], "paths": ["/**"], "methods": ["GET"]}]},
        "bindings": [
            {
                "name": "b",
                "role": "r",
                "effect": "allow",
                "subjects": [{"claims": {"project": "shop"}}],
                "namespaces": None,
            }
        ],
        "identities": {},
    }


@pytest.fixture
def authn() -> Authenticator:
    return Authenticator(cluster="beta", clock=time.time)


@pytest.fixture
def holder(tmp_path: Path, authn: Authenticator) -> tuple[PolicyHolder, ActiveKey]:
    signer, jwk = key()
    authn.configure(issuer="https://tm", trust_domain="corp.example", jwks={"keys": [jwk]})
    return PolicyHolder("beta", tmp_path, authn.keys, time.time), signer


def test_install_persist_and_only_forward(
    holder: tuple[PolicyHolder, ActiveKey], tmp_path: Path
) -> None:
    policy, signer = holder
    assert policy.install(sign_bundle(bundle(2), signer)) is True
    assert policy.version == (2, 1) and policy.engine is not None
    assert (tmp_path / "bundle.jws").exists()
    assert policy.install(sign_bundle(bundle(1), signer)) is False  # older policy revision
    assert policy.install(sign_bundle(bundle(2), signer)) is False  # same version
    assert (
        policy.install(sign_bundle(bundle(2, registry_revision=2), signer)) is True
    )  # registry moved
    assert policy.version == (2, 2)
    restarted = PolicyHolder("beta", tmp_path, policy.keys, time.time)
    assert restarted.restore() is True and restarted.version == (2, 2)


def test_forged_bundles_are_refused(holder: tuple[PolicyHolder, ActiveKey]) -> None:
    policy, signer = holder
    stranger, _ = key()
    good = sign_bundle(bundle(3), signer)
    cases = {
        "tampered": (swapped_payload(good, revision=99), "bad_signature"),
        "unknown key": (sign_bundle(bundle(3), stranger), "unknown_kid"),
        "other cluster": (sign_bundle(bundle(3, cluster="alpha"), signer), "wrong_audience"),
        "an SVID, not a bundle": (
            mint_svid(signer, {"sub": "x", "kind": BUNDLE_KIND}),
            "malformed",
        ),
    }
    for name, (token, reason) in cases.items():
        with pytest.raises(InvalidToken) as caught:
            policy.install(token)
        assert caught.value.reason == reason, name
    assert policy.engine is None  # nothing installed


def test_a_bundle_is_not_accepted_as_an_identity(
    holder: tuple[PolicyHolder, ActiveKey], authn: Authenticator
) -> None:
    policy, signer = holder
    now = int(time.time())
    body = {
        **bundle(1),
        "iss": "https://tm",
        "sub": "spiffe://corp.example/x",
        "aud": ["spiffe://corp.example/cluster/beta"],
        "exp": now + 60,
        "iat": now,
        "jti": "j",
        "workload_id": "w",
        "namespace": "n",
        "service_account": "s",
    }
    token = sign_bundle(body, signer)  # carries every SVID claim, but is typed as a bundle
    with pytest.raises(InvalidToken) as caught:
        authn.authenticate(token, time.time())
    assert "type" in caught.value.description
    assert verify_bundle(token, policy.keys, "beta")["revision"] == 1
