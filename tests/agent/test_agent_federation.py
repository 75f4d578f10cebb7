"""Federated trust domains at the agent, on a clock the test moves: the authenticator
picks the partner's bundle by the trust domain of the token's subject, caches what
verified, and forgets the partner once its bundle is past ``use_until`` — even cut off
from the control plane; the root holder hands the partner's roots to an mTLS check only
for the partner's IDs and only while the bundle is in date."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest
from agent_support import FakeClock
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import self_signed_ca
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.controlplane import ControlPlaneState
from trustmesh.agent.roots import RootHolder
from trustmesh.common.errors import InvalidToken
from trustmesh.identity.spiffe_bundle import parse_bundle
from trustmesh.identity.svid import PartnerVerifier

OURS, PARTNER = "corp.example", "partner.example"
AUDIENCE = f"spiffe://{OURS}/cluster/west"
SIGNER = ec.generate_private_key(ec.SECP256R1())
ROOT_KEY = ec.generate_private_key(ec.SECP256R1())


ROOT = self_signed_ca(ROOT_KEY, PARTNER)


def bundle_document() -> dict[str, Any]:
    signing = jwt.algorithms.ECAlgorithm.to_jwk(SIGNER.public_key(), as_dict=True)
    signing.update(use="jwt-svid", kid="p1")
    root = jwt.algorithms.ECAlgorithm.to_jwk(ROOT_KEY.public_key(), as_dict=True)
    der = ROOT.public_bytes(serialization.Encoding.DER)
    root.update(use="x509-svid", x5c=[base64.b64encode(der).decode()])
    return {"keys": [signing, root], "spiffe_sequence": 1}


def partner_token(now: float, subject: str = f"spiffe://{PARTNER}/web") -> str:
    claims = {"sub": subject, "aud": [AUDIENCE], "iat": int(now), "exp": int(now) + 600}
    return jwt.encode(claims, SIGNER, algorithm="ES256", headers={"kid": "p1"})


def test_partner_identities_end_with_the_bundle_even_when_cached() -> None:
    clock = FakeClock()
    authn = Authenticator(cluster="west", clock=clock)
    authn.configure(issuer="https://cp.corp.example", trust_domain=OURS, jwks={"keys": []})
    bundle = parse_bundle(bundle_document(), PARTNER)
    authn.configure_partners({PARTNER: PartnerVerifier(bundle, clock.now + 60)})
    token = partner_token(clock.now)
    identity = authn.authenticate(token, clock.now)
    assert identity.spiffe_id == f"spiffe://{PARTNER}/web" and identity.cluster == ""
    with pytest.raises(InvalidToken) as stolen:  # a partner key, an ID of ours
        authn.authenticate(partner_token(clock.now, f"spiffe://{OURS}/x"), clock.now)
    assert stolen.value.reason == "unknown_kid"  # our keys do not know the partner's kid

    clock.advance(120)  # past use_until: the cache still holds the verified token…
    assert authn.authenticate(token, clock.now).spiffe_id == identity.spiffe_id
    fresh = partner_token(clock.now)
    with pytest.raises(InvalidToken) as stale:  # …but nothing new verifies
        authn.authenticate(fresh, clock.now)
    assert stale.value.reason == "stale_bundle"
    authn.expire_partners(clock.now)  # the key sync's every round
    assert authn.partners == {}
    with pytest.raises(InvalidToken) as gone:
        authn.authenticate(token, clock.now)
    assert gone.value.reason == "unknown_kid"  # asks the key sync for a fresh state


def test_the_root_holder_gives_partner_roots_for_partner_ids_only() -> None:
    now = time.time()
    holder = RootHolder()
    state = ControlPlaneState(
        cluster="west",
        trust_domain=OURS,
        issuer="https://cp.corp.example",
        jwks={"keys": []},
        sequence=1,
        refresh_hint=60,
        server="http://127.0.0.1:9",
        received_at=now,
        federated={
            PARTNER: {"bundle": bundle_document(), "use_until": now + 60},
            OURS: {"bundle": bundle_document(), "use_until": now + 60},  # never taken
        },
    )
    holder.update(state)
    assert holder.roots_for(PARTNER, now) == (ROOT,)
    assert holder.roots_for(OURS, now) == ()  # ours come from our own bundle (none here)
    assert holder.roots_for("third.example", now) == ()
    assert holder.roots_for(PARTNER, now + 61) == ()
    saved = ControlPlaneState.from_json(state.to_json())
    assert saved == state
    legacy = state.to_json()
    del legacy["federated"]  # a state saved before federation existed
    assert ControlPlaneState.from_json(legacy).federated == {}
