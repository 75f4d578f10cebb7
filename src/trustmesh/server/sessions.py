"""Console sessions (DESIGN §12): a person signs in to the web console with their
credential once; their browser then holds a random session id in an HttpOnly,
SameSite=Strict cookie (``routes/console.py``), never the credential.

* Only people sign in: the bootstrap ``admin.token`` and cluster credentials are
  refused (``Forbidden``), as is a secret a rotation replaced (its overlap is for
  running programs to switch over, not for new sessions).
* Only the SHA-256 of the session id is stored (``console_sessions``), so the database
  never holds a usable cookie. Each session has a CSRF token the page sends back in
  ``X-CSRF-Token`` on every change (``routes/_auth.py`` compares it).
* A session ends after ``IDLE`` seconds without a request (30 min), ``ABSOLUTE``
  seconds after sign-in (8 h), on sign-out, and as soon as the credential it was
  opened with stops being that person's current secret: revoked, expired, rotated, or
  the person removed. That is checked on every request, against the credential's row,
  in the same query that finds the session, so it holds on every replica at once.
* ``last_seen`` is written at most every ``SEEN_RESOLUTION`` seconds per session, so a
  busy page is not a write per request.

Times come from the injected clock, so expiry is tested without waiting."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, or_, select, update

from trustmesh.common.clock import Clock
from trustmesh.common.errors import Forbidden, Unauthenticated
from trustmesh.server.credentials import PERSON, CredentialStore, Principal
from trustmesh.storage import Database
from trustmesh.storage.schema import console_sessions, credentials

IDLE = 30 * 60.0  # seconds without a request after which a session ends
ABSOLUTE = 8 * 3600.0  # seconds after sign-in after which a session ends, however used
SEEN_RESOLUTION = 15.0  # seconds: last_seen is written at most this often per session
MAX_SESSION_ID = 100  # characters: a longer cookie value is no session of ours


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """A live session as the console sees it (never its id, which only the cookie holds)."""

    credential_id: str
    person: str
    role: str
    csrf: str
    created_at: float
    last_seen: float
    expires_at: float  # the absolute end

    def principal(self) -> Principal:
        """Who acts through this session: the person, as their credential would."""
        return Principal(
            kind=PERSON, credential_id=self.credential_id, person=self.person, person_role=self.role
        )

    def ends_at(self, idle: float) -> float:
        """When it ends if no request comes first."""
        return min(self.expires_at, self.last_seen + idle)

    def to_json(self, idle: float) -> dict[str, Any]:
        """``GET /console/session``: who, which role, the CSRF token, when it ends."""
        return {
            "person": self.person,
            "role": self.role,
            "csrf": self.csrf,
            "expiresAt": self.ends_at(idle),
            "absoluteExpiresAt": self.expires_at,
        }


class SessionStore:
    def __init__(
        self,
        db: Database,
        credential_store: CredentialStore,
        clock: Clock,
        idle: float = IDLE,
        absolute: float = ABSOLUTE,
    ) -> None:
        self.db = db
        self.credentials = credential_store
        self.clock = clock
        self.idle = idle
        self.absolute = absolute

    def begin(self, secret: str) -> tuple[str, Session]:
        """Sign in with a person's credential: the new session's id (for the cookie
        only) and the session. Unauthenticated for a credential that is not valid;
        Forbidden for one that is not a person's."""
        if not isinstance(secret, str) or not secret.strip():
            raise Unauthenticated("give your personal credential (trustmesh user add NAME)")
        principal = self.credentials.authenticate(secret.strip())
        if principal is None:
            raise Unauthenticated("credential is not valid (unknown, expired or revoked)")
        if principal.kind != PERSON or principal.person is None or principal.role is None:
            what = (
                "a cluster's agent credential" if principal.cluster else "the bootstrap admin.token"
            )
            raise Forbidden(
                f"the console signs in people only, and this is {what}; sign in with a "
                "personal credential (trustmesh user add NAME --role ROLE)"
            )
        digest = _sha256(secret.strip())
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(
            credential_id=principal.credential_id,
            person=principal.person,
            role=principal.role,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            last_seen=now,
            expires_at=now + self.absolute,
        )
        with self.db.engine.begin() as conn:
            current = conn.execute(
                select(credentials.c.secret_hash).where(credentials.c.id == principal.credential_id)
            ).scalar()
            if current != digest:
                raise Unauthenticated(
                    "this secret was replaced by a rotation; sign in with the new one"
                )
            self._forget_ended(conn, now)
            conn.execute(
                console_sessions.insert().values(
                    id_sha256=_sha256(session_id),
                    credential_id=session.credential_id,
                    credential_sha256=digest,
                    person=session.person,
                    csrf=session.csrf,
                    created_at=now,
                    last_seen=now,
                    expires_at=session.expires_at,
                )
            )
        return session_id, session

    def resume(self, session_id: str, touch: bool = True) -> Session | None:
        """The live session the cookie names, its ``last_seen`` moved to now (unless
        ``touch`` is false: the event stream's checks are no use by the person); None
        if there is none (never was, signed out, idle too long, past its absolute end,
        or its credential is no longer the person's current one). An ended session's
        row is deleted."""
        if not session_id or len(session_id) > MAX_SESSION_ID:
            return None
        key = _sha256(session_id)
        s, c = console_sessions.c, credentials.c
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(
                    s.credential_id,
                    s.credential_sha256,
                    s.person,
                    s.csrf,
                    s.created_at,
                    s.last_seen,
                    s.expires_at,
                    c.kind,
                    c.secret_hash,
                    c.role,
                    c.person.label("credential_person"),
                    c.revoked_at,
                    c.expires_at.label("credential_expires_at"),
                )
                .select_from(console_sessions.outerjoin(credentials, c.id == s.credential_id))
                .where(s.id_sha256 == key)
            ).first()
        if row is None:
            return None
        now = self.clock()
        live = (
            now < row.expires_at
            and now - row.last_seen < self.idle
            and row.kind == PERSON
            and row.secret_hash == row.credential_sha256
            and row.credential_person == row.person
            and row.revoked_at is None
            and (row.credential_expires_at is None or now < row.credential_expires_at)
        )
        if not live:
            self._delete(key)
            return None
        last_seen = row.last_seen
        if touch and now - last_seen >= SEEN_RESOLUTION:
            last_seen = now
            with self.db.engine.begin() as conn:
                conn.execute(
                    update(console_sessions)
                    .where(console_sessions.c.id_sha256 == key)
                    .values(last_seen=now)
                )
        return Session(
            credential_id=row.credential_id,
            person=row.person,
            role=row.role,
            csrf=row.csrf,
            created_at=row.created_at,
            last_seen=last_seen,
            expires_at=row.expires_at,
        )

    def end(self, session_id: str) -> None:
        """Sign out: the session's row is deleted (nothing if there is none)."""
        if session_id and len(session_id) <= MAX_SESSION_ID:
            self._delete(_sha256(session_id))

    def _delete(self, key: str) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.id_sha256 == key))

    def _forget_ended(self, conn: Any, now: float) -> None:
        """Rows of sessions past their absolute end or idle too long (on each sign-in,
        so the table holds only about the sessions that may still be used)."""
        conn.execute(
            delete(console_sessions).where(
                or_(
                    console_sessions.c.expires_at <= now,
                    console_sessions.c.last_seen <= now - self.idle,
                )
            )
        )
