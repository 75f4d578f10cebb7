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
* Sign-in and sign-out are audit events (``admin.console_signed_in``,
  ``admin.console_signed_out``), staged in the transaction that creates or deletes the
  session: actor the person, ``detail.session`` the first 16 hex digits of the session
  id's SHA-256 (never the id, the cookie or the credential). A sign-in refused to a
  caller who holds a live credential that may not sign in (the bootstrap token, a
  cluster's, a secret a rotation replaced) is ``admin.console_signin_refused``, actor
  that principal. A refusal of an unknown, expired or revoked credential proves nothing
  about the caller, so it goes the way of refused exchanges (:meth:`sign_in`): one
  ``token.exchange_failed`` with ``request.surface`` ``console``, under the same
  per-source quota and window, the rest folded into ``audit.refusals_folded``; an
  unauthenticated caller cannot grow the log faster than by refused exchanges.

Times come from the injected clock, so expiry is tested without waiting."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, or_, select, update

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Forbidden, InvalidToken, TrustmeshError, Unauthenticated
from trustmesh.server.credentials import PERSON, CredentialStore, Principal
from trustmesh.server.recorder import AuditRecorder
from trustmesh.storage import Database
from trustmesh.storage.schema import console_sessions, credentials

IDLE = 30 * 60.0  # seconds without a request after which a session ends
ABSOLUTE = 8 * 3600.0  # seconds after sign-in after which a session ends, however used
SEEN_RESOLUTION = 15.0  # seconds: last_seen is written at most this often per session
MAX_SESSION_ID = 100  # characters: a longer cookie value is no session of ours
SESSION_REF = 16  # hex digits of the session id's SHA-256 an audit event names it by
SURFACE = "console"  # request.surface of a refused sign-in's token.exchange_failed


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def session_ref(key: str) -> str:
    """How audit events name a session: a prefix of the SHA-256 the database keys it
    by (``key``), enough to find its row, useless as a cookie."""
    return key[:SESSION_REF]


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
        recorder: AuditRecorder,
        clock: Clock,
        idle: float = IDLE,
        absolute: float = ABSOLUTE,
    ) -> None:
        self.db = db
        self.credentials = credential_store
        self.recorder = recorder
        self.clock = clock
        self.idle = idle
        self.absolute = absolute

    async def sign_in(self, secret: str, peer: str | None) -> tuple[str, Session]:
        """:meth:`begin` off the event loop; a refusal of a credential that is not
        valid (``InvalidToken``) is recorded as a refused exchange from ``peer`` (the
        caller's address), individually or folded."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.begin, secret)
        except InvalidToken as exc:
            self.recorder.exchange_refused(
                exc.error, exc.description, None, peer, None, None, surface=SURFACE
            )
            raise

    def begin(self, secret: str) -> tuple[str, Session]:
        """Sign in with a person's credential: the new session's id (for the cookie
        only) and the session, and its ``admin.console_signed_in`` event. InvalidToken
        for a credential that is not valid (recorded by :meth:`sign_in`); Forbidden for
        one that is not a person's, Unauthenticated for a secret a rotation replaced
        (both recorded here, ``admin.console_signin_refused``)."""
        if not isinstance(secret, str) or not secret.strip():
            raise InvalidToken(
                "no_credential", "give your personal credential (trustmesh user add NAME)"
            )
        try:
            principal = self.credentials.authenticate(secret.strip())
        except Unauthenticated as exc:  # revoked or expired: says nothing of the caller
            raise InvalidToken("credential_not_valid", exc.description) from None
        if principal is None:
            raise InvalidToken(
                "unknown_credential", "credential is not valid (unknown, expired or revoked)"
            )
        if principal.kind != PERSON or principal.person is None or principal.role is None:
            what = (
                "a cluster's agent credential" if principal.cluster else "the bootstrap admin.token"
            )
            self._refused(principal, "not_a_person")
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
                refused: TrustmeshError | None = Unauthenticated(
                    "this secret was replaced by a rotation; sign in with the new one"
                )
            else:
                refused = None
                self._forget_ended(conn, now)
                self._insert(conn, session_id, session, digest)
        if refused is not None:
            self._refused(principal, "secret_replaced")
            raise refused
        self.recorder.drain()
        return session_id, session

    def _insert(self, conn: Any, session_id: str, session: Session, digest: str) -> None:
        """The session's row and its ``admin.console_signed_in`` event (staged: both
        commit or neither does)."""
        key = _sha256(session_id)
        conn.execute(
            console_sessions.insert().values(
                id_sha256=key,
                credential_id=session.credential_id,
                credential_sha256=digest,
                person=session.person,
                csrf=session.csrf,
                created_at=session.created_at,
                last_seen=session.last_seen,
                expires_at=session.expires_at,
            )
        )
        self.recorder.stage(
            conn,
            ev.CONSOLE_SIGNED_IN,
            session.principal().name,
            {
                "session": session_ref(key),
                "role": session.role,
                "credential_id": session.credential_id,
                "expires_at": ev.now_time(session.expires_at),
            },
        )

    def _refused(self, principal: Principal, reason: str) -> None:
        """A live credential that may not sign in (nothing changed: written now)."""
        self.recorder.write_admin(
            ev.CONSOLE_SIGNIN_REFUSED,
            principal.name,
            {"reason": reason, "kind": principal.kind, "credential_id": principal.credential_id},
        )

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
        """Sign out: the session's row is deleted with its ``admin.console_signed_out``
        event (nothing if there is none)."""
        if not session_id or len(session_id) > MAX_SESSION_ID:
            return
        key = _sha256(session_id)
        s = console_sessions.c
        with self.db.engine.begin() as conn:
            row = conn.execute(
                select(s.person, s.credential_id, s.created_at).where(s.id_sha256 == key)
            ).first()
            if row is None:
                return
            conn.execute(delete(console_sessions).where(s.id_sha256 == key))
            self.recorder.stage(
                conn,
                ev.CONSOLE_SIGNED_OUT,
                f"user:{row.person}",
                {
                    "session": session_ref(key),
                    "credential_id": row.credential_id,
                    "signed_in_at": ev.now_time(row.created_at),
                },
            )
        self.recorder.drain()

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
