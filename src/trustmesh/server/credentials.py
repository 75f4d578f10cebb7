"""Bearer credentials for the control plane's own APIs, and their life cycle (DESIGN §7,
§11 "People and credentials").

* the **bootstrap** admin credential (kind ``admin``, written to
  ``<data-dir>/admin.token`` on first start): it acts as ``user:bootstrap`` with the
  admin role while no live admin person exists, and is refused, with a message saying
  why, once one does (it works again if every admin person is removed or expired, so
  the operator is never locked out);
* **person** credentials (``trustmesh user add NAME --role ROLE``), one live credential
  per person: the person acts as ``user:NAME`` with one role (``ROLES``);
* **cluster** credentials (``trustmesh cluster credential NAME [--agent ID]``), one per
  agent instance: each lets that one agent act for its one cluster (fetch the
  cluster's bundle, the JWKS and revocations, send its audit events). The agent id is
  part of the credential's identity: it names the agent in ``get clusters`` and keys
  the audit source the agent writes (``audit/log.py``), so no other credential can
  claim or collide with that source. Two live credentials never share one
  (cluster, agent).

Every credential can be listed (with its last use), given an expiry, rotated and
revoked. A **rotation** keeps the credential (its id, cluster and agent) and gives it a
new secret that works at once, while the replaced secret keeps working for a stated
overlap (default one hour) and then stops; rotating again inside the overlap ends the
older secret at once (a credential holds at most two secrets). A **revocation** stops
every secret of the credential at once. The last live admin credential cannot be
revoked (rotate it instead), so the control plane always has an administrator; and
if none is live when a replica starts (every admin person expired, the bootstrap
revoked), a new bootstrap credential is written to ``admin.token``.

This module is the one place that maps a credential to who acts and with which role
(:class:`Principal`); routes declare the role they need (``routes/_auth.py``).

Secrets are 256 random bits; only their SHA-256 is stored, so the database never holds
a usable credential. Authentication is one indexed lookup on the hash per request, so a
revocation or expiry takes effect on the next request on every replica. The last use is
written at most once a minute per credential and replica (``LAST_USE_RESOLUTION``), so
authentication is not a write per request."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Conflict, InvalidRequest, NotFound, Unauthenticated
from trustmesh.common.files import write_atomically
from trustmesh.common.names import PERSON_NAME, PERSON_NAME_RULE
from trustmesh.revocation.suspension import check_reason
from trustmesh.server.recorder import AuditRecorder
from trustmesh.storage import Database
from trustmesh.storage.schema import credentials

log = logging.getLogger("trustmesh.server")

ADMIN = "admin"  # the kind of the bootstrap credential, and the role that changes things
CLUSTER = "cluster"
PERSON = "person"
_PREFIX = {ADMIN: "tma", CLUSTER: "tmc", PERSON: "tmu"}

# A person's role: admins change the registry, policy and credentials; approvers read
# and decide access requests; auditors read everything (audit included), change nothing.
APPROVER = "approver"
AUDITOR = "auditor"
ROLES = (ADMIN, APPROVER, AUDITOR)
READERS = frozenset(ROLES)
BOOTSTRAP = "bootstrap"  # the name the bootstrap credential acts under
MAX_SECRET = 200
LAST_USE_RESOLUTION = 60.0  # seconds: the last use is written at most this often
DEFAULT_OVERLAP = 3600  # seconds the replaced secret keeps working after a rotation
MAX_OVERLAP = 7 * 86400
MAX_LIFETIME = 10 * 365 * 86400  # seconds: the furthest expiry a credential may be given
CREDENTIAL_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"


@dataclass(frozen=True)
class Principal:
    """Who called an admin or agent endpoint."""

    kind: str
    credential_id: str
    cluster: str | None = None
    agent: str | None = None
    person: str | None = None
    person_role: str | None = None

    @property
    def name(self) -> str:
        """The audit ``actor`` and policy author: ``user:NAME`` or ``cluster:NAME``."""
        if self.kind == CLUSTER:
            return f"cluster:{self.cluster}"
        return f"user:{self.person if self.kind == PERSON else BOOTSTRAP}"

    @property
    def role(self) -> str | None:
        """A person's role (the bootstrap credential's is admin); None for a cluster."""
        if self.kind == ADMIN:
            return ADMIN
        return self.person_role if self.kind == PERSON else None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_act_for(self, cluster: str) -> bool:
        return self.is_admin or self.cluster == cluster


@dataclass(frozen=True)
class CredentialRecord:
    """A credential as listed: never its secret, nor a hash of it."""

    id: str
    kind: str
    cluster: str | None
    agent: str | None
    person: str | None
    role: str | None
    created_at: float
    created_by: str
    expires_at: float | None
    last_used_at: float | None
    rotated_at: float | None
    previous_until: float | None
    revoked_at: float | None
    revoked_by: str | None
    revoke_reason: str | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return EXPIRED
        return ACTIVE

    def to_json(self, now: float) -> dict[str, Any]:
        overlap = self.previous_until
        return {
            "id": self.id,
            "kind": self.kind,
            "cluster": self.cluster,
            "agent": self.agent,
            "person": self.person,
            "role": self.role,
            "state": self.state(now),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "rotated_at": self.rotated_at,
            "previous_valid_until": overlap if overlap is not None and overlap > now else None,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }


def _record(row: Any) -> CredentialRecord:
    return CredentialRecord(
        id=row.id,
        kind=row.kind,
        cluster=row.cluster,
        agent=row.agent,
        person=row.person,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        rotated_at=row.rotated_at,
        previous_until=row.previous_until,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
    )


def _owner(kind: str, person: str | None, cluster: str | None, agent: str | None) -> str:
    if kind == CLUSTER:
        return f"agent {agent} of cluster {cluster}"
    return f"user:{person if kind == PERSON else BOOTSTRAP}"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret(kind: str, credential_id: str) -> str:
    return f"{_PREFIX[kind]}_{credential_id}_{secrets.token_urlsafe(32)}"


def check_agent_id(agent: str) -> str:
    if not isinstance(agent, str) or not ev.AGENT_ID.fullmatch(agent):
        raise InvalidRequest(
            "agent must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return agent


def check_person(name: Any) -> str:
    """A person's name: a safe identifier (it appears as ``user:NAME`` in the audit log
    and in policy versions)."""
    if not isinstance(name, str) or not PERSON_NAME.fullmatch(name):
        shown = repr(name[:64]) if isinstance(name, str) else "that"
        raise InvalidRequest(f"person name {shown} is not valid: {PERSON_NAME_RULE}")
    if name == BOOTSTRAP:
        raise InvalidRequest(f"{BOOTSTRAP!r} is reserved for the bootstrap admin.token")
    return name


def check_role(role: Any) -> str:
    if role not in ROLES:
        shown = repr(role[:32]) if isinstance(role, str) else "that"
        raise InvalidRequest(f"unknown role {shown} (roles: {', '.join(ROLES)})")
    return str(role)


def check_seconds(value: Any, name: str, low: int, high: int) -> int:
    """A JSON integer of seconds in [low, high] (booleans, fractions, strings refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a whole number of seconds from {low} to {high}")
    return value


def _live(now: float) -> Any:
    return (credentials.c.revoked_at.is_(None)) & (
        credentials.c.expires_at.is_(None) | (credentials.c.expires_at > now)
    )


def _admin_person() -> Any:
    return (credentials.c.kind == PERSON) & (credentials.c.role == ADMIN)


def _admin_capable() -> Any:
    """The bootstrap credential or an admin person's."""
    return (credentials.c.kind == ADMIN) | _admin_person()


Issued = Callable[[Connection, CredentialRecord, str], None]
Revoked = Callable[[Connection, CredentialRecord], None]


class CredentialStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock
        self._touched: dict[str, float] = {}  # credential id -> last use written (clock)
        self._lock = threading.Lock()

    # -- issuing and authenticating --------------------------------------------------------
    def create(
        self,
        kind: str,
        created_by: str,
        cluster: str | None = None,
        agent: str | None = None,
        expires_at: float | None = None,
        on_commit: Issued | None = None,
        person: str | None = None,
        role: str | None = None,
    ) -> tuple[CredentialRecord, str]:
        """A new credential and its secret; only the secret's hash is stored. A cluster
        credential is for one agent instance (``agent``; default: the credential's own
        id); Conflict if a live credential has that (cluster, agent) already. A person's
        credential (``person``, ``role``): Conflict if the name has an unrevoked one.
        ``on_commit(conn, record, secret)`` runs inside the transaction (the audit
        event, which holds a hash, is written with it)."""
        now = self.clock()
        credential_id = secrets.token_hex(8)
        if kind == CLUSTER:
            agent = credential_id if agent is None else check_agent_id(agent)
        secret = _new_secret(kind, credential_id)
        try:
            return self._insert(
                kind, credential_id, secret, created_by, cluster, agent, expires_at,
                on_commit, person, role, now,
            )  # fmt: skip
        except IntegrityError:
            if kind != PERSON:
                raise
            raise Conflict(f"person {person} exists already (added meanwhile)") from None

    def _insert(
        self,
        kind: str,
        credential_id: str,
        secret: str,
        created_by: str,
        cluster: str | None,
        agent: str | None,
        expires_at: float | None,
        on_commit: Issued | None,
        person: str | None,
        role: str | None,
        now: float,
    ) -> tuple[CredentialRecord, str]:
        with self.db.engine.begin() as conn:
            if kind == CLUSTER:
                clash = conn.execute(
                    select(credentials.c.id).where(
                        credentials.c.cluster == cluster,
                        credentials.c.agent == agent,
                        _live(now),
                    )
                ).first()
                if clash is not None:
                    raise Conflict(
                        f"agent {agent} of cluster {cluster} has a live credential ({clash.id}): "
                        "rotate it (trustmesh credentials rotate) or revoke it first"
                    )
            if kind == PERSON:
                self._refuse_duplicate(conn, str(person))
            conn.execute(
                credentials.insert().values(
                    id=credential_id,
                    kind=kind,
                    cluster=cluster,
                    agent=agent,
                    secret_hash=_hash(secret),
                    created_at=now,
                    created_by=created_by,
                    expires_at=expires_at,
                    person=person,
                    role=role,
                )
            )
            record = self._get(conn, credential_id)
            if on_commit is not None:
                on_commit(conn, record, secret)
        return record, secret

    @staticmethod
    def _refuse_duplicate(conn: Connection, person: str) -> None:
        clash = conn.execute(
            select(credentials.c.id).where(
                credentials.c.person == person, credentials.c.revoked_at.is_(None)
            )
        ).first()
        if clash is not None:
            raise Conflict(
                f"person {person} exists already (credential {clash.id}); remove it first "
                "(trustmesh user remove) or rotate its credential (trustmesh credentials rotate)"
            )

    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a live secret: the credential's current secret, or the
        replaced one within its overlap; None for an unknown secret. A revoked or
        expired credential, a replaced secret past its overlap, and the bootstrap
        credential while a live admin person exists are refused with Unauthenticated
        saying which."""
        if len(secret) > MAX_SECRET:
            return None
        digest = _hash(secret)
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(
                    credentials.c.id,
                    credentials.c.kind,
                    credentials.c.cluster,
                    credentials.c.agent,
                    credentials.c.person,
                    credentials.c.role,
                    credentials.c.secret_hash,
                    credentials.c.previous_until,
                    credentials.c.expires_at,
                    credentials.c.revoked_at,
                ).where(
                    or_(credentials.c.secret_hash == digest, credentials.c.previous_hash == digest)
                )
            ).first()
        now = self.clock()
        if row is None:
            return None
        # The caller holds this secret: telling them why it stopped is no disclosure.
        owner = _owner(row.kind, row.person, row.cluster, row.agent)
        if row.revoked_at is not None:
            raise Unauthenticated(
                f"credential {row.id} ({owner}) was revoked at {ev.now_time(row.revoked_at)}; "
                "ask an admin for a new one"
            )
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated(
                f"credential {row.id} ({owner}) expired at {ev.now_time(row.expires_at)}; "
                "ask an admin for a new one"
            )
        if row.secret_hash != digest and not (
            row.previous_until is not None and now < row.previous_until
        ):
            raise Unauthenticated(
                f"this secret of credential {row.id} ({owner}) was replaced by a rotation and "
                "its overlap has ended; use the new secret"
            )
        if row.kind == ADMIN:
            admin = self.live_admin_person(now)
            if admin is not None:
                raise Unauthenticated(
                    f"the bootstrap admin.token is for the first start only and stopped "
                    f"working once an admin person existed (user:{admin}); use a personal "
                    "credential (trustmesh user add)"
                )
        self._touch(row.id, now)
        return Principal(
            kind=row.kind,
            credential_id=row.id,
            cluster=row.cluster,
            agent=row.agent,
            person=row.person,
            person_role=row.role,
        )

    def live_admin_person(self, now: float) -> str | None:
        """The name of a live admin person (the first by name), if there is one."""
        with self.db.engine.connect() as conn:
            found = conn.execute(
                select(credentials.c.person)
                .where(_admin_person(), _live(now))
                .order_by(credentials.c.person)
                .limit(1)
            ).first()
        return None if found is None else str(found.person)

    def _touch(self, credential_id: str, now: float) -> None:
        """Record the last use, at most once per ``LAST_USE_RESOLUTION`` per credential
        on this replica; a failure to record it never fails the request."""
        with self._lock:
            if now - self._touched.get(credential_id, float("-inf")) < LAST_USE_RESOLUTION:
                return
            self._touched[credential_id] = now
        try:
            with self.db.engine.begin() as conn:
                conn.execute(
                    update(credentials)
                    .where(credentials.c.id == credential_id)
                    .values(last_used_at=now)
                )
        except SQLAlchemyError as exc:
            log.warning("could not record the last use of credential %s: %s", credential_id, exc)

    # -- reading ------------------------------------------------------------------------------
    def _get(self, conn: Connection, credential_id: str) -> CredentialRecord:
        row = conn.execute(select(credentials).where(credentials.c.id == credential_id)).first()
        if row is None:
            raise NotFound(f"no credential {credential_id}")
        return _record(row)

    def get(self, credential_id: str) -> CredentialRecord:
        if not CREDENTIAL_ID.fullmatch(credential_id):
            raise NotFound(f"no credential {credential_id[:40]!r}")
        with self.db.engine.connect() as conn:
            return self._get(conn, credential_id)

    def records(
        self, cluster: str | None = None, kind: str | None = None
    ) -> list[CredentialRecord]:
        query = select(credentials).order_by(
            credentials.c.kind,
            credentials.c.cluster,
            credentials.c.agent,
            credentials.c.person,
            credentials.c.created_at,
        )
        if cluster is not None:
            query = query.where(credentials.c.cluster == cluster)
        if kind is not None:
            query = query.where(credentials.c.kind == kind)
        with self.db.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    # -- rotation and revocation ---------------------------------------------------------------
    def rotate(
        self, credential_id: str, overlap: int, on_commit: Issued | None = None
    ) -> tuple[CredentialRecord, str]:
        """A new secret for the credential, valid at once; the current one stays valid
        for ``overlap`` seconds (0: it stops now). Conflict for a revoked or expired
        credential (issue a new one)."""
        now = self.clock()
        current = self.get(credential_id)
        if current.state(now) != ACTIVE:
            raise Conflict(
                f"credential {credential_id} is {current.state(now)}; a {current.state(now)} "
                "credential cannot be rotated (issue a new one)"
            )
        secret = _new_secret(current.kind, credential_id)
        with self.db.engine.begin() as conn:
            changed = conn.execute(
                update(credentials)
                .where(credentials.c.id == credential_id, credentials.c.revoked_at.is_(None))
                .values(
                    previous_hash=credentials.c.secret_hash,
                    previous_until=now + overlap,
                    secret_hash=_hash(secret),
                    rotated_at=now,
                )
            ).rowcount
            if changed != 1:
                raise Conflict(f"credential {credential_id} was revoked meanwhile")
            record = self._get(conn, credential_id)
            if on_commit is not None:
                on_commit(conn, record, secret)
        return record, secret

    def revoke(
        self, credential_id: str, actor: str, reason: str, on_commit: Revoked | None = None
    ) -> tuple[CredentialRecord, bool]:
        """Stop every secret of the credential now; returns the record and whether this
        call revoked it (a revoked credential stays revoked, unchanged)."""
        current = self.get(credential_id)
        if current.revoked_at is not None:
            return current, False
        now = self.clock()
        with self.db.engine.begin() as conn:
            self._keep_an_admin(conn, current, now)
            revoked = self.revoke_in(conn, [credential_id], actor, reason, now)
            if not revoked:
                return self._get(conn, credential_id), False
            if on_commit is not None:
                on_commit(conn, revoked[0])
        return revoked[0], True

    @staticmethod
    def _keep_an_admin(conn: Connection, current: CredentialRecord, now: float) -> None:
        """Conflict if revoking ``current`` would leave no live admin credential (the
        bootstrap's or an admin person's)."""
        if not (current.kind == ADMIN or (current.kind == PERSON and current.role == ADMIN)):
            return
        if current.state(now) != ACTIVE:  # an expired one leaves nobody without access
            return
        others = conn.execute(
            select(credentials.c.id).where(
                _admin_capable(), credentials.c.id != current.id, _live(now)
            )
        ).first()
        if others is None:
            owner = f"user:{current.person}" if current.kind == PERSON else "the bootstrap"
            raise Conflict(
                f"credential {current.id} ({owner}) is the last live admin credential; "
                "add another admin first (trustmesh user add NAME --role admin) or rotate it "
                "(trustmesh credentials rotate)"
            )

    def person_credential(self, person: str) -> CredentialRecord:
        """The person's unrevoked credential; NotFound if there is none."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(credentials).where(
                    credentials.c.kind == PERSON,
                    credentials.c.person == person,
                    credentials.c.revoked_at.is_(None),
                )
            ).first()
        if row is None:
            raise NotFound(f"no person {person[:64]!r} (trustmesh user list)")
        return _record(row)

    def revoke_cluster_in(
        self, conn: Connection, cluster: str, actor: str, reason: str, now: float
    ) -> list[CredentialRecord]:
        """Revoke every unrevoked credential of ``cluster``'s agents inside the caller's
        transaction (a suspended cluster); returns those it revoked."""
        ids = list(
            conn.execute(
                select(credentials.c.id).where(
                    credentials.c.kind == CLUSTER,
                    credentials.c.cluster == cluster,
                    credentials.c.revoked_at.is_(None),
                )
            ).scalars()
        )
        return self.revoke_in(conn, ids, actor, reason, now)

    def revoke_in(
        self, conn: Connection, ids: list[str], actor: str, reason: str, now: float
    ) -> list[CredentialRecord]:
        revoked = []
        for credential_id in ids:
            changed = conn.execute(
                update(credentials)
                .where(credentials.c.id == credential_id, credentials.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=actor[:200], revoke_reason=reason)
            ).rowcount
            if changed == 1:
                revoked.append(self._get(conn, credential_id))
        return revoked

    # -- the first admin credential -----------------------------------------------------------
    def ensure_admin(self, token_path: Path) -> bool:
        """On first start, create the bootstrap admin credential and write it (mode
        0600). Returns whether one was created. Later starts (and other replicas) leave
        it alone, unless no admin credential is live any more (every admin person
        expired and the bootstrap revoked): then a new bootstrap credential is written,
        so the operator is never locked out."""
        now = self.clock()
        with self.db.engine.connect() as conn:
            first = conn.execute(
                select(credentials.c.id).where(credentials.c.kind == ADMIN)
            ).first()
            live = conn.execute(
                select(credentials.c.id).where(_admin_capable(), _live(now))
            ).first()
        if live is not None:
            return False
        if first is not None:
            log.warning(
                "no admin credential is live (every admin person expired or removed and the "
                "bootstrap revoked): writing a new bootstrap credential to %s",
                token_path,
            )
        created_by = "first start" if first is None else "start without a live admin"
        _, secret = self.create(ADMIN, created_by=created_by)
        write_atomically(token_path, secret + "\n")
        return True


