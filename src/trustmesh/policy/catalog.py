"""The versioned policy catalog (DESIGN §3 "Policy versions").

Every change of policy is an immutable version: a monotonic revision, the content hash
of the complete set of policy documents, author (the authenticated principal; an author
the caller claimed is kept apart, as ``claimed_author``), message, time, and the diff
against the previous version. Versions are never edited; a rollback is a new version whose
documents equal an old one's. The current version is the highest revision."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from trustmesh.manifests import POLICY_KINDS, Document, document_from_body
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry.store import AppliedChange, canonical, plan_changes
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import policy_versions


@dataclass(frozen=True)
class PolicyVersion:
    revision: int
    content_hash: str
    author: str
    message: str
    created_at: float
    source: str
    documents: list[dict[str, Any]]
    diff: list[dict[str, Any]]
    claimed_author: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "contentHash": self.content_hash,
            "author": self.author,
            "claimedAuthor": self.claimed_author,
            "message": self.message,
            "createdAt": self.created_at,
            "source": self.source,
            "changes": [{k: c[k] for k in ("kind", "name", "action")} for c in self.diff],
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "documents": self.documents, "diff": self.diff}


EMPTY = PolicyVersion(0, PolicySet().content_hash(), "", "empty policy", 0.0, "initial", [], [])


def _version(row: Any) -> PolicyVersion:
    return PolicyVersion(
        revision=row.revision,
        content_hash=row.content_hash,
        author=row.author,
        message=row.message,
        created_at=row.created_at,
        source=row.source,
        documents=json.loads(row.documents),
        diff=json.loads(row.diff),
        claimed_author=row.claimed_author,
    )


@dataclass(frozen=True)
class PolicyPlan:
    changes: list[AppliedChange]
    diff: list[dict[str, Any]]
    merged: list[Document]
    policy: PolicySet

    @property
    def changed(self) -> bool:
        return bool(self.diff)


def documents_of(version: PolicyVersion) -> list[Document]:
    return [document_from_body(body) for body in version.documents]


def diff_documents(before: Sequence[Document], after: Sequence[Document]) -> list[dict[str, Any]]:
    old = {(d.kind, d.name): d.body for d in before}
    new = {(d.kind, d.name): d.body for d in after}
    diff = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            action = "created"
        elif key not in new:
            action = "deleted"
        elif canonical(old[key]) != canonical(new[key]):
            action = "configured"
        else:
            continue
        diff.append(
            {
                "kind": key[0],
                "name": key[1],
                "action": action,
                "before": old.get(key),
                "after": new.get(key),
            }
        )
    return diff


class PolicyCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def current(self, conn: Connection | None = None) -> PolicyVersion:
        if conn is None:
            with self.db.engine.connect() as own:
                return self.current(own)
        row = conn.execute(
            select(policy_versions).order_by(policy_versions.c.revision.desc()).limit(1)
        ).first()
        return EMPTY if row is None else _version(row)

    def get(self, revision: int) -> PolicyVersion | None:
        if revision == 0:
            return EMPTY
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(policy_versions).where(policy_versions.c.revision == revision)
            ).first()
        return None if row is None else _version(row)

    def history(self, limit: int = 100) -> list[PolicyVersion]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(policy_versions).order_by(policy_versions.c.revision.desc()).limit(limit)
            )
            return [_version(r) for r in rows]

    def plan(
        self, conn: Connection, documents: Sequence[Document], replace: bool = False
    ) -> PolicyPlan:
        """Apply merges the documents into the current set; ``replace`` (rollback) makes
        them the whole set."""
        assert all(d.kind in POLICY_KINDS for d in documents)
        current_docs = documents_of(self.current(conn))
        current = {(d.kind, d.name): d for d in current_docs}
        merged = {} if replace else dict(current)
        for doc in documents:
            merged[(doc.kind, doc.name)] = doc
        merged_docs = list(merged.values())
        return PolicyPlan(
            changes=plan_changes(current, documents),
            diff=diff_documents(current_docs, merged_docs),
            merged=merged_docs,
            policy=PolicySet.from_documents(merged_docs),
        )

    def write(
        self,
        conn: Connection,
        plan: PolicyPlan,
        author: str,
        message: str,
        source: str = "apply",
        claimed_author: str | None = None,
    ) -> int:
        """A new version inside the caller's transaction; returns its revision. The
        counter row's lock orders concurrent writers; the primary key refuses a race."""
        revision = meta_store.bump(conn, meta_store.POLICY_REVISION)
        conn.execute(
            policy_versions.insert().values(
                revision=revision,
                content_hash=plan.policy.content_hash(),
                author=author,
                message=message,
                created_at=time.time(),
                source=source,
                documents=json.dumps(plan.policy.bodies, sort_keys=True),
                diff=json.dumps(plan.diff, sort_keys=True),
                claimed_author=claimed_author,
            )
        )
        return revision
