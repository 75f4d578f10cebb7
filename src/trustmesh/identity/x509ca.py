"""The trust domain's X.509 certificate authority: its roots and their life cycle
(DESIGN §9), following the SPIFFE X509-SVID standard (§4, signing certificates) and the
SPIFFE Trust Domain and Bundle format (§4, ``use: x509-svid`` keys with ``x5c``).

    prepared --rotate--> active --rotate--> retired --(expiry of its last SVID)--> removed

Exactly the life cycle of the JWT-SVID signing keys (``identity/keys.py``): a *prepared*
root is published in the bundle before it signs anything, so every holder of the bundle
trusts it by the time it becomes *active*; a *retired* root signs nothing more and stays
published until every SVID it signed has expired (retirement + the longest SVID
lifetime + clock skew); then it is *removed*: unpublished, and its sealed private key
erased. Private keys are sealed with the master key (``identity/sealing.py``), the
associated data naming the root, so a sealed key copied onto another row fails to open.
Rotation is a compare-and-set on the database (concurrent replicas rotate once); when a
prepared root may become active (every holder reports it) is the server's call
(``server/roots.py``).

Each root is an ECDSA P-256 self-signed certificate:

* ``basicConstraints`` critical, ``CA:TRUE``, ``pathlen:0``: roots sign leaf SVIDs
  directly, there is no intermediate (X509-SVID §4.1 allows either; with no
  intermediate a chain is one certificate and no holder must fetch one);
* ``keyUsage`` critical, ``keyCertSign`` and ``cRLSign`` (X509-SVID §4.3);
* ``subjectKeyIdentifier`` (RFC 5280 §4.2.1.2, method 1) and an
  ``authorityKeyIdentifier`` equal to it;
* one URI SAN, the trust domain's SPIFFE ID ``spiffe://<td>`` (X509-SVID §4.1: a
  signing certificate may carry one; the bundle format's own example does);
* no ``nameConstraints``. A URI constraint (``permitted: URI=<td>``) would bound what
  a stolen root key signs only for validators that enforce it, and ``cryptography``'s
  path validator (which the agent's XFCC check may use) rejects every chain under such
  a constraint ("unsupported name constraint"). Every SPIFFE validator checks the
  trust domain of the SPIFFE ID against the bundle it chose, and each trust domain has
  its own roots (Trust Domain and Bundle §6.4), which gives the same bound.

Roots are valid for :data:`ROOT_VALIDITY` from their creation (minus a small backdate
for skew); a leaf never outlives the root that signed it."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection, select

from trustmesh.common.errors import Conflict, InvalidRequest, MasterKeyError
from trustmesh.identity.keys import (
    ACTIVE,
    CLOCK_SKEW,
    MAX_TOKEN_TTL,
    PREPARED,
    UNPUBLISHED,
    ensure_pair,
    remove_retired,
    revoke_row,
    rotate_active,
)
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import ca_roots

ROOT_VALIDITY = 365 * 86400.0  # seconds a root certificate is valid from its creation
ROOT_BACKDATE = 300.0  # a root's notBefore lies this far in the past (clock skew)
CA = meta_store.CA_REVISION
MAX_SVID_TTL = MAX_TOKEN_TTL  # DESIGN §9: default 1 h, never above the workload's maximum
RETIRED_FOR = MAX_SVID_TTL + CLOCK_SKEW  # a retired root stays published this long


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex: a root's id, and what agents
    and sidecars report they hold."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


MAX_REPORTED_ROOTS = 16
_HEX = frozenset("0123456789abcdef")


def parse_fingerprints(value: Any, name: str) -> tuple[str, ...]:
    """A holder's report of the roots it holds: a list of at most
    :data:`MAX_REPORTED_ROOTS` :func:`fingerprint` values, sorted and deduplicated."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_REPORTED_ROOTS
        or not all(isinstance(h, str) and len(h) == 64 and set(h) <= _HEX for h in value)
    ):
        raise InvalidRequest(
            f"{name} must be a list of at most {MAX_REPORTED_ROOTS} SHA-256 fingerprints "
            "(64 lowercase hex digits each)"
        )
    return tuple(sorted(set(value)))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _aad(root_id: str) -> bytes:
    return f"x509-ca:{root_id}".encode()


def bundle_jwk(certificate: x509.Certificate) -> dict[str, Any]:
    """SPIFFE Trust Domain and Bundle §4.2: an ``x509-svid`` key is the root's public
    key with the certificate in ``x5c`` (RFC 7517 §4.7, base64 DER, not url-safe); no
    ``kid`` (a JWT-SVID key is told by its ``kid``)."""
    public = certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    size = (public.curve.key_size + 7) // 8
    return {
        "kty": "EC",
        "crv": {"secp256r1": "P-256", "secp384r1": "P-384"}[public.curve.name],
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
        "use": "x509-svid",
        "x5c": [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()],
    }


