"""Revocation and suspension at the control plane (DESIGN §5).

What ``trustmesh revoke`` asks for is checked against the registry and the keys,
written to the revocation list with its audit events in one transaction, and reaches
agents through the revocation stream. ``revoke --cluster`` is about tokens that
originated in a cluster, never about its agents' credentials
(``trustmesh credentials revoke`` is).

``trustmesh suspend`` begins a state (``revocation/suspension.py``): in one transaction
it records the suspension, revokes what was issued (the revocation ``revoke`` would
write: the workload's or SPIFFE ID's tokens, or the cluster's), and for a cluster also
revokes every credential of its agents; each step is an audit event (``admin.suspended``,
``revocation.created``, ``admin.credential_revoked``). ``trustmesh resume`` ends the
state (``admin.resumed``); what was revoked stays revoked, and a revoked agent
credential is replaced by issuing a new one."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidRequest, NotFound, RevocationError, SpiffeIdError
from trustmesh.common.names import USER_PREFIX, person_of
from trustmesh.identity.keys import MAX_TOKEN_TTL, KeyManager
from trustmesh.identity.svid import MAX_PARTNER_SVID_LIFETIME
from trustmesh.identity.x509ca import CaManager
from trustmesh.revocation import Revocation
from trustmesh.revocation.store import RevocationStore
from trustmesh.revocation.suspension import MAX_REASON, SuspensionStore, check_reason
from trustmesh.server.credentials import CredentialRecord, CredentialStore, revoked_detail
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import parse_spiffe_id, trust_domain_of
from trustmesh.storage import Database

KINDS = ("jti", "subject", "workload", "cluster", "key")
ALIASES = {"spiffeId": "subject", "spiffe_id": "subject"}


class Revoker:
    def __init__(
        self,
        store: RevocationStore,
        keys: KeyManager,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        ca: CaManager,
    ) -> None:
        self.store = store
        self.keys = keys
        self.ca = ca
        self.snapshots = snapshots
        self.recorder = recorder

    def _target(self, kind: str, value: str) -> tuple[str, str]:
        """What to record for the request: a workload becomes its SPIFFE ID; the rest
        must name something that exists. A key leaves JWKS here (the prepared key takes
        over if it was the active one)."""
        registry = self.snapshots.registry
        if kind == "workload":  # a Workload, or TEMPLATE/CLUSTER/NAMESPACE/SA
            named = registry.identity_named(value)
            if named is None:
                raise NotFound(f"workload {value} is not registered")
            return "subject", named.spiffe_id
        if kind == "subject" and value.startswith(USER_PREFIX):
            if person_of(value) is None:  # a person's login tokens (identity/login.py)
                raise RevocationError(f"{value[:100]!r} is not user:NAME of a valid person name")
            return kind, value
        if kind == "subject":
            try:
                domain, _ = parse_spiffe_id(value)
            except SpiffeIdError as exc:
                raise RevocationError(str(exc)) from None
            trust_domain = self.snapshots.trust_domain
            if domain != trust_domain and domain not in registry.federation_by_domain:
                raise RevocationError(
                    f"{value} is neither in trust domain {trust_domain} nor in a federated one"
                )
        elif kind == "cluster":
            if value not in registry.clusters:
                raise NotFound(f"cluster {value} is not registered")
        elif kind == "key" and self.snapshots.revocations.latest("key", value) is None:
            try:
                if value in self.snapshots.ca.fingerprints():
                    self.ca.revoke(value)
                else:
                    self.keys.revoke(value)
            except LookupError:
                raise NotFound(f"no published signing key or CA root {value}") from None
        return kind, value

    def revoke(self, kind: str, value: str, reason: str, actor: str) -> tuple[Revocation, bool]:
        """``kind``: jti, subject (a SPIFFE ID of the trust domain or of a federated
        one, or ``user:NAME``: a person's login tokens), workload (its SPIFFE ID is revoked), cluster (registered), key (a published
        kid, or a published CA root's fingerprint: the root leaves the bundle and agents
        refuse what it signed). Returns the entry and whether it is new (repeating a revocation returns the
        one in force). An entry for a federated SPIFFE ID lives as long as the longest
        lifetime accepted of that domain's tokens (``MAX_PARTNER_SVID_LIFETIME``)."""
        root_ids = set(self.snapshots.ca.fingerprints())  # before a root leaves them
        kind, value = self._target(kind, value)
        lifetime = MAX_TOKEN_TTL  # login tokens live at most as long (MAX_LOGIN_TTL)
        if (
            kind == "subject"
            and not value.startswith(USER_PREFIX)
            and trust_domain_of(value) != self.snapshots.trust_domain
        ):
            lifetime = MAX_PARTNER_SVID_LIFETIME

        def record(conn: Connection, entry: Revocation) -> None:
            stage_revocation(self.recorder, conn, entry, actor)
            if entry.kind == "key" and entry.value in root_ids:
                detail = {
                    "kind": "x509-ca",
                    "revoked_root": entry.value,
                    "active_root": self.ca.active_root().id,
                    "reason": "CA root revoked",
                }
                self.recorder.stage(conn, ev.KEY_ROTATED, actor, detail)
            elif entry.kind == "key":
                self.recorder.stage(
                    conn,
                    ev.KEY_ROTATED,
                    actor,
                    {
                        "revoked_kid": entry.value,
                        "active_kid": self.keys.active_kid(conn),
                        "reason": "key revoked",
                    },
                )

        entry, created = self.store.revoke(
            kind, value, reason, actor, on_commit=record, lifetime=lifetime
        )
        self.snapshots.refresh()
        if created:
            self.recorder.drain()
        return entry, created


