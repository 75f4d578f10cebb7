"""Revocation at the control plane (DESIGN §5): what ``trustmesh revoke`` asks for is
checked against the registry and the keys, written to the revocation list with its
audit events in one transaction, and reaches agents through the revocation stream."""

from __future__ import annotations

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.common.errors import NotFound, RevocationError, SpiffeIdError
from trustmesh.identity.keys import KeyManager
from trustmesh.revocation import Revocation
from trustmesh.revocation.store import RevocationStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import parse_spiffe_id

KINDS = ("jti", "subject", "workload", "cluster", "key")
ALIASES = {"spiffeId": "subject", "spiffe_id": "subject"}


class Revoker:
    def __init__(
        self,
        store: RevocationStore,
        keys: KeyManager,
        snapshots: Snapshots,
        recorder: AuditRecorder,
    ) -> None:
        self.store = store
        self.keys = keys
        self.snapshots = snapshots
        self.recorder = recorder

    def _target(self, kind: str, value: str) -> tuple[str, str]:
        """What to record for the request: a workload becomes its SPIFFE ID; the rest
        must name something that exists. A key leaves JWKS here (the prepared key takes
        over if it was the active one)."""
        registry = self.snapshots.registry
        if kind == "workload":
            if value not in registry.workloads:
                raise NotFound(f"workload {value} is not registered")
            return "subject", registry.spiffe_id_of(value)
        if kind == "subject":
            try:
                domain, _ = parse_spiffe_id(value)
            except SpiffeIdError as exc:
                raise RevocationError(str(exc)) from None
            trust_domain = self.snapshots.trust_domain
            if domain != trust_domain:
                raise RevocationError(f"{value} is not in trust domain {trust_domain}")
        elif kind == "cluster":
            if value not in registry.clusters:
                raise NotFound(f"cluster {value} is not registered")
        elif kind == "key" and self.snapshots.revocations.latest("key", value) is None:
            try:
                self.keys.revoke(value)
            except LookupError:
                raise NotFound(f"no published signing key {value}") from None
        return kind, value

    def revoke(self, kind: str, value: str, reason: str, actor: str) -> tuple[Revocation, bool]:
        """``kind``: jti, subject (a SPIFFE ID of the trust domain), workload (its SPIFFE
        ID is revoked), cluster (registered), key (a published kid). Returns the entry
        and whether it is new (repeating a revocation returns the one in force)."""
        kind, value = self._target(kind, value)

        def record(conn: Connection, entry: Revocation) -> None:
            self.recorder.stage(
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
            if entry.kind == "key":
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

        entry, created = self.store.revoke(kind, value, reason, actor, on_commit=record)
        self.snapshots.refresh()
        if created:
            self.recorder.drain()
        return entry, created