MAX_X5C_BYTES = 16 * 1024


def roots_of_bundle(keys: Any) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a SPIFFE bundle's ``keys``: the first ``x5c`` certificate
    of each ``use: x509-svid`` key, at most :data:`MAX_REPORTED_ROOTS`; a key that does
    not parse, or whose certificate is not a CA, is skipped (Trust Domain and Bundle
    §4.2: a client ignores what it cannot use)."""
    found: list[x509.Certificate] = []
    if not isinstance(keys, list):
        return ()
    for jwk in keys:
        if len(found) >= MAX_REPORTED_ROOTS:
            break
        if not isinstance(jwk, dict) or jwk.get("use") != "x509-svid":
            continue
        chain = jwk.get("x5c")
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            continue
        if len(chain[0]) > MAX_X5C_BYTES * 4 // 3 + 4:
            continue
        try:
            certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except (ValueError, x509.ExtensionNotFound):
            continue
        if constraints.value.ca:
            found.append(certificate)
    return tuple(found)


def build_root(
    private_key: ec.EllipticCurvePrivateKey, trust_domain: str, now: float
) -> x509.Certificate:
    """A self-signed root for ``trust_domain`` (see the module docstring)."""
    created = datetime.fromtimestamp(now, UTC)
    public = private_key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    # Each root's subject is its own (path builders look issuers up by name first):
    # the trust domain, and the root's key identifier.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"trustmesh root {ski.digest.hex()[:16]}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(created - timedelta(seconds=ROOT_BACKDATE))
        .not_valid_after(created + timedelta(seconds=ROOT_VALIDITY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    return builder.sign(private_key, hashes.SHA256())


@dataclass(frozen=True)
class RootRecord:
    id: str  # fingerprint()
    state: str
    certificate: x509.Certificate
    pem: str
    not_after: float
    created_at: float
    activated_at: float | None
    retired_at: float | None
    remove_after: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "subject": self.certificate.subject.rfc4514_string(),
            "notAfter": self.not_after,
            "createdAt": self.created_at,
            "activatedAt": self.activated_at,
            "retiredAt": self.retired_at,
            "removeAfter": self.remove_after,
        }


@dataclass(frozen=True)
class ActiveRoot:
    id: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    not_after: float

    @cached_property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """What every leaf it signs names as its issuer's key (its SKI), read once."""
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


@dataclass(frozen=True)
class CaSet:
    """What one replica signs SVIDs with and publishes; rebuilt when ``ca_revision``
    moves. ``published`` are the prepared, active and retired roots, oldest first."""

    revision: int
    active: ActiveRoot
    published: tuple[RootRecord, ...]
    bundle_pem: str  # every published root, PEM, oldest first (GET /v1/bundle.pem)

    @classmethod
    def of(cls, revision: int, active: ActiveRoot, published: tuple[RootRecord, ...]) -> CaSet:
        return cls(revision, active, published, "".join(r.pem for r in published))

    def jwks(self) -> list[dict[str, Any]]:
        """One ``x509-svid`` key per published root (the SPIFFE bundle)."""
        return [bundle_jwk(r.certificate) for r in self.published]

    def fingerprints(self) -> list[str]:
        return [r.id for r in self.published]

    def next_prepared(self) -> RootRecord | None:
        """The prepared root the next rotation makes active (the oldest)."""
        return next((r for r in self.published if r.state == PREPARED), None)


def _record(row: Any) -> RootRecord:
    certificate = x509.load_pem_x509_certificate(row.certificate.encode())
    return RootRecord(
        id=row.id,
        state=row.state,
        certificate=certificate,
        pem=row.certificate,
        not_after=row.not_after,
        created_at=row.created_at,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
        remove_after=row.remove_after,
    )


