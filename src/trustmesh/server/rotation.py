"""Signing-key rotation (DESIGN §2): on request (``trustmesh keys rotate``) and
automatically once the active key is older than the rotation interval; keys whose
every token has expired leave JWKS. Each change is a compare-and-set on the key rows
(concurrent replicas rotate once) that stages its ``key.rotated`` /
``admin.keys_removed`` event in the same transaction."""

from __future__ import annotations

import logging

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.identity.keys import KeyManager, KeyRecord
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots

log = logging.getLogger("trustmesh.server")


class KeyRotation:
    def __init__(
        self,
        keys: KeyManager,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        interval: float,
    ) -> None:
        self.keys = keys
        self.snapshots = snapshots
        self.recorder = recorder
        self.interval = interval

    def rotate(self, actor: str) -> KeyRecord:
        """The prepared key becomes active now; a new prepared key is published."""

        def record(conn: Connection, new: KeyRecord, previous: str) -> None:
            self.recorder.stage(
                conn,
                ev.KEY_ROTATED,
                actor,
                {"active_kid": new.kid, "previous_kid": previous, "reason": "requested"},
            )

        rotated = self.keys.rotate(on_commit=record)
        self.snapshots.refresh()
        self.recorder.drain()
        return rotated

    def maintain(self, now: float) -> None:
        """Rotate a key older than the interval; remove keys nothing valid can carry."""

        def rotated_automatically(conn: Connection, record: KeyRecord, previous: str) -> None:
            self.recorder.stage(
                conn,
                ev.KEY_ROTATED,
                "system",
                {"active_kid": record.kid, "previous_kid": previous, "reason": "automatic"},
            )

        def removed_keys(conn: Connection, kids: list[str]) -> None:
            self.recorder.stage(conn, "admin.keys_removed", "system", {"removed": kids})

        rotated = self.keys.rotate_if_older_than(
            self.interval, now, on_commit=rotated_automatically
        )
        removed = self.keys.remove_expired(now, on_commit=removed_keys)
        if rotated is not None:
            log.warning("signing key rotated automatically: %s is active", rotated.kid)
        if rotated is not None or removed:
            self.recorder.drain()
            self.snapshots.refresh()
