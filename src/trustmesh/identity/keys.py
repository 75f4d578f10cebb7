"""JWT-SVID signing keys and their life cycle (DESIGN §2).

    prepared --rotate--> active --rotate--> retired --(expiry of its last token)--> removed

A *prepared* key is published in JWKS before it signs anything, so agents know it by
the time it becomes *active*; a *retired* key stays published until every token it may
have signed has expired (retirement + the maximum TTL + clock skew); then it is
*removed*: unpublished and its sealed private key erased. JWKS therefore always holds
every key a still-valid token may carry. Rotation is a compare-and-set transaction on
the database, so several replicas rotating at once produce one rotation."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import Column, Connection, Table, select, update

from trustmesh.common.errors import MasterKeyError
from trustmesh.identity.sealing import CHECK_AAD, MasterKey
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import signing_keys

MAX_TOKEN_TTL = 3600  # DESIGN §2: never above 3600 s
CLOCK_SKEW = 60
SUPPORTED_ALGS = ("ES256", "ES384", "RS256", "PS256")

PREPARED, ACTIVE, RETIRED, REMOVED = "prepared", "active", "retired", "removed"
REVOKED = "revoked"  # removed at once, out of turn (DESIGN §5 key revocation)
UNPUBLISHED = (REMOVED, REVOKED)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members in lexicographic order."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"signing algorithm {alg} is not supported (use one of {SUPPORTED_ALGS})")


def public_jwk(private_key: PrivateKey, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
    jwk = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    jwk["kid"] = jwk_thumbprint(jwk)
    jwk["alg"] = alg
    jwk["use"] = "sig"
    return jwk


@dataclass(frozen=True)
class KeyRecord:
    kid: str
    alg: str
    state: str
    public_jwk: dict[str, Any]
    created_at: float
    activated_at: float | None
    retired_at: float | None
    remove_after: float | None


@dataclass(frozen=True)
class ActiveKey:
    kid: str
    alg: str
    private_key: PrivateKey


@dataclass(frozen=True)
class KeySet:
    """What one replica signs with and publishes; rebuilt when ``keys_revision`` moves."""

    revision: int
    active: ActiveKey
    published: tuple[KeyRecord, ...]  # prepared, active and retired keys

    def jwks(self, use: str | None = None) -> dict[str, Any]:
        keys = []
        for record in self.published:
            jwk = dict(record.public_jwk)
            if use is not None:
                jwk["use"] = use
            keys.append(jwk)
        return {"keys": keys}


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        kid=row.kid,
        alg=row.alg,
        state=row.state,
        public_jwk=json.loads(row.public_jwk),
        created_at=row.created_at,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
        remove_after=row.remove_after,
    )


KEYS = meta_store.KEYS_REVISION


def ensure_pair(conn: Connection, table: Table, insert: Callable[[str], str], counter: str) -> None:
    """First start of a life-cycle table (signing keys, CA roots): one active and one
    prepared row, inserted with ``insert(state)``; ``counter`` moves if any was."""
    states = set(conn.execute(select(table.c.state)).scalars())
    for state in (ACTIVE, PREPARED):
        if state not in states:
            insert(state)
    if not {ACTIVE, PREPARED} <= states:
        meta_store.bump(conn, counter)


def remove_retired(conn: Connection, key: Column[Any], now: float, counter: str) -> list[str]:
    """Retired rows of ``key``'s table whose ``remove_after`` has passed become removed
    and their sealed private key is erased; ``counter`` moves if any did. Returns their
    ids. Inside the caller's transaction."""
    table = key.table
    ids = [
        str(i)
        for i in conn.execute(
            select(key).where(table.c.state == RETIRED, table.c.remove_after <= now)
        ).scalars()
    ]
    if ids:
        conn.execute(
            update(table).where(key.in_(ids)).values(state=REMOVED, removed_at=now, private_key="")
        )
        meta_store.bump(conn, counter)
    return ids


Insert = Callable[[Connection, str, float], str]  # (conn, state, now) -> the new row's id


def oldest_prepared(conn: Connection, key: Column[Any]) -> str | None:
    """The id of the prepared row of ``key``'s table the next rotation makes active."""
    table = key.table
    found = (
        conn.execute(select(key).where(table.c.state == PREPARED).order_by(table.c.created_at, key))
        .scalars()
        .first()
    )
    return None if found is None else str(found)


