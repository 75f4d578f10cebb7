"""Reading and writing the registry in the database. Writing is split into ``plan``
(compare the documents with what is stored) and ``write`` (inside the caller's
transaction), so one apply can change the registry and the policy together, after
every check has passed."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, update

from trustmesh.manifests import REGISTRY_KINDS, Document, document_from_body
from trustmesh.registry.index import Registry, build_registry
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import registry_objects


@dataclass(frozen=True)
class AppliedChange:
    kind: str
    name: str
    action: str  # created | configured | unchanged

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "action": self.action}


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def plan_changes(
    current: dict[tuple[str, str], Document], documents: Sequence[Document]
) -> list[AppliedChange]:
    changes = []
    for doc in documents:
        old = current.get((doc.kind, doc.name))
        if old is None:
            action = "created"
        elif canonical(old.body) == canonical(doc.body):
            action = "unchanged"
        else:
            action = "configured"
        changes.append(AppliedChange(doc.kind, doc.name, action))
    return changes


@dataclass(frozen=True)
class RegistryPlan:
    documents: list[Document]  # the ones being applied
    changes: list[AppliedChange]
    merged: list[Document]  # the whole registry after the apply

    @property
    def changed(self) -> bool:
        return any(c.action != "unchanged" for c in self.changes)


class RegistryStore:
    def __init__(self, db: Database, trust_domain: str) -> None:
        self.db = db
        self.trust_domain = trust_domain

    def documents(self, conn: Connection) -> list[Document]:
        rows = conn.execute(
            select(registry_objects.c.body).order_by(
                registry_objects.c.kind, registry_objects.c.name
            )
        )
        return [document_from_body(json.loads(body)) for (body,) in rows]

    def load(self, conn: Connection | None = None) -> Registry:
        if conn is None:
            with self.db.engine.connect() as own:
                return self.load(own)
        revision = int(meta_store.get(conn, meta_store.REGISTRY_REVISION) or 0)
        return build_registry(self.trust_domain, revision, self.documents(conn))

    def list_bodies(self, kind: str, names: Collection[str] | None = None) -> list[dict[str, Any]]:
        """Every object of ``kind`` by name, its ``status`` from the row; only those
        ``names`` when given (a page: ``server/inventory.py``)."""
        query = select(registry_objects).where(registry_objects.c.kind == kind)
        if names is not None:
            if not names:
                return []
            query = query.where(registry_objects.c.name.in_(sorted(names)))
        with self.db.engine.connect() as conn:
            rows = conn.execute(query.order_by(registry_objects.c.name))
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

    def plan(
        self, conn: Connection, documents: Sequence[Document]
    ) -> tuple[RegistryPlan, Registry]:
        """What the apply would change and the registry it would produce (checked as a
        whole: raises RegistryConflict)."""
        assert all(d.kind in REGISTRY_KINDS for d in documents)
        current = {(d.kind, d.name): d for d in self.documents(conn)}
        changes = plan_changes(current, documents)
        merged = dict(current)
        for doc in documents:
            merged[(doc.kind, doc.name)] = doc  # keeps the new source location for errors
        plan = RegistryPlan(list(documents), changes, list(merged.values()))
        revision = int(meta_store.get(conn, meta_store.REGISTRY_REVISION) or 0)
        candidate = build_registry(
            self.trust_domain, revision + (1 if plan.changed else 0), plan.merged
        )
        return plan, candidate

    def write(self, conn: Connection, plan: RegistryPlan, actor: str) -> int:
        """Write a plan inside the caller's transaction; returns the new revision."""
        now = time.time()
        for doc, change in zip(plan.documents, plan.changes, strict=True):
            body = canonical(doc.body)
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
                    .where(registry_objects.c.kind == doc.kind, registry_objects.c.name == doc.name)
                    .values(
                        body=body,
                        generation=registry_objects.c.generation + 1,
                        updated_at=now,
                        updated_by=actor,
                    )
                )
        return meta_store.bump(conn, meta_store.REGISTRY_REVISION, at=now)