def stage_revocation(
    recorder: AuditRecorder, conn: Connection, entry: Revocation, actor: str
) -> None:
    """``revocation.created`` inside the transaction that writes ``entry``."""
    recorder.stage(
        conn,
        ev.REVOCATION_CREATED,
        actor,
        {
            "kind": entry.kind,
            "value": entry.value,
            "reason": entry.reason or None,
            "revision": entry.revision,
            "expires_at": ev.now_time(entry.expires_at),
        },
        cluster=entry.value if entry.kind == "cluster" else None,
    )


SUSPENSION_KINDS = ("workload", "subject", "cluster")


class Suspender:
    """``trustmesh suspend|resume`` (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        store: SuspensionStore,
        revocations: RevocationStore,
        credentials: CredentialStore,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        clock: Clock,
        grace: float,
    ) -> None:
        """``grace``: how far ahead of now the suspension's revocation cuts off, so that
        it also covers tokens another replica issues before its next refresh shows it
        the suspension (about one ``refresh_interval``)."""
        self.db = db
        self.store = store
        self.revocations = revocations
        self.credentials = credentials
        self.snapshots = snapshots
        self.recorder = recorder
        self.clock = clock
        self.grace = grace

    def _target(self, kind: str, value: str) -> tuple[str, str]:
        """The revocation (kind, value) that revokes what was issued to the subject; the
        workload or cluster must be registered, the SPIFFE ID in the trust domain."""
        registry = self.snapshots.registry
        if kind == "workload":  # a Workload, or TEMPLATE/CLUSTER/NAMESPACE/SA
            named = registry.identity_named(value)
            if named is None:
                raise NotFound(f"workload {value} is not registered")
            return "subject", named.spiffe_id
        if kind == "cluster":
            if value not in registry.clusters:
                raise NotFound(f"cluster {value} is not registered")
            return "cluster", value
        if kind != "subject":
            raise InvalidRequest("kind must be workload, subject (or spiffeId) or cluster")
        try:
            domain, _ = parse_spiffe_id(value)
        except SpiffeIdError as exc:
            raise InvalidRequest(str(exc)) from None
        if domain != self.snapshots.trust_domain:
            raise InvalidRequest(f"{value} is not in trust domain {self.snapshots.trust_domain}")
        return "subject", value

    def suspend(self, kind: str, value: str, reason: str, actor: str) -> dict[str, Any]:
        """Begin a suspension: ``{"created", "suspension", "revocation",
        "credentials_revoked"}``. Suspending what is suspended changes nothing and
        answers the suspension in force (``created: false``)."""
        check_reason(reason)
        with self.db.engine.begin() as conn:
            result = self.suspend_in(conn, kind, value, reason, actor)
        if result["created"]:
            self.snapshots.refresh()
            self.recorder.drain()
        return result

    def suspend_in(
        self, conn: Connection, kind: str, value: str, reason: str, actor: str
    ) -> dict[str, Any]:
        """:meth:`suspend` inside the caller's transaction (a quarantine records it
        with the finding that asked for it, ``server/analytics.py``); the caller
        refreshes the snapshots and drains the recorder once it commits."""
        revoke_kind, revoke_value = self._target(kind, value)
        now = self.clock()
        suspension, created = self.store.suspend_in(conn, kind, value, reason, actor, now)
        if not created:
            return {"created": False, "suspension": suspension.to_json()}
        why = f"suspended: {reason}" if reason else "suspended"
        entry, new_entry = self.revocations.revoke_in(
            conn,
            revoke_kind,
            revoke_value,
            why[:MAX_REASON],
            actor,
            now + self.grace,
            supersede=True,
        )
        revoked: list[CredentialRecord] = []
        if kind == "cluster":
            revoked = self.credentials.revoke_cluster_in(conn, value, actor, why, now)
        self.recorder.stage(
            conn,
            "admin.suspended",
            actor,
            {
                "kind": kind,
                "value": value,
                "reason": reason or None,
                "revocation_revision": entry.revision,
                "credentials_revoked": [c.id for c in revoked] or None,
            },
            cluster=value if kind == "cluster" else None,
        )
        if new_entry:
            stage_revocation(self.recorder, conn, entry, actor)
        for credential in revoked:
            self.recorder.stage(
                conn,
                "admin.credential_revoked",
                actor,
                revoked_detail(credential, why, "suspend"),
                cluster=credential.cluster,
            )
        return {
            "created": True,
            "suspension": suspension.to_json(),
            "revocation": entry.to_json(),
            "credentials_revoked": [c.id for c in revoked],
        }

    def resume(self, kind: str, value: str, actor: str) -> dict[str, Any]:
        """End a suspension (404 if there is none); what was revoked stays revoked."""
        if kind not in SUSPENSION_KINDS:
            raise InvalidRequest("kind must be workload, subject (or spiffeId) or cluster")
        with self.db.engine.begin() as conn:
            ended = self.store.resume_in(conn, kind, value)
            if ended is None:
                raise NotFound(f"{kind} {value} is not suspended")
            self.recorder.stage(
                conn,
                "admin.resumed",
                actor,
                {
                    "kind": kind,
                    "value": value,
                    "suspended_at": ev.now_time(ended.suspended_at),
                    "suspended_by": ended.actor,
                    "reason": ended.reason or None,
                },
                cluster=value if kind == "cluster" else None,
            )
        self.snapshots.refresh()
        self.recorder.drain()
        return {"resumed": ended.to_json()}

    def listing(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.snapshots.suspensions.entries()]