class CaManager:
    """Owns the ``ca_roots`` table. Every write bumps ``ca_revision``."""

    def __init__(self, db: Database, master: MasterKey, trust_domain: str) -> None:
        self.db = db
        self.master = master
        self.trust_domain = trust_domain

    def ensure_roots(self, now: float | None = None) -> None:
        """First start: one active and one prepared root."""
        now = time.time() if now is None else now
        with self.db.engine.begin() as conn:
            ensure_pair(conn, ca_roots, lambda state: self._insert(conn, state, now), CA)

    def _insert(self, conn: Connection, state: str, now: float) -> str:
        private_key = ec.generate_private_key(ec.SECP256R1())
        certificate = build_root(private_key, self.trust_domain, now)
        root_id = fingerprint(certificate)
        der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        conn.execute(
            ca_roots.insert().values(
                id=root_id,
                state=state,
                certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
                private_key=self.master.seal(der, _aad(root_id)),
                not_after=certificate.not_valid_after_utc.timestamp(),
                created_at=now,
                activated_at=now if state == ACTIVE else None,
            )
        )
        return root_id

    # -- reading ------------------------------------------------------------------------
    def list_roots(self, include_removed: bool = False) -> list[RootRecord]:
        query = select(ca_roots).order_by(ca_roots.c.created_at, ca_roots.c.id)
        if not include_removed:
            query = query.where(ca_roots.c.state.not_in(UNPUBLISHED))
        with self.db.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def load(self) -> CaSet:
        with self.db.engine.connect() as conn:
            revision = int(meta_store.get(conn, meta_store.CA_REVISION) or 0)
            rows = list(
                conn.execute(
                    select(ca_roots)
                    .where(ca_roots.c.state.not_in(UNPUBLISHED))
                    .order_by(ca_roots.c.created_at, ca_roots.c.id)
                )
            )
        active_rows = [row for row in rows if row.state == ACTIVE]
        if not active_rows:
            raise MasterKeyError("no active CA root in the database")
        row = active_rows[-1]
        der = self.master.open(row.private_key, _aad(row.id))
        private_key = serialization.load_der_private_key(der, password=None)
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        published = tuple(_record(r) for r in rows)
        certificate = next(r.certificate for r in published if r.id == row.id)
        active = ActiveRoot(row.id, certificate, private_key, row.not_after)
        return CaSet.of(revision, active, published)

    # -- life cycle ---------------------------------------------------------------------
    def rotate(
        self,
        now: float | None = None,
        *,
        expected_prepared: str | None = None,
        expected_active: str | None = None,
        on_commit: Callable[[Connection, RootRecord, str], None] | None = None,
    ) -> RootRecord:
        """The oldest prepared root becomes active, the active one retires, and a new
        root is prepared (published now, active at the next rotation). Returns the new
        active root.

        ``expected_prepared``: rotate only if that is still the root to be promoted —
        the one whose holders the caller checked (Conflict otherwise: look again).
        ``expected_active``: rotate only if that root is still active (automatic
        rotation; another replica rotated first: returns the active root, unchanged).
        The retirement is a compare-and-set on the active row, as for the signing keys
        (``rotate_active``). ``on_commit(conn, new active, previous id)`` runs inside
        the transaction."""
        now = time.time() if now is None else now

        def check_prepared(prepared: str | None) -> None:
            if expected_prepared is not None and prepared != expected_prepared:
                raise Conflict(
                    "the prepared CA root changed while its holders were checked "
                    "(another rotation ran): check again"
                )

        row = rotate_active(
            self.db,
            ca_roots.c.id,
            "CA root",
            now,
            RETIRED_FOR,
            self._insert,
            CA,
            expected_active=expected_active,
            check_prepared=check_prepared,
            on_commit=None
            if on_commit is None
            else lambda conn, row, previous: on_commit(conn, _record(row), previous),
        )
        return _record(row)

    def revoke(self, root_id: str, now: float | None = None) -> RootRecord:
        """A compromised root leaves the bundle now and its private key is erased (DESIGN
        §5 key revocation, for the CA). If it was the active root, the prepared one (in
        every bundle since it was prepared) becomes active at once, without waiting for
        the evidence a rotation waits for; if it was the prepared one, a new root is
        prepared. What it signed is refused by agents through the revocation list entry
        naming its fingerprint. LookupError if no published root has that id."""
        now = time.time() if now is None else now
        row = revoke_row(self.db, ca_roots.c.id, "CA root", root_id, now, self._insert, CA)
        return _record(row)

    def active_root(self) -> RootRecord:
        with self.db.engine.connect() as conn:
            row = conn.execute(select(ca_roots).where(ca_roots.c.state == ACTIVE)).first()
        if row is None:
            raise MasterKeyError("no active CA root in the database")
        return _record(row)

    def remove_expired(
        self,
        now: float | None = None,
        on_commit: Callable[[Connection, list[str]], None] | None = None,
    ) -> list[str]:
        """Retired roots under which no SVID can still be valid leave the bundle; their
        sealed private key is erased."""
        now = time.time() if now is None else now
        with self.db.engine.begin() as conn:
            ids = remove_retired(conn, ca_roots.c.id, now, CA)
            if ids and on_commit is not None:
                on_commit(conn, ids)
        return ids
