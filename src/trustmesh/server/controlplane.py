"""The control plane as plain Python: state, its owner, and the operations the HTTP
layer exposes. Nothing here imports the web framework.

State has one owner: the database. Each replica keeps an immutable snapshot of the
registry and of the signing keys and swaps it when the database's revision counters
move (checked every ``refresh_interval``; its own writes swap at once), so several
stateless replicas on one PostgreSQL database agree within that interval."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, select, update

from trustmesh.audit import events as ev
from trustmesh.common.tracing import Tracing
from trustmesh.identity.keys import KeyManager, KeyRecord, KeySet
from trustmesh.identity.kubernetes_sa import ClusterKeyCache
from trustmesh.identity.rfc8693 import DEFAULT_TTL, TokenExchange
from trustmesh.identity.sealing import MasterKey
from trustmesh.identity.spiffe import (
    SpiffeIdError,
    cluster_audience,
    normalize_trust_domain,
    parse_spiffe_id,
)
from trustmesh.identity.svid import SVID_TYPS, KeyRing, SvidVerifier, VerifiedIdentity
from trustmesh.manifests import (
    POLICY_KINDS,
    REGISTRY_KINDS,
    Document,
    ManifestError,
    Problem,
    parse_text,
)
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import (
    PolicySet,
    claim_counts,
    compile_all,
    compile_bundle,
    flatten_roles,
    inventory,
)
from trustmesh.policy.testing import CaseResult, run_policy_tests
from trustmesh.registry import AppliedChange, Registry, RegistryStore
from trustmesh.revocation import Revocation, RevocationError, RevocationSet
from trustmesh.server.audit import AuditLog
from trustmesh.server.catalog import PolicyCatalog, documents_of
from trustmesh.server.credentials import CLUSTER, CredentialStore, Principal
from trustmesh.server.recorder import AuditRecorder, admin_event
from trustmesh.server.revocations import RevocationStore
from trustmesh.storage import Database, open_database
from trustmesh.storage import meta as meta_store
from trustmesh.storage.schema import agent_status

log = logging.getLogger("trustmesh.server")

SPIFFE_REFRESH_HINT = 60
AGENT_STALE_AFTER = 90.0  # an agent that has not polled for this long is not counted


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


class PolicyTestFailed(Exception):
    """A candidate policy failed PolicyTest cases; the current version stays in force."""

    def __init__(self, failed: list[CaseResult], total: int) -> None:
        super().__init__(
            f"{len(failed)} of {total} policy test cases failed; first: {failed[0].describe()}"
        )
        self.failed = failed
        self.total = total


class ConfigError(ValueError):
    """Start-up configuration that cannot work; the message says what to change."""


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    trust_domain: str
    db: str | None = None
    issuer: str | None = None
    signing_alg: str = "ES256"
    default_ttl: int = DEFAULT_TTL
    key_rotation_interval: float = 7 * 86400.0
    refresh_interval: float = 1.0
    maintenance_interval: float = 30.0
    cluster_jwks_min_refresh: float = 1.0
    master_key_file: Path | None = None
    audit_checkpoint_interval: float = 0.5
    otel_exporter: str = "none"


class ControlPlane:
    def __init__(self, config: ServerConfig, issuer: str) -> None:
        self.config = config
        self.issuer = issuer.rstrip("/")
        self.trust_domain = normalize_trust_domain(config.trust_domain)
        self.db: Database
        self.keys: KeyManager
        self.credentials: CredentialStore
        self.registry_store: RegistryStore
        self._registry: Registry
        self._keyset: KeySet
        self._verifier: SvidVerifier
        self.exchange: TokenExchange
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.last_refresh = 0.0
        self.admin_token_created = False
        self.catalog: PolicyCatalog
        self._policy = PolicySet()
        self._policy_revision = 0
        self._bundles: dict[tuple[int, int, int, str], str] = {}
        # What every cluster's bundle shares (flattened roles, inventory, claim counts,
        # policy hash), computed once per (policy, registry) revision, not per cluster.
        self._shared_inputs: tuple[tuple[int, int], tuple[Any, ...]] | None = None
        self._changed = asyncio.Event()
        self._notified_version = (0, 0, 0)
        self._revocations = RevocationSet()
        self.stopping = False
        self.replica = secrets.token_hex(6)
        self.audit: AuditLog
        self.tracing = Tracing("trustmesh-server", config.otel_exporter)
        self.recorder: AuditRecorder

    # -- start-up -----------------------------------------------------------------------
    def open(self) -> None:
        """Synchronous set-up: database, migrations, master key, keys, admin credential."""
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        self.db = open_database(self.config.db, data_dir)
        with self.db.engine.begin() as conn:
            stored = meta_store.insert_if_absent(conn, "trust_domain", self.trust_domain)
        if stored != self.trust_domain:
            raise ConfigError(
                f"this database belongs to trust domain {stored}, not {self.trust_domain}; "
                "a trust domain cannot change (every issued identity names it)"
            )
        master_path = self.config.master_key_file or Path(
            os.environ.get("TRUSTMESH_MASTER_KEY_FILE") or data_dir / "master.key"
        )
        master_key = MasterKey.load_or_create(master_path)
        self.keys = KeyManager(self.db, master_key, self.config.signing_alg)
        self.keys.check_master_key()
        self.keys.ensure_keys()
        self.credentials = CredentialStore(self.db)
        self.admin_token_created = self.credentials.ensure_admin(data_dir / "admin.token")
        self.registry_store = RegistryStore(self.db, self.trust_domain)
        self._swap_keys(self.keys.load())
        self._registry = self.registry_store.load()
        self.revocation_store = RevocationStore(self.db)
        self._revocations = self.revocation_store.load()
        self.catalog = PolicyCatalog(self.db)
        version = self.catalog.current()
        self._policy = PolicySet.from_documents(documents_of(version))
        self._policy_revision = version.revision
        self._notified_version = self.change_marker()
        self.audit = AuditLog(
            self.db,
            master_key,
            self.trust_domain,
            self.replica,
            self.config.audit_checkpoint_interval,
        )
        self.audit.open()
        self.recorder = AuditRecorder(self.audit)
        self.last_refresh = time.monotonic()

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self.exchange = TokenExchange(
            issuer=self.issuer,
            trust_domain=self.trust_domain,
            cluster_keys=ClusterKeyCache(
                self._http, min_refresh_interval=self.config.cluster_jwks_min_refresh
            ),
            registry=lambda: self._registry,
            keyset=lambda: self._keyset,
            revoked_until=self.revoked_until,
            default_ttl=self.config.default_ttl,
        )
        self.recorder.start()
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="refresh"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._checkpoint_loop(), name="audit-checkpoints"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.recorder.close()
        self.tracing.shutdown()
        try:  # the last events get a signed checkpoint before the process ends
            await asyncio.to_thread(self.audit.checkpoint_now)
        except Exception:
            log.exception("signing the final audit checkpoint failed")
        if self._http is not None:
            await self._http.aclose()
        self.db.dispose()

    # -- snapshots ----------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def keyset(self) -> KeySet:
        return self._keyset

    @property
    def verifier(self) -> SvidVerifier:
        return self._verifier

    def _swap_keys(self, keyset: KeySet) -> None:
        self._keyset = keyset
        self._verifier = SvidVerifier(
            issuer=self.issuer,
            trust_domain=self.trust_domain,
            audience=None,
            keys=KeyRing(keyset.jwks(), accepted_typs=SVID_TYPS),
        )

    def refresh(self) -> None:
        """Reload whatever another replica (or this one) changed."""
        with self.db.engine.connect() as conn:
            revisions = meta_store.revisions(conn)
        if revisions.get(meta_store.KEYS_REVISION, 0) != self._keyset.revision:
            self._swap_keys(self.keys.load())
        if revisions.get(meta_store.REGISTRY_REVISION, 0) != self._registry.revision:
            self._registry = self.registry_store.load()
        if revisions.get(meta_store.REVOCATION_REVISION, 0) != self._revocations.revision:
            self._revocations = self.revocation_store.load()
        if revisions.get(meta_store.POLICY_REVISION, 0) != self._policy_revision:
            version = self.catalog.current()
            self._policy = PolicySet.from_documents(documents_of(version))
            self._policy_revision = version.revision
        self.last_refresh = time.monotonic()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # keep serving from the last snapshot; /readyz reports it
                log.exception("refreshing state from the database failed")
            self.notify_changes()

    async def _checkpoint_loop(self) -> None:
        """Sign a checkpoint when the log grew and the sequencer did not sign one."""
        interval = max(self.config.audit_checkpoint_interval, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.audit.drain_outbox)
                await asyncio.to_thread(self.audit.checkpoint_now)
            except Exception:
                log.exception("sequencing staged audit events or signing a checkpoint failed")

    def audit_admin(
        self, type_: str, actor: str, detail: dict[str, Any], cluster: str | None = None
    ) -> None:
        """Record an action that changed nothing (a rejected apply) straight away."""
        self.recorder.write_quietly(admin_event(self.audit.source, type_, actor, detail, cluster))

    def stage(
        self,
        conn: Connection,
        type_: str,
        actor: str,
        detail: dict[str, Any],
        cluster: str | None = None,
    ) -> None:
        """Record a change in its own transaction (the outbox, ``AuditLog.stage``): the
        event exists if and only if the change commits. :meth:`drain_audit` then moves
        it into the log."""
        self.audit.stage(conn, admin_event(self.audit.source, type_, actor, detail, cluster))

    def drain_audit(self) -> None:
        """Sequence what the last change staged; on failure the checkpoint loop (of
        this or any replica) retries, so nothing committed is lost."""
        try:
            self.audit.drain_outbox()
        except Exception:
            self.recorder.failures += 1
            log.exception("moving staged audit events into the log failed; will retry")

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.maintain)
            except Exception:
                log.exception("key maintenance failed")
            await asyncio.sleep(self.config.maintenance_interval)

    def maintain(self, now: float | None = None) -> None:
        def rotated_automatically(conn: Connection, record: KeyRecord, previous: str) -> None:
            self.stage(
                conn,
                ev.KEY_ROTATED,
                "system",
                {"active_kid": record.kid, "previous_kid": previous, "reason": "automatic"},
            )

        def removed_keys(conn: Connection, kids: list[str]) -> None:
            self.stage(conn, "admin.keys_removed", "system", {"removed": kids})

        rotated = self.keys.rotate_if_older_than(
            self.config.key_rotation_interval, now, on_commit=rotated_automatically
        )
        removed = self.keys.remove_expired(now, on_commit=removed_keys)
        self.revocation_store.remove_expired(now)
        self._revocations.expire(time.time() if now is None else now)
        if rotated is not None or removed:
            if rotated is not None:
                log.warning("signing key rotated automatically: %s is active", rotated.kid)
            self.drain_audit()
            self.refresh()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.last_refresh
        fresh = age < max(10.0, 5 * self.config.refresh_interval)
        return fresh, {
            "ready": fresh,
            "registry_revision": self._registry.revision,
            "keys_revision": self._keyset.revision,
            "active_kid": self._keyset.active.kid,
            "state_age_seconds": round(age, 3),
            "audit_size": self.audit.size,
            "audit_inconsistent": self.audit.inconsistent,
        }

    # -- public documents ---------------------------------------------------------------
    def discovery(self) -> dict[str, Any]:
        base = self.issuer
        return {
            "issuer": base,
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "token_endpoint": f"{base}/oauth2/token",
            "introspection_endpoint": f"{base}/oauth2/introspect",
            "spiffe_bundle_endpoint": f"{base}/.well-known/spiffe-bundle",
            "revocation_list_endpoint": f"{base}/v1/revocations",
            "revocation_stream_endpoint": f"{base}/v1/revocations/stream",
            "ssf_configuration_endpoint": f"{base}/.well-known/ssf-configuration",
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "token_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint_auth_methods_supported": ["bearer"],
            "id_token_signing_alg_values_supported": sorted(
                {k.alg for k in self._keyset.published}
            ),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "trust_domain": f"spiffe://{self.trust_domain}",
        }

    def jwks(self) -> dict[str, Any]:
        return self._keyset.jwks()

    def spiffe_bundle(self) -> dict[str, Any]:
        """SPIFFE Trust Domain and Bundle §4: a JWKS whose keys carry ``use: jwt-svid``."""
        bundle = self._keyset.jwks(use="jwt-svid")
        bundle["spiffe_sequence"] = self._keyset.revision
        bundle["spiffe_refresh_hint"] = SPIFFE_REFRESH_HINT
        return bundle

    # -- admin operations (blocking; the HTTP layer runs them in a thread) ----------------
    def apply(
        self,
        files: list[tuple[str, str]],
        actor: str,
        dry_run: bool = False,
        message: str = "",
    ) -> ApplyResult:
        """:meth:`_apply`, recorded in the audit log: ``policy.published`` for a new
        policy version, ``admin.apply`` for registry changes, ``policy.rejected`` when
        validation, compilation or a PolicyTest refused it (dry runs are not recorded)."""
        try:
            result = self._apply(files, actor, dry_run, message)
        except Exception as exc:
            if not dry_run:
                self._audit_rejected(actor, "apply", exc, [path for path, _ in files])
            raise
        if not dry_run:
            self.drain_audit()
        return result

    def _audit_rejected(self, actor: str, via: str, exc: Exception, files: list[str]) -> None:
        if not isinstance(exc, ManifestError | PolicyTestFailed | ValueError | LookupError):
            return
        problems = getattr(exc, "problems", None) or []
        detail: dict[str, Any] = {
            "via": via,
            "error": type(exc).__name__,
            "message": str(exc)[:1000],
            "problems": [str(p)[:500] for p in problems[:50]],
            "files": files[:50] or None,
        }
        if isinstance(exc, PolicyTestFailed):
            detail["failed_tests"] = [r.describe()[:500] for r in exc.failed[:50]]
        self.audit_admin(ev.POLICY_REJECTED, _actor_name(actor), detail)

    def _stage_applied(
        self, conn: Connection, actor: str, result: ApplyResult, message: str, via: str
    ) -> None:
        registry_changes = [
            c.as_dict()
            for c in result.changes
            if c.kind in REGISTRY_KINDS and c.action != "unchanged"
        ]
        policy_changes = [
            c.as_dict()
            for c in result.changes
            if c.kind in POLICY_KINDS and c.action != "unchanged"
        ]
        if registry_changes:
            self.stage(
                conn,
                "admin.apply",
                _actor_name(actor),
                {"registry_revision": result.registry_revision, "changes": registry_changes},
            )
        if policy_changes:
            self.stage(
                conn,
                ev.POLICY_PUBLISHED,
                _actor_name(actor),
                {
                    "policy_revision": result.policy_revision,
                    "via": via,
                    "message": message[:2000] or None,
                    "changes": policy_changes,
                    "tests_passed": len(result.tests),
                },
            )

    def _apply(
        self,
        files: list[tuple[str, str]],
        actor: str,
        dry_run: bool = False,
        message: str = "",
    ) -> ApplyResult:
        """Validate every document, plan the registry and the policy together, compile
        every cluster's bundle and run every PolicyTest on the candidate; only if all
        of that passes, write both in one transaction (a policy change becomes a new
        version). Raises ManifestError, RegistryConflict, PolicyError or
        PolicyTestFailed, having written nothing."""
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
        registry_docs = [d for d in documents if d.kind in REGISTRY_KINDS]
        policy_docs = [d for d in documents if d.kind in POLICY_KINDS]
        with self.db.engine.begin() as conn:
            registry_plan, candidate = self.registry_store.plan(conn, registry_docs)
            policy_plan = self.catalog.plan(conn, policy_docs)
            next_policy = self.catalog.current(conn).revision + (1 if policy_plan.changed else 0)
            tests: list[CaseResult] = []
            if registry_plan.changed or policy_plan.changed:
                tests = self._gate(policy_plan.policy, candidate, next_policy)
            result = ApplyResult(
                registry_revision=candidate.revision,
                policy_revision=next_policy,
                changes=registry_plan.changes + policy_plan.changes,
                tests=tests,
                dry_run=dry_run,
            )
            if dry_run:
                conn.rollback()
                return result
            if registry_plan.changed:
                self.registry_store.write(conn, registry_plan, actor)
            if policy_plan.changed:
                self.catalog.write(conn, policy_plan, actor, message)
            self._stage_applied(conn, actor, result, message, "apply")
        self.refresh()
        return result

    def _gate(self, policy: PolicySet, registry: Registry, revision: int) -> list[CaseResult]:
        bundles = compile_all(policy, registry, revision)  # raises PolicyError
        results = run_policy_tests(policy, registry, revision, bundles)
        failed = [r for r in results if not r.passed]
        if failed:
            raise PolicyTestFailed(failed, len(results))
        return results

    def rollback(self, revision: int, actor: str, message: str) -> ApplyResult:
        """A new version equal to ``revision`` (tests run again, on today's registry),
        recorded like :meth:`apply`."""
        try:
            result = self._rollback(revision, actor, message)
        except Exception as exc:
            self._audit_rejected(actor, f"rollback:{revision}", exc, [])
            raise
        self.drain_audit()
        return result

    def _rollback(self, revision: int, actor: str, message: str) -> ApplyResult:
        target = self.catalog.get(revision)
        if target is None:
            raise NotFound(f"policy revision {revision} does not exist")
        with self.db.engine.begin() as conn:
            plan = self.catalog.plan(conn, documents_of(target), replace=True)
            registry = self.registry_store.load(conn)
            current = self.catalog.current(conn).revision
            if not plan.changed:
                return ApplyResult(registry.revision, current, [], [], False)
            tests = self._gate(plan.policy, registry, current + 1)
            new_revision = self.catalog.write(
                conn,
                plan,
                actor,
                message or f"rollback to revision {revision}",
                f"rollback:{revision}",
            )
            changes = [AppliedChange(c["kind"], c["name"], c["action"]) for c in plan.diff]
            result = ApplyResult(registry.revision, new_revision, changes, tests, False)
            self._stage_applied(
                conn,
                actor,
                result,
                message or f"rollback to revision {revision}",
                f"rollback:{revision}",
            )
        self.refresh()
        return result

    # -- bundles and agents ---------------------------------------------------------------
    def bundle_version(self) -> tuple[int, int]:
        return (self._policy_revision, self._registry.revision)

    def change_marker(self) -> tuple[int, int, int]:
        return (*self.bundle_version(), self._revocations.revision)

    def signed_bundle(self, cluster: str) -> tuple[tuple[int, int], str]:
        """The current bundle of ``cluster``, signed with the active key (cached per
        policy and registry revision)."""
        version = self.bundle_version()
        key = (*version, self._keyset.revision, cluster)  # re-signed after a key rotation
        cached = self._bundles.get(key)
        if cached is not None:
            return version, cached
        registry, policy = self._registry, self._policy
        if cluster not in registry.clusters:
            raise NotFound(f"cluster {cluster} is not registered")
        if self._shared_inputs is None or self._shared_inputs[0] != version:
            flat, _ = flatten_roles(policy.roles)
            identities = inventory(registry)
            shared = (flat, identities, policy.content_hash(), claim_counts(identities))
            self._shared_inputs = (version, shared)
        flat, identities, policy_hash, counts = self._shared_inputs[1]
        bundle = compile_bundle(
            policy, registry, cluster, self._policy_revision, flat, identities, policy_hash, counts
        )
        token = sign_bundle(bundle, self._keyset.active)
        if len(self._bundles) > 4 * max(1, len(registry.clusters)):
            self._bundles.clear()
        self._bundles[key] = token
        return version, token

    def record_agent(self, cluster: str, agent_id: str, applied: tuple[int, int]) -> None:
        now = time.time()
        with self.db.engine.begin() as conn:
            updated = conn.execute(
                update(agent_status)
                .where(agent_status.c.cluster == cluster, agent_status.c.agent_id == agent_id)
                .values(policy_revision=applied[0], registry_revision=applied[1], last_seen=now)
            )
            if updated.rowcount == 0:
                conn.execute(
                    agent_status.insert().values(
                        cluster=cluster,
                        agent_id=agent_id,
                        policy_revision=applied[0],
                        registry_revision=applied[1],
                        last_seen=now,
                    )
                )

    def agent_states(self) -> dict[str, list[dict[str, Any]]]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(agent_status).order_by(agent_status.c.cluster, agent_status.c.agent_id)
            )
            out: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                out.setdefault(row.cluster, []).append(
                    {
                        "agentId": row.agent_id,
                        "appliedRevision": row.policy_revision,
                        "appliedRegistryRevision": row.registry_revision,
                        "lastSeen": row.last_seen,
                    }
                )
            return out

    # -- revocation -----------------------------------------------------------------------
    @property
    def revocations(self) -> RevocationSet:
        return self._revocations

    def revoked_until(self, subject: str, cluster: str) -> float | None:
        """The latest second up to which tokens of this subject or cluster are revoked."""
        latest = [
            entry.revoked_at
            for entry in (
                self._revocations.latest("subject", subject),
                self._revocations.latest("cluster", cluster),
            )
            if entry is not None
        ]
        return max(latest) if latest else None

    def revocation_of(self, identity: VerifiedIdentity) -> Revocation | None:
        return self._revocations.revoked(
            jti=identity.jti,
            subject=identity.spiffe_id,
            cluster=identity.cluster,
            kid=identity.kid,
            issued_at=float(identity.claims.get("iat", 0)),
        )

    def revoke(self, kind: str, value: str, reason: str, actor: str) -> tuple[Revocation, bool]:
        """DESIGN §5. ``kind``: jti, subject (a SPIFFE ID of the trust domain), workload
        (its SPIFFE ID is revoked), cluster (registered), key (a published kid: it also
        leaves JWKS, and if it was active the prepared key takes over)."""
        if kind == "workload":
            if value not in self._registry.workloads:
                raise NotFound(f"workload {value} is not registered")
            kind, value = "subject", self._registry.spiffe_id_of(value)
        elif kind == "subject":
            try:
                domain, _ = parse_spiffe_id(value)
            except SpiffeIdError as exc:
                raise RevocationError(str(exc)) from None
            if domain != self.trust_domain:
                raise RevocationError(f"{value} is not in trust domain {self.trust_domain}")
        elif kind == "cluster":
            if value not in self._registry.clusters:
                raise NotFound(f"cluster {value} is not registered")
        elif kind == "key":
            existing = self._revocations.latest("key", value)
            if existing is None:
                try:
                    self.keys.revoke(value)
                except LookupError:
                    raise NotFound(f"no published signing key {value}") from None

        def record(conn: Connection, entry: Revocation) -> None:
            self.stage(
                conn,
                ev.REVOCATION_CREATED,
                _actor_name(actor),
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
                self.stage(
                    conn,
                    ev.KEY_ROTATED,
                    _actor_name(actor),
                    {
                        "revoked_kid": entry.value,
                        "active_kid": self.keys.active_kid(conn),
                        "reason": "key revoked",
                    },
                )

        entry, created = self.revocation_store.revoke(kind, value, reason, actor, on_commit=record)
        self.refresh()
        if created:
            self.drain_audit()
        return entry, created

    def wait_for_change(self) -> asyncio.Event:
        return self._changed

    def begin_stopping(self) -> None:
        """Called from the signal handler: long polls answer at once from now on."""
        self.stopping = True

    def notify_changes(self) -> None:
        """Wake long-polling agents if a revision moved (call on the event loop)."""
        version = self.change_marker()
        if version != self._notified_version:
            self._notified_version = version
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    def list_objects(self, kind: str) -> list[dict[str, Any]]:
        items = self.registry_store.list_bodies(kind)
        if kind == "Cluster":
            agents = self.agent_states()
            now = time.time()
            for item in items:
                reports = agents.get(item["metadata"]["name"], [])
                fresh = [a for a in reports if now - a["lastSeen"] < AGENT_STALE_AFTER]
                applied = sorted({a["appliedRevision"] for a in fresh})
                item["status"]["policy"] = {
                    "desiredRevision": self._policy_revision,
                    "appliedRevisions": applied,
                    "agents": reports,
                    "drift": bool(fresh) and applied != [self._policy_revision],
                    "agentsReporting": len(fresh),
                }
        if kind == "Workload":
            registry = self._registry
            for item in items:
                name = item["metadata"]["name"]
                if name in registry.workloads:
                    item["status"]["spiffeId"] = registry.spiffe_id_of(name)
        return items

    def list_keys(self) -> list[KeyRecord]:
        return self.keys.list_keys()

    def rotate_keys(self, actor: str = "admin") -> KeyRecord:
        def record(conn: Connection, new: KeyRecord, previous: str) -> None:
            self.stage(
                conn,
                ev.KEY_ROTATED,
                _actor_name(actor),
                {"active_kid": new.kid, "previous_kid": previous, "reason": "requested"},
            )

        rotated = self.keys.rotate(on_commit=record)
        self.refresh()
        self.drain_audit()
        return rotated

    def cluster_credential(self, cluster: str, actor: str) -> str:
        if cluster not in self.registry_store.load().clusters:
            raise NotFound(f"cluster {cluster} is not registered")

        def record(conn: Connection, secret: str) -> None:
            self.stage(
                conn,
                "admin.credential_issued",
                _actor_name(actor),
                {"kind": CLUSTER, "credential_sha256": ev.token_sha256(secret)},
                cluster=cluster,
            )

        secret = self.credentials.create(
            CLUSTER, created_by=actor, cluster=cluster, on_commit=record
        )
        self.drain_audit()
        return secret

    def agent_config(self, principal: Principal, cluster: str | None) -> dict[str, Any]:
        name = principal.cluster if cluster is None else cluster
        if name is None:
            raise NotFound(
                "name the cluster (?cluster=NAME) when calling with the admin credential"
            )
        if not principal.may_act_for(name):
            raise PermissionError(f"this credential is for cluster {principal.cluster}, not {name}")
        if name not in self._registry.clusters:
            raise NotFound(f"cluster {name} is not registered")
        return {
            "cluster": name,
            "trust_domain": self.trust_domain,
            "issuer": self.issuer,
            "audience": cluster_audience(self.trust_domain, name),
        }


def _actor_name(actor: str) -> str:
    """Actors in audit events: ``admin:NAME`` for people (``--author`` or the admin
    credential), ``cluster:NAME`` for agents, ``system`` for the server itself."""
    if actor.startswith(("admin:", "cluster:", "spiffe://")) or actor in ("system", "admin"):
        return actor[:200]
    return f"admin:{actor}"[:200]


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