def promote_prepared(conn: Connection, key: Column[Any], insert: Insert, now: float) -> str:
    """The oldest prepared row (published already) becomes active and a new one is
    prepared; returns the newly active id. Inside the caller's transaction."""
    prepared = oldest_prepared(conn, key)
    if prepared is None:  # never left so by this code; be safe
        prepared = insert(conn, PREPARED, now)
    conn.execute(update(key.table).where(key == prepared).values(state=ACTIVE, activated_at=now))
    insert(conn, PREPARED, now)
    return prepared


def rotate_active(
    db: Database,
    key: Column[Any],
    what: str,
    now: float,
    retired_for: float,
    insert: Insert,
    counter: str,
    *,
    expected_active: str | None = None,
    check_prepared: Callable[[str | None], None] | None = None,
    on_commit: Callable[[Connection, Any, str], None] | None = None,
) -> Any:
    """Prepared -> active, active -> retired (kept ``retired_for`` seconds), and a new
    prepared row in ``key``'s table (rows called ``what`` in errors); returns the new
    active row. With ``expected_active``, rotate only if that row is still active
    (otherwise returns the active row, unchanged). ``check_prepared(oldest prepared
    id)`` may refuse before anything is written.

    The retirement is a compare-and-set (``UPDATE … WHERE id = K AND state =
    'active'``): of two concurrent rotations of K one updates the row and the other
    updates nothing and starts over, so there is always exactly one active row.
    ``on_commit(conn, new active row, previous id)`` runs inside the transaction of a
    rotation that happened; ``counter`` moves with it."""
    table = key.table
    while True:
        with db.engine.begin() as conn:
            current = conn.execute(select(table).where(table.c.state == ACTIVE)).first()
            if current is None:
                raise MasterKeyError(f"no active {what} in the database")
            current_id = str(current._mapping[key])
            if expected_active is not None and current_id != expected_active:
                return current
            if check_prepared is not None:
                check_prepared(oldest_prepared(conn, key))
            retired = conn.execute(
                update(table)
                .where(key == current_id, table.c.state == ACTIVE)
                .values(state=RETIRED, retired_at=now, remove_after=now + retired_for)
            )
            if retired.rowcount != 1:
                conn.rollback()
                continue  # another replica rotated first; look again
            prepared = promote_prepared(conn, key, insert, now)
            meta_store.bump(conn, counter)
            row = conn.execute(select(table).where(key == prepared)).first()
            assert row is not None
            if on_commit is not None:
                on_commit(conn, row, current_id)
            return row


def revoke_row(
    db: Database,
    key: Column[Any],
    what: str,
    row_id: str,
    now: float,
    insert: Insert,
    counter: str,
) -> Any:
    """Unpublish row ``row_id`` of ``key``'s table (rows called ``what``) now and erase its private key. If it
    was the active row, the prepared one (already published) becomes active first; if it
    was the prepared one, a new one is prepared. Returns the revoked row; LookupError if
    there is no such published row."""
    table = key.table
    while True:
        with db.engine.begin() as conn:
            row = conn.execute(select(table).where(key == row_id)).first()
            if row is None or row.state in UNPUBLISHED:
                raise LookupError(f"no published {what} {row_id!r}")
            if row.state == ACTIVE:
                promote_prepared(conn, key, insert, now)
            elif row.state == PREPARED:
                insert(conn, PREPARED, now)
            revoked = conn.execute(
                update(table)
                .where(key == row_id, table.c.state == row.state)
                .values(state=REVOKED, removed_at=now, private_key="")
            )
            if revoked.rowcount != 1:
                conn.rollback()
                continue  # changed under us (a concurrent rotation); look again
            meta_store.bump(conn, counter)
            final = conn.execute(select(table).where(key == row_id)).first()
            assert final is not None
            return final


