"""The X.509 CA on both engines: the roots' life cycle, sealing at rest, the bundle's
x509-svid keys, the holders' reports and their forgetting; and the CSR checks, by
property, never failing on hostile input with anything but a clear refusal."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from trustmesh.common.errors import Conflict, CsrRejected, MasterKeyError, PayloadTooLarge
from trustmesh.identity.keys import ACTIVE, PREPARED, REMOVED, RETIRED, REVOKED
from trustmesh.identity.sealing import MasterKey
from trustmesh.identity.x509ca import (
    RETIRED_FOR,
    CaManager,
    bundle_jwk,
    fingerprint,
    roots_of_bundle,
)
from trustmesh.identity.x509svid import check_csr
from trustmesh.server.roots import AGENT, SIDECAR, RootHolders
from trustmesh.storage import open_database
from trustmesh.storage.schema import ca_roots

NOW = time.time()


@pytest.fixture
def manager(db_url: str | None, tmp_path: Path) -> CaManager:
    db = open_database(db_url, tmp_path)
    ca = CaManager(db, MasterKey.load_or_create(tmp_path / "master.key"), "corp.example")
    ca.ensure_roots(now=NOW)
    return ca


def states(manager: CaManager) -> dict[str, str]:
    return {r.id: r.state for r in manager.list_roots(include_removed=True)}


def test_first_start_publishes_an_active_and_a_prepared_root(manager: CaManager) -> None:
    assert sorted(states(manager).values()) == [ACTIVE, PREPARED]
    manager.ensure_roots(now=NOW + 1)  # a restart adds nothing
    assert len(states(manager)) == 2
    ca = manager.load()
    assert {r.id for r in ca.published} == set(states(manager))
    assert ca.active.id == next(i for i, s in states(manager).items() if s == ACTIVE)
    pem_roots = x509.load_pem_x509_certificates(ca.bundle_pem.encode())
    assert [fingerprint(c) for c in pem_roots] == ca.fingerprints()
    for jwk, record in zip(ca.jwks(), ca.published, strict=True):
        assert jwk["use"] == "x509-svid" and "kid" not in jwk and "d" not in jwk
        der = base64.b64decode(jwk["x5c"][0])
        assert der == record.certificate.public_bytes(serialization.Encoding.DER)


def test_rotation_walks_prepared_active_retired_removed(manager: CaManager) -> None:
    before = manager.load()
    prepared = before.next_prepared()
    assert prepared is not None
    rotated = manager.rotate(now=NOW + 100, expected_prepared=prepared.id)
    assert rotated.id == prepared.id  # the root every holder already has becomes active
    after = states(manager)
    assert after[before.active.id] == RETIRED and after[prepared.id] == ACTIVE
    assert list(after.values()).count(PREPARED) == 1
    retired = next(r for r in manager.list_roots() if r.state == RETIRED)
    assert retired.remove_after == NOW + 100 + RETIRED_FOR
    # published while anything it signed may still be valid, then removed and erased
    assert manager.remove_expired(now=NOW + 100 + RETIRED_FOR - 1) == []
    assert manager.remove_expired(now=NOW + 100 + RETIRED_FOR) == [before.active.id]
    assert states(manager)[before.active.id] == REMOVED
    assert before.active.id not in manager.load().fingerprints()
    with manager.db.engine.connect() as conn:
        sealed = conn.execute(
            select(ca_roots.c.private_key).where(ca_roots.c.id == before.active.id)
        ).scalar()
    assert sealed == ""


@pytest.mark.parametrize("which", [ACTIVE, PREPARED, RETIRED])
def test_a_revoked_root_leaves_at_once_and_a_pair_remains(manager: CaManager, which: str) -> None:
    if which == RETIRED:
        prepared = manager.load().next_prepared()
        assert prepared is not None
        manager.rotate(now=NOW + 10, expected_prepared=prepared.id)
    before = states(manager)
    target = next(i for i, s in before.items() if s == which)
    revoked = manager.revoke(target, now=NOW + 20)
    assert revoked.state == REVOKED
    after = states(manager)
    assert after[target] == REVOKED
    published = [s for s in after.values() if s not in (REVOKED, REMOVED)]
    assert published.count(ACTIVE) == 1 and published.count(PREPARED) == 1
    if which == ACTIVE:  # the prepared root every holder has took over
        old_prepared = next(i for i, s in before.items() if s == PREPARED)
        assert after[old_prepared] == ACTIVE
    ca = manager.load()
    assert target not in ca.fingerprints() and ca.active.id != target
    with manager.db.engine.connect() as conn:
        sealed = conn.execute(
            select(ca_roots.c.private_key).where(ca_roots.c.id == target)
        ).scalar()
    assert sealed == ""
    with pytest.raises(LookupError):
        manager.revoke(target, now=NOW + 30)


def test_a_rotation_checked_against_another_prepared_root_is_refused(manager: CaManager) -> None:
    with pytest.raises(Conflict, match="prepared CA root changed"):
        manager.rotate(now=NOW + 1, expected_prepared="0" * 64)
    assert sorted(states(manager).values()) == [ACTIVE, PREPARED]


def test_private_keys_are_sealed_and_bound_to_their_root(
    manager: CaManager, tmp_path: Path
) -> None:
    ca = manager.load()
    der = ca.active.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with manager.db.engine.begin() as conn:
        rows = {r.id: r.private_key for r in conn.execute(select(ca_roots))}
        assert all(base64.b64encode(der).decode()[:40] not in v for v in rows.values())
        other = next(i for i in rows if i != ca.active.id)
        # a sealed key copied onto another root's row does not open
        conn.execute(
            update(ca_roots).where(ca_roots.c.id == ca.active.id).values(private_key=rows[other])
        )
    with pytest.raises(MasterKeyError):
        manager.load()
    stranger = CaManager(manager.db, MasterKey(b"\x01" * 32), "corp.example")
    with pytest.raises(MasterKeyError):
        stranger.load()


def test_holders_are_forgotten_after_their_time(manager: CaManager) -> None:
    clock = [NOW]
    holders = RootHolders(manager.db, lambda: clock[0])
    roots = manager.load().fingerprints()
    holders.report(AGENT, "east", "a1", roots, keep_for=90)
    holders.report(SIDECAR, "east", "pod-1", roots[:1], keep_for=20, subject="spiffe://x/y")
    assert [h.holder for h in holders.laggards(roots[1])] == ["pod-1"]
    clock[0] = NOW + 20  # the sidecar did not renew within twice its lifetime
    assert [h.holder for h in holders.current()] == ["a1"]
    assert holders.laggards(roots[1]) == []
    clock[0] = NOW + 90
    assert holders.current() == []
    assert holders.forget_expired(clock[0]) == 2


def test_unchanged_reports_are_not_rewritten_until_they_age(manager: CaManager) -> None:
    clock = [NOW]
    holders = RootHolders(manager.db, lambda: clock[0])
    roots = manager.load().fingerprints()
    holders.report(AGENT, "east", "a1", roots, keep_for=80)
    clock[0] = NOW + 10
    holders.report(AGENT, "east", "a1", roots, keep_for=80)
    assert holders.current()[0].reported_at == NOW  # within a quarter of its time
    holders.report(AGENT, "east", "a1", roots[:1], keep_for=80)  # changed: written
    assert holders.current()[0].roots == tuple(roots[:1])
    clock[0] = NOW + 40
    holders.report(AGENT, "east", "a1", roots[:1], keep_for=80)
    assert holders.current()[0].reported_at == NOW + 40


def test_roots_of_a_bundle_skip_what_is_not_a_ca(manager: CaManager) -> None:
    ca = manager.load()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(ca.active.certificate.not_valid_before_utc)
        .not_valid_after(ca.active.certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keys = [
        *ca.jwks(),
        {"use": "jwt-svid", "kid": "k", "kty": "EC"},
        {"use": "x509-svid", "x5c": ["not base64!"]},
        {"use": "x509-svid", "x5c": []},
        bundle_jwk(leaf),
    ]
    assert [fingerprint(c) for c in roots_of_bundle(keys)] == ca.fingerprints()
    assert roots_of_bundle("nonsense") == ()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_csr_checks_refuse_any_garbage_clearly(text: str) -> None:
    armoured = f"-----BEGIN CERTIFICATE REQUEST-----\n{text}\n-----END CERTIFICATE REQUEST-----"
    for candidate in (text, armoured):
        with pytest.raises((CsrRejected, PayloadTooLarge)) as refused:
            check_csr(candidate, "spiffe://corp.example/ns/a/sa/b")
        assert refused.value.description.startswith("csr: ")


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_csr_checks_refuse_any_der_garbage_clearly(der: bytes) -> None:
    body = base64.encodebytes(der).decode()
    pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----"
    with pytest.raises(CsrRejected):
        check_csr(pem, "spiffe://corp.example/ns/a/sa/b")
