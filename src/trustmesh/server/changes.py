"""Changes to the registry and the policy: ``trustmesh apply`` and ``policy rollback``
(DESIGN §3).

An apply validates every document, plans the registry and the policy together, and
runs the gate (``policy/gate.py``: every cluster's bundle compiled, every PolicyTest
decided) on the candidate; only if all of that passes are both written, in one
transaction that also stages the audit events describing them — ``admin.apply`` for
registry changes, ``policy.published`` for a new policy version — so no change is
committed without its event. A refused change writes nothing and is recorded as
``policy.rejected``; dry runs are not recorded.

The actor of every change is the authenticated principal. An author the caller claims
(``--author``) is kept beside it, never in its place: ``claimed_author`` in the events'
detail and the policy version's ``claimedAuthor``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from trustmesh.audit import events as ev
from trustmesh.audit.canonical import canonical_bytes
from trustmesh.common.errors import (
    Conflict,
    ManifestError,
    NotFound,
    PolicyError,
    PolicyTestFailed,
)
from trustmesh.manifests import POLICY_KINDS, REGISTRY_KINDS, Document, Problem, parse_text
from trustmesh.policy.catalog import PolicyCatalog, documents_of
from trustmesh.policy.gate import gate
from trustmesh.policy.testing import CaseResult
from trustmesh.registry import AppliedChange, RegistryStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.retirement import Retirement
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import UsageTracker
from trustmesh.storage import Database

PUBLISH_ATTEMPTS = 3  # an approval's publish is built again when another version came between


CHANGES_BUDGET = 10_000  # bytes of changes in one event (an event is at most 16 KiB)


def change_parts(changes: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """``changes`` cut into consecutive parts of at most CHANGES_BUDGET bytes of JSON
    each (none when there are no changes)."""
    parts: list[list[dict[str, str]]] = []
    size = CHANGES_BUDGET
    for change in changes:
        length = len(canonical_bytes(change)) + 1
        if size + length > CHANGES_BUDGET:
            parts.append([])
            size = 0
        parts[-1].append(change)
        size += length
    return parts


class _PolicyMoved(Exception):
    """Another policy version was written between reading the current one and taking
    the revision counter's lock (PostgreSQL, read committed): the candidate is built
    again on the newer one, so no version drops what the one before added."""


@dataclass(frozen=True)
class ApplyResult:
    registry_revision: int
    policy_revision: int
    changes: list[AppliedChange]
    tests: list[CaseResult]
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.registry_revision,
            "registryRevision": self.registry_revision,
            "policyRevision": self.policy_revision,
            "dryRun": self.dry_run,
            "changes": [c.as_dict() for c in self.changes],
            "tests": {"passed": sum(r.passed for r in self.tests), "total": len(self.tests)},
        }


def _duplicates(documents: list[Document]) -> list[Problem]:
    """The same object defined twice across the files of one apply."""
    seen: dict[tuple[str, str], Document] = {}
    problems = []
    for doc in documents:
        first = seen.setdefault((doc.kind, doc.name), doc)
        if first is not doc:
            problems.append(
                Problem(
                    doc.path,
                    doc.line,
                    "metadata.name",
                    f"{doc.kind} {doc.name} is also defined at {first.path}:{first.line}",
                )
            )
    return problems


def parse_documents(files: list[tuple[str, str]]) -> list[Document]:
    """Every document of every file, or one ManifestError with every problem found."""
    documents = []
    problems = []
    for path, content in files:
        try:
            documents.extend(parse_text(content, path))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    duplicates = _duplicates(documents)
    if duplicates:
        raise ManifestError(duplicates)
    return documents


class Changes:
    """Apply and rollback, recorded in the audit log (blocking: the HTTP layer runs
    them in a thread)."""

    def __init__(
        self,
        db: Database,
        registry_store: RegistryStore,
        catalog: PolicyCatalog,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        retirement: Retirement,
        usage: UsageTracker,
    ) -> None:
        self.retirement = retirement
        self.usage = usage
        self.db = db
        self.registry_store = registry_store
        self.catalog = catalog
        self.snapshots = snapshots
        self.recorder = recorder

    def apply(
        self,
        files: list[tuple[str, str]],
        actor: str,
        dry_run: bool = False,
        message: str = "",
        claimed_author: str | None = None,
    ) -> ApplyResult:
        """Raises ManifestError, RegistryConflict, PolicyError or PolicyTestFailed,
        having written nothing."""
        try:
            result = self._apply(files, actor, dry_run, message, claimed_author)
        except Exception as exc:
            if not dry_run:
                paths = [path for path, _ in files]
                self._record_refusal(actor, "apply", exc, paths, claimed_author)
            raise
        if not dry_run:
            self.recorder.drain()
        return result

    def _apply(
        self,
        files: list[tuple[str, str]],
        actor: str,
        dry_run: bool,
        message: str,
        claimed_author: str | None,
    ) -> ApplyResult:
        documents = parse_documents(files)
        registry_docs = [d for d in documents if d.kind in REGISTRY_KINDS]
        policy_docs = [d for d in documents if d.kind in POLICY_KINDS]
        with self.db.engine.begin() as conn:
            registry_plan, candidate = self.registry_store.plan(conn, registry_docs)
            policy_plan = self.catalog.plan(conn, policy_docs)
            next_policy = self.catalog.current(conn).revision + (1 if policy_plan.changed else 0)
            tests: list[CaseResult] = []
            if registry_plan.changed or policy_plan.changed:
                tests = gate(policy_plan.policy, candidate, next_policy)
            # DESIGN §11: applying a retired Workload's manifest restores it.
            retired = self.retirement.retired_in(
                conn, [d.name for d in registry_docs if d.kind == "Workload"]
            )
            registry_changes = [
                AppliedChange(c.kind, c.name, "restored")
                if c.kind == "Workload" and c.name in retired and c.action == "unchanged"
                else c
                for c in registry_plan.changes
            ]
            restore_only = bool(retired) and not registry_plan.changed
            result = ApplyResult(
                registry_revision=candidate.revision + (1 if restore_only else 0),
                policy_revision=next_policy,
                changes=registry_changes + policy_plan.changes,
                tests=tests,
                dry_run=dry_run,
            )
            if dry_run:
                conn.rollback()
                return result
            if registry_plan.changed:
                self.registry_store.write(conn, registry_plan, actor)
                self.usage.clear_admitted_in(conn, candidate)  # get pending, on every replica
            if retired:
                self.retirement.restore_in(conn, retired, actor, registry_plan.changed)
            if policy_plan.changed:
                self.catalog.write(conn, policy_plan, actor, message, claimed_author=claimed_author)
            self._stage_applied(conn, actor, result, message, "apply", claimed_author)
        self.snapshots.refresh()
        return result

    def rollback(
        self, revision: int, actor: str, message: str, claimed_author: str | None = None
    ) -> ApplyResult:
        """A new version equal to ``revision`` (its tests run again, on today's
        registry), recorded like :meth:`apply`."""
        message = message or f"rollback to revision {revision}"
        try:
            result = self._rollback(revision, actor, message, claimed_author)
        except Exception as exc:
            self._record_refusal(actor, f"rollback:{revision}", exc, [], claimed_author)
            raise
        self.recorder.drain()
        return result

    def _rollback(
        self, revision: int, actor: str, message: str, claimed_author: str | None
    ) -> ApplyResult:
        target = self.catalog.get(revision)
        if target is None:
            raise NotFound(f"policy revision {revision} does not exist")
        with self.db.engine.begin() as conn:
            plan = self.catalog.plan(conn, documents_of(target), replace=True)
            registry = self.registry_store.load(conn)
            current = self.catalog.current(conn).revision
            if not plan.changed:
                return ApplyResult(registry.revision, current, [], [], False)
            tests = gate(plan.policy, registry, current + 1)
            via = f"rollback:{revision}"
            new_revision = self.catalog.write(
                conn, plan, actor, message, via, claimed_author=claimed_author
            )
            changes = [AppliedChange(c["kind"], c["name"], c["action"]) for c in plan.diff]
            result = ApplyResult(registry.revision, new_revision, changes, tests, False)
            self._stage_applied(conn, actor, result, message, via, claimed_author)
        self.snapshots.refresh()
        return result

    def publish_access(
        self,
        binding: Document,
        drop: Callable[[Document], bool],
        actor: str,
        message: str,
        via: str,
        then: Callable[[Connection, int], None],
    ) -> ApplyResult:
        """An approved access request's binding published through the gate, as an apply
        is (``server/access.py``): the current policy without the documents ``drop``
        selects (expired access bindings), plus ``binding``; every cluster's bundle
        compiled and every PolicyTest decided on that candidate. In the same transaction
        the new version, its ``policy.published`` (``via``: ``access:ID``) and whatever
        ``then(conn, revision)`` writes (the request's state and its event) commit
        together, or nothing does. A candidate the gate refuses raises PolicyError or
        PolicyTestFailed, recorded as ``policy.rejected``; an error ``then`` raises
        rolls everything back."""
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                result = self._publish_access(binding, drop, actor, message, via, then)
            except _PolicyMoved:
                if attempt + 1 < PUBLISH_ATTEMPTS:
                    continue
                raise Conflict(
                    "the policy changed while the approval was being published; try again"
                ) from None
            except (PolicyError, PolicyTestFailed, ManifestError) as exc:
                self._record_refusal(actor, via, exc, [], None)
                raise
            break
        self.recorder.drain()
        return result

    def _publish_access(
        self,
        binding: Document,
        drop: Callable[[Document], bool],
        actor: str,
        message: str,
        via: str,
        then: Callable[[Connection, int], None],
    ) -> ApplyResult:
        with self.db.engine.begin() as conn:
            kept = [
                d
                for d in documents_of(self.catalog.current(conn))
                if (d.kind, d.name) != (binding.kind, binding.name) and not drop(d)
            ]
            plan = self.catalog.plan(conn, [*kept, binding], replace=True)
            registry = self.registry_store.load(conn)
            current = self.catalog.current(conn).revision
            tests = gate(plan.policy, registry, current + 1)
            revision = self.catalog.write(conn, plan, actor, message, via)
            if revision != current + 1:  # another version came between: built on stale docs
                raise _PolicyMoved
            changes = [AppliedChange(c["kind"], c["name"], c["action"]) for c in plan.diff]
            result = ApplyResult(registry.revision, revision, changes, tests, False)
            self._stage_applied(conn, actor, result, message, via, None)
            then(conn, revision)
        self.snapshots.refresh()
        return result

    def _record_refusal(
        self,
        actor: str,
        via: str,
        exc: Exception,
        files: list[str],
        claimed_author: str | None,
    ) -> None:
        """``policy.rejected`` for a change refused for what it is (not for a crash)."""
        if not isinstance(exc, ValueError | LookupError | PolicyTestFailed):
            return
        problems = getattr(exc, "problems", None) or []
        detail: dict[str, Any] = {
            "via": via,
            "claimed_author": claimed_author,
            "error": type(exc).__name__,
            "message": str(exc)[:1000],
            "problems": [str(p)[:500] for p in problems[:50]],
            "files": files[:50] or None,
        }
        if isinstance(exc, PolicyTestFailed):
            detail["failed_tests"] = [r.describe()[:500] for r in exc.failed[:50]]
        self.recorder.write_admin(ev.POLICY_REJECTED, actor, detail)

    def _stage_applied(
        self,
        conn: Connection,
        actor: str,
        result: ApplyResult,
        message: str,
        via: str,
        claimed_author: str | None,
    ) -> None:
        changed = [c for c in result.changes if c.action != "unchanged"]
        registry_changes = [c.as_dict() for c in changed if c.kind in REGISTRY_KINDS]
        policy_changes = [c.as_dict() for c in changed if c.kind in POLICY_KINDS]
        parts = change_parts(registry_changes)
        for number, part in enumerate(parts, 1):
            # an event is at most 16 KiB: a large apply is recorded in parts, every
            # change in one of them
            self.recorder.stage(
                conn,
                "admin.apply",
                actor,
                {
                    "registry_revision": result.registry_revision,
                    "claimed_author": claimed_author,
                    "changes": part,
                    "part": number if len(parts) > 1 else None,
                    "parts": len(parts) if len(parts) > 1 else None,
                },
            )
        if policy_changes:
            # one publish, one event: the changes that fit, and the count and digest of
            # all of them (the version itself, GET /v1/policy/versions/N, lists them all)
            listed = change_parts(policy_changes)[0]
            self.recorder.stage(
                conn,
                ev.POLICY_PUBLISHED,
                actor,
                {
                    "policy_revision": result.policy_revision,
                    "via": via,
                    "claimed_author": claimed_author,
                    "message": message[:2000] or None,
                    "changes": listed,
                    "changes_total": len(policy_changes) if listed != policy_changes else None,
                    "changes_sha256": (
                        hashlib.sha256(canonical_bytes({"changes": policy_changes})).hexdigest()
                        if listed != policy_changes
                        else None
                    ),
                    "tests_passed": len(result.tests),
                },
            )