# -- audited administration ------------------------------------------------------------------
def issued_detail(record: CredentialRecord, secret: str) -> dict[str, Any]:
    """What ``admin.credential_issued|rotated`` records: ids and a hash, never the secret."""
    return {
        "kind": record.kind,
        "credential_id": record.id,
        "agent": record.agent,
        "expires_at": ev.now_time(record.expires_at) if record.expires_at else None,
        "credential_sha256": ev.token_sha256(secret),
    }


class CredentialAdmin:
    """``trustmesh credentials list|rotate|revoke``: each change is an audit event staged
    in the change's own transaction (``admin.credential_rotated``,
    ``admin.credential_revoked``), as ``admin.credential_issued`` is."""

    def __init__(self, store: CredentialStore, recorder: AuditRecorder) -> None:
        self.store = store
        self.recorder = recorder

    def listing(self, cluster: str | None = None) -> list[dict[str, Any]]:
        now = self.store.clock()
        return [record.to_json(now) for record in self.store.records(cluster)]

    # -- people -------------------------------------------------------------------------------
    def add_person(
        self, name: str, role: str, actor: str, expires_in: int | None = None
    ) -> tuple[CredentialRecord, str]:
        """``trustmesh user add``: a person and their credential (``admin.user_added``,
        which records its id and hash, never the secret)."""
        check_person(name)
        check_role(role)
        expires_at = None if expires_in is None else self.store.clock() + expires_in

        def record(conn: Connection, credential: CredentialRecord, secret: str) -> None:
            self.recorder.stage(
                conn,
                "admin.user_added",
                actor,
                {**issued_detail(credential, secret), "person": name, "role": role},
            )

        added = self.store.create(
            PERSON,
            created_by=actor,
            expires_at=expires_at,
            on_commit=record,
            person=name,
            role=role,
        )
        self.recorder.drain()
        return added

    def people(self) -> list[dict[str, Any]]:
        """Every person with an unrevoked credential (expired ones included, marked)."""
        now = self.store.clock()
        return [
            record.to_json(now)
            for record in self.store.records(kind=PERSON)
            if record.revoked_at is None
        ]

    def remove_person(self, name: str, actor: str, reason: str) -> CredentialRecord:
        """``trustmesh user remove``: the person's credential is revoked now
        (``admin.user_removed``); refused for the last live admin."""
        check_reason(reason)
        current = self.store.person_credential(check_person(name))

        def record(conn: Connection, credential: CredentialRecord) -> None:
            self.recorder.stage(
                conn,
                "admin.user_removed",
                actor,
                {
                    **revoked_detail(credential, reason, "user remove"),
                    "person": name,
                    "role": credential.role,
                },
            )

        removed, _ = self.store.revoke(current.id, actor, reason, on_commit=record)
        self.recorder.drain()
        return removed

    def rotate(
        self, credential_id: str, actor: str, overlap: int = DEFAULT_OVERLAP
    ) -> tuple[CredentialRecord, str]:
        def record(conn: Connection, credential: CredentialRecord, secret: str) -> None:
            self.recorder.stage(
                conn,
                "admin.credential_rotated",
                actor,
                {
                    **issued_detail(credential, secret),
                    "overlap_seconds": overlap,
                    "previous_valid_until": ev.now_time(credential.previous_until),
                },
                cluster=credential.cluster,
            )

        rotated = self.store.rotate(credential_id, overlap, on_commit=record)
        self.recorder.drain()
        return rotated

    def revoke(self, credential_id: str, actor: str, reason: str) -> tuple[CredentialRecord, bool]:
        check_reason(reason)

        def record(conn: Connection, credential: CredentialRecord) -> None:
            self.recorder.stage(
                conn,
                "admin.credential_revoked",
                actor,
                revoked_detail(credential, reason, "credentials revoke"),
                cluster=credential.cluster,
            )

        revoked = self.store.revoke(credential_id, actor, reason, on_commit=record)
        if revoked[1]:
            self.recorder.drain()
        return revoked


def revoked_detail(record: CredentialRecord, reason: str, via: str) -> dict[str, Any]:
    return {
        "kind": record.kind,
        "credential_id": record.id,
        "agent": record.agent,
        "reason": reason or None,
        "via": via,
    }
