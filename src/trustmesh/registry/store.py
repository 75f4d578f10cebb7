"""Reading and writing the registry in the database. An apply is all-or-nothing: every
document is validated, the would-be registry is rebuilt and checked as a whole, and
only then written in one transaction that bumps ``registry_revision``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, update

from trustmesh.manifests import Document, document_from_body
from trustmesh.registry.index import Registry, build_registry
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import registry_objects

REGISTRY_KINDS = ("Cluster", "Workload")


@dataclass(frozen=True)
class AppliedChange:
    kind: str
    name: str
    action: str  # created | configured | unchanged

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "action": self.action}


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


class RegistryStore:
    def __init__(self, db: Database, trust_domain: str) -> None:
        self.db = db
        self.trust_domain = trust_domain

    def _documents(self, conn: Connection) -> list[Document]:
        rows = conn.execute(
            select(registry_objects.c.body).order_by(
                registry_objects.c.kind, registry_objects.c.name
            )
        )
        return [document_from_body(json.loads(body)) for (body,) in rows]

    def load(self) -> Registry:
        with self.db.engine.connect() as conn:
            revision = int(meta_store.get(conn, meta_store.REGISTRY_REVISION) or 0)
            return build_registry(self.trust_domain, revision, self._documents(conn))

    def list_bodies(self, kind: str) -> list[dict[str, Any]]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(registry_objects)
                .where(registry_objects.c.kind == kind)
                .order_by(registry_objects.c.name)
            )
            out = []
            for row in rows:
                body = json.loads(row.body)
                body["status"] = {
                    "generation": row.generation,
                    "updatedAt": row.updated_at,
                    "updatedBy": row.updated_by,
                }
                out.append(body)
            return out

    def apply(
        self, documents: Sequence[Document], actor: str, dry_run: bool = False
    ) -> tuple[int, list[AppliedChange]]:
        """Apply the documents; returns (registry revision, changes). Raises
        RegistryConflict (nothing written) when the result would be inconsistent."""
        now = time.time()
        with self.db.engine.begin() as conn:
            current = {(d.kind, d.name): d for d in self._documents(conn)}
            merged = dict(current)
            changes: list[AppliedChange] = []
            for doc in documents:
                old = current.get((doc.kind, doc.name))
                if old is None:
                    action = "created"
                elif _canonical(old.body) == _canonical(doc.body):
                    action = "unchanged"
                else:
                    action = "configured"
                changes.append(AppliedChange(doc.kind, doc.name, action))
                # Keep the new document's source location for error messages.
                merged[(doc.kind, doc.name)] = doc
            build_registry(self.trust_domain, 0, merged.values())  # raises on conflicts
            revision = int(meta_store.get(conn, meta_store.REGISTRY_REVISION) or 0)
            if dry_run or all(c.action == "unchanged" for c in changes):
                return revision, changes
            for doc, change in zip(documents, changes, strict=True):
                body = _canonical(doc.body)
                if change.action == "created":
                    conn.execute(
                        registry_objects.insert().values(
                            kind=doc.kind,
                            name=doc.name,
                            body=body,
                            generation=1,
                            created_at=now,
                            updated_at=now,
                            updated_by=actor,
                        )
                    )
                elif change.action == "configured":
                    conn.execute(
                        update(registry_objects)
                        .where(
                            registry_objects.c.kind == doc.kind, registry_objects.c.name == doc.name
                        )
                        .values(
                            body=body,
                            generation=registry_objects.c.generation + 1,
                            updated_at=now,
                            updated_by=actor,
                        )
                    )
            revision = meta_store.bump(conn, meta_store.REGISTRY_REVISION)
            return revision, changes