class KeyManager:
    """Owns the ``signing_keys`` table. Every write bumps ``keys_revision``."""

    def __init__(self, db: Database, master: MasterKey, alg: str = "ES256") -> None:
        if alg not in SUPPORTED_ALGS:
            raise ValueError(
                f"signing algorithm {alg} is not supported (use one of {SUPPORTED_ALGS})"
            )
        self.db = db
        self.master = master
        self.alg = alg

    # -- set-up -------------------------------------------------------------------------
    def check_master_key(self) -> None:
        """Fail fast (with a clear message) if this replica's master key differs from the
        one that sealed the keys already in the database."""
        with self.db.engine.begin() as conn:
            stored = meta_store.insert_if_absent(
                conn, "master_key_check", self.master.seal(b"ok", CHECK_AAD)
            )
        self.master.open(stored, CHECK_AAD)

    def ensure_keys(self, now: float | None = None) -> None:
        """First start: one active and one prepared key."""
        now = time.time() if now is None else now
        with self.db.engine.begin() as conn:
            ensure_pair(conn, signing_keys, lambda state: self._insert(conn, state, now), KEYS)

    def _insert(self, conn: Connection, state: str, now: float) -> str:
        private_key = generate_private_key(self.alg)
        jwk = public_jwk(private_key, self.alg)
        der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        conn.execute(
            signing_keys.insert().values(
                kid=jwk["kid"],
                alg=self.alg,
                state=state,
                public_jwk=json.dumps(jwk, sort_keys=True),
                private_key=self.master.seal(der, jwk["kid"].encode()),
                created_at=now,
                activated_at=now if state == ACTIVE else None,
            )
        )
        return str(jwk["kid"])

    # -- reading ------------------------------------------------------------------------
    def list_keys(self, include_removed: bool = False) -> list[KeyRecord]:
        query = select(signing_keys).order_by(signing_keys.c.created_at)
        if not include_removed:
            query = query.where(signing_keys.c.state.not_in(UNPUBLISHED))
        with self.db.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def load(self) -> KeySet:
        with self.db.engine.connect() as conn:
            revision = int(meta_store.get(conn, meta_store.KEYS_REVISION) or 0)
            rows = list(
                conn.execute(
                    select(signing_keys)
                    .where(signing_keys.c.state.not_in(UNPUBLISHED))
                    .order_by(signing_keys.c.created_at)
                )
            )
        active_rows = [row for row in rows if row.state == ACTIVE]
        if not active_rows:
            raise MasterKeyError("no active signing key in the database")
        row = active_rows[-1]
        der = self.master.open(row.private_key, row.kid.encode())
        private_key = serialization.load_der_private_key(der, password=None)
        assert isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        active = ActiveKey(kid=row.kid, alg=row.alg, private_key=private_key)
        return KeySet(revision=revision, active=active, published=tuple(_record(r) for r in rows))

    # -- life cycle ---------------------------------------------------------------------
    def rotate(
        self,
        now: float | None = None,
        expected_active: str | None = None,
        on_commit: Callable[[Connection, KeyRecord, str], None] | None = None,
    ) -> KeyRecord:
        """Prepared -> active, active -> retired, and a new prepared key. Returns the new
        active key. With ``expected_active``, rotate only if that key is still active
        (automatic rotation: concurrent replicas then rotate once). A compare-and-set,
        see ``rotate_active``. ``on_commit(conn, new active key, previous kid)`` runs
        inside the transaction of a rotation that happened (the audit event is written
        with it)."""
        now = time.time() if now is None else now
        row = rotate_active(
            self.db,
            signing_keys.c.kid,
            "signing key",
            now,
            MAX_TOKEN_TTL + CLOCK_SKEW,
            self._insert,
            KEYS,
            expected_active=expected_active,
            on_commit=None
            if on_commit is None
            else lambda conn, row, previous: on_commit(conn, _record(row), previous),
        )
        return _record(row)

    def revoke(self, kid: str, now: float | None = None) -> KeyRecord:
        """Unpublish ``kid`` now and erase its private key. If it was the active key, the
        prepared key (already in every agent's JWKS) becomes active first. Returns the
        revoked key's record; LookupError if there is no such published key."""
        now = time.time() if now is None else now
        row = revoke_row(self.db, signing_keys.c.kid, "signing key", kid, now, self._insert, KEYS)
        return _record(row)

    def rotate_if_older_than(
        self,
        max_age: float,
        now: float | None = None,
        on_commit: Callable[[Connection, KeyRecord, str], None] | None = None,
    ) -> KeyRecord | None:
        now = time.time() if now is None else now
        with self.db.engine.connect() as conn:
            row = conn.execute(select(signing_keys).where(signing_keys.c.state == ACTIVE)).first()
        if row is None or now - (row.activated_at or row.created_at) < max_age:
            return None
        return self.rotate(now, expected_active=row.kid, on_commit=on_commit)

    def remove_expired(
        self,
        now: float | None = None,
        on_commit: Callable[[Connection, list[str]], None] | None = None,
    ) -> list[str]:
        """Retired keys whose last possible token has expired leave JWKS; their sealed
        private key is erased."""
        now = time.time() if now is None else now
        with self.db.engine.begin() as conn:
            kids = remove_retired(conn, signing_keys.c.kid, now, KEYS)
            if kids and on_commit is not None:
                on_commit(conn, kids)
        return kids

    def active_kid(self, conn: Connection) -> str | None:
        """The kid of the active key, as this transaction sees it."""
        kid: str | None = conn.execute(
            select(signing_keys.c.kid).where(signing_keys.c.state == ACTIVE)
        ).scalar()
        return kid
