"""The control plane's composition root: it opens the database, builds each service
over it, and runs the background loops. Nothing here imports the web framework; the
routes (``server/routes/``) call the services it holds.

=====================  ===========================================================
``snapshots``          the replica's registry, keys, policy and revocation snapshots
``recorder``           the control plane's own audit events (``audit`` is the log)
``issuance``           RFC 8693 token exchange, audited before the token leaves
``changes``            apply and rollback, through the policy gate
``bundles``            signed per-cluster policy bundles
``agents``             agent credentials, configuration and status
``revoker``            revocations
``suspender``          suspensions (and what they revoke)
``rotation``           signing-key rotation
``ca``, ``ca_rotation``  the X.509 CA roots, their rotation on evidence (``root_holders``)
``x509``               X.509-SVID issuance, audited before the certificate leaves
``credentials``        who calls the admin and agent APIs
``credential_admin``   listing, rotating and revoking credentials, audited
``inventory``          the registry's objects with their status
``federation``         federated trust domains: their bundles polled, kept, published
``usage``              pending service accounts and identities' last use (coalesced)
``retirement``         retiring Workloads unused for their ``retireAfterUnused``
``access``             access requests: request, approve (through the gate), deny, expire
``push``               anomaly findings pushed to EventReceivers as signed SETs (RFC 8935)
``analytics``          the detectors' runner (one replica at a time; run here only with
                       ``--analytics thread``, else in ``server/analysis.py``'s child
                       process); ``anomalies`` its findings
``sessions``           the web console's sessions (``server/sessions.py``)
``overview``           the federation at a glance (the console's first page)
``live``               what the console's live pages follow (``server/live.py``)
=====================  ===========================================================

State has one owner, the database; see ``server/snapshots.py`` for how replicas agree."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.exc import OperationalError

from trustmesh.analytics.detectors import Detector, all_detectors
from trustmesh.analytics.escalation import EscalationDetector
from trustmesh.audit.folding import FoldingLimits
from trustmesh.audit.log import AuditLog
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import ConfigError
from trustmesh.common.files import private_directory
from trustmesh.common.limits import DEFAULT_LONG_POLLS_PER_CREDENTIAL
from trustmesh.common.names import USER_PREFIX
from trustmesh.common.tracing import Tracing
from trustmesh.identity.keys import KeyManager
from trustmesh.identity.kubernetes_sa import (
    DEFAULT_CLUSTER_KEYS_MAX_AGE,
    DEFAULT_MAX_SA_TOKEN_LIFETIME,
    DEFAULT_SA_TOKEN_CACHE_SIZE,
    ClusterKeyCache,
    VerifiedSaTokenCache,
)
from trustmesh.identity.sealing import MasterKey
from trustmesh.identity.x509ca import CaManager
from trustmesh.oauth.rfc8693 import DEFAULT_TTL, TokenExchange
from trustmesh.policy.catalog import PolicyCatalog, documents_of
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry import RegistryStore
from trustmesh.registry.federation import FederationStore
from trustmesh.registry.observed import TemplateObservations
from trustmesh.revocation.store import RevocationStore
from trustmesh.revocation.suspension import SuspensionStore
from trustmesh.server.access import AccessRequests
from trustmesh.server.agents import Agents
from trustmesh.server.analytics import RUNNER, AnalyticsRunner, Anomalies
from trustmesh.server.bundles import BundleSigner
from trustmesh.server.changes import Changes
from trustmesh.server.cluster_keys import (
    ClusterKeysCollector,
    ClusterKeyStore,
    stored_keys_report,
)
from trustmesh.server.credentials import CredentialAdmin, CredentialRecord, CredentialStore
from trustmesh.server.discovery import discovery, spiffe_bundle
from trustmesh.server.federation import Federation
from trustmesh.server.health import AUDIT, DATABASE, ISSUE, SERVE, Health
from trustmesh.server.inventory import Inventory
from trustmesh.server.issuance import Issuance
from trustmesh.server.live import ANOMALIES, OVERVIEW, LiveFeed, anomalies_fingerprint
from trustmesh.server.login import Logins
from trustmesh.server.metrics import AgentStatusCollector, AnalyticsCollector, ServerMetrics
from trustmesh.server.overview import Overview
from trustmesh.server.policy_views import PolicyViews
from trustmesh.server.push import PushDelivery
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.reports import Reports
from trustmesh.server.retirement import Retirement
from trustmesh.server.revoke import Revoker, Suspender
from trustmesh.server.roots import CaRotation, RootHolders
from trustmesh.server.rotation import KeyRotation
from trustmesh.server.sessions import SessionStore
from trustmesh.server.snapshots import Snapshots
from trustmesh.server.usage import (
    DEFAULT_FLUSH_INTERVAL,
    PENDING_PER_CLUSTER,
    PENDING_TOTAL,
    UsageTracker,
)
from trustmesh.server.x509svids import DEFAULT_SVID_TTL, X509Issuance, X509Signer
from trustmesh.spiffeid import normalize_trust_domain
from trustmesh.storage import Database, open_database
from trustmesh.storage import meta as meta_store

log = logging.getLogger("trustmesh.server")

SEQUENCER_LOCK_FILE = "audit-sequencer.lock"  # SQLite: where processes queue to sequence
WAL_CHECKPOINT_INTERVAL = 1.0  # seconds between SQLite WAL checkpoints
ACCESS_EXPIRY_INTERVAL = 1.0  # seconds between looks for access requests past their expiry
SUSPENSION_GRACE = 2.0  # seconds a suspension's revocation reaches ahead (other replicas)
ANALYTICS_INTERVAL = 1.0  # seconds between the analytics runner's rounds
ANALYTICS_LEASE = 5.0  # seconds the runner's lease lasts unrenewed (another replica then)
ANALYTICS_MODES = ("process", "thread", "off")
"""Where a replica runs the analytics runner (``trustmesh server --analytics``):
``process``, a child process of its own (``server/analysis.py``, started by the serving
process or the workers' supervisor), so the detectors never share the sequencer's
interpreter; ``thread``, a loop of this ControlPlane (for embedding); ``off``, none here."""


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    trust_domain: str
    db: str | None = None
    issuer: str | None = None
    signing_alg: str = "ES256"
    default_ttl: int = DEFAULT_TTL
    key_rotation_interval: float = 7 * 86400.0
    ca_rotation_interval: float = 90 * 86400.0
    svid_ttl: int = DEFAULT_SVID_TTL
    refresh_interval: float = 1.0
    maintenance_interval: float = 30.0
    cluster_jwks_min_refresh: float = 1.0
    max_sa_token_lifetime: float = DEFAULT_MAX_SA_TOKEN_LIFETIME
    cluster_keys_max_age: float = DEFAULT_CLUSTER_KEYS_MAX_AGE
    sa_token_cache_size: int = DEFAULT_SA_TOKEN_CACHE_SIZE
    master_key_file: Path | None = None
    audit_checkpoint_interval: float = 0.5
    audit_refusals: FoldingLimits = field(default_factory=FoldingLimits)
    otel_exporter: str = "none"
    long_polls_per_credential: int = DEFAULT_LONG_POLLS_PER_CREDENTIAL
    usage_flush_interval: float = DEFAULT_FLUSH_INTERVAL
    pending_per_cluster: int = PENDING_PER_CLUSTER
    pending_total: int = PENDING_TOTAL
    analytics_interval: float = ANALYTICS_INTERVAL
    analytics_lease: float = ANALYTICS_LEASE
    analytics: str = "process"


class ControlPlane:
    def __init__(self, config: ServerConfig, issuer: str, clock: Clock = system_clock) -> None:
        if config.analytics not in ANALYTICS_MODES:
            raise ConfigError(f"analytics must be one of {', '.join(ANALYTICS_MODES)}")
        self.config = config
        self.issuer = issuer.rstrip("/")
        self.trust_domain = normalize_trust_domain(config.trust_domain)
        self.clock = clock
        self.replica = secrets.token_hex(6)
        self.tracing = Tracing("trustmesh-server", config.otel_exporter)
        self.admin_token_created = False
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.health = Health()
        self.db: Database
        self.keys: KeyManager
        self.credentials: CredentialStore
        self.sessions: SessionStore
        self.live: LiveFeed
        self.overview: Overview
        self.credential_admin: CredentialAdmin
        self.suspension_store: SuspensionStore
        self.suspender: Suspender
        self.registry_store: RegistryStore
        self.catalog: PolicyCatalog
        self.revocation_store: RevocationStore
        self.snapshots: Snapshots
        self.audit: AuditLog
        self.recorder: AuditRecorder
        self.sa_tokens: VerifiedSaTokenCache
        self.cluster_keys: ClusterKeyCache
        self.metrics: ServerMetrics
        self.issuance: Issuance
        self.changes: Changes
        self.bundles: BundleSigner
        self.agents: Agents
        self.revoker: Revoker
        self.rotation: KeyRotation
        self.inventory: Inventory
        self.policy_views: PolicyViews
        self.ca: CaManager
        self.root_holders: RootHolders
        self.ca_rotation: CaRotation
        self.x509: X509Issuance
        self.federation: Federation
        self.push: PushDelivery
        self.usage: UsageTracker
        self.retirement: Retirement
        self.access: AccessRequests
        self.analytics: AnalyticsRunner
        self.anomalies: Anomalies

    # -- start-up -----------------------------------------------------------------------
    def open(self) -> None:
        """Synchronous set-up: database, migrations, master key, keys, admin credential,
        snapshots, audit log, services."""
        config, data_dir = self.config, self.config.data_dir
        private_directory(data_dir, "data dir")  # ours, writable by no one else, 0700
        self.db = open_database(config.db, data_dir, background_wal_checkpoints=True)
        with self.db.engine.begin() as conn:
            stored = meta_store.insert_if_absent(conn, "trust_domain", self.trust_domain)
        if stored != self.trust_domain:
            raise ConfigError(
                f"this database belongs to trust domain {stored}, not {self.trust_domain}; "
                "a trust domain cannot change (every issued identity names it)"
            )
        mounted = config.master_key_file or os.environ.get("TRUSTMESH_MASTER_KEY_FILE")
        master_key = (
            MasterKey.load(Path(mounted))  # read only (DESIGN §7): may be a Secret mount
            if mounted
            else MasterKey.load_or_create(data_dir / "master.key")
        )
        self.keys = KeyManager(self.db, master_key, config.signing_alg)
        self.keys.check_master_key()
        self.keys.ensure_keys()
        self.ca = CaManager(self.db, master_key, self.trust_domain)
        self.ca.ensure_roots()
        self.credentials = CredentialStore(self.db, self.clock)
        self.admin_token_created = self.credentials.ensure_admin(data_dir / "admin.token")
        self.registry_store = RegistryStore(self.db, self.trust_domain)
        self.observations = TemplateObservations(self.db)
        self.catalog = PolicyCatalog(self.db)
        self.revocation_store = RevocationStore(self.db)
        self.suspension_store = SuspensionStore(self.db)
        federation_store = FederationStore(self.db)
        self.snapshots = Snapshots(
            self.db,
            issuer=self.issuer,
            trust_domain=self.trust_domain,
            keys=self.keys,
            registry_store=self.registry_store,
            catalog=self.catalog,
            revocation_store=self.revocation_store,
            suspension_store=self.suspension_store,
            ca=self.ca,
            federation_store=federation_store,
            clock=self.clock,
            long_polls_per_credential=config.long_polls_per_credential,
        )
        self.audit = AuditLog(
            self.db,
            master_key,
            self.trust_domain,
            self.replica,
            config.audit_checkpoint_interval,
            lock_file=data_dir / SEQUENCER_LOCK_FILE if self.db.dialect == "sqlite" else None,
        )
        self.audit.open()
        self.recorder = AuditRecorder(self.audit, self.clock, config.audit_refusals)
        self.sessions = SessionStore(self.db, self.credentials, self.recorder, self.clock)
        self.sa_tokens = VerifiedSaTokenCache(config.sa_token_cache_size)
        self.metrics = ServerMetrics(self.audit, self.recorder, self.sa_tokens, self.clock)
        self.metrics.registry.register(AnalyticsCollector(self.db, RUNNER))
        snapshots = self.snapshots
        self.usage = UsageTracker(
            self.db,
            self.clock,
            lambda: snapshots.registry,
            self.trust_domain,
            per_cluster=config.pending_per_cluster,
            total=config.pending_total,
        )
        self.retirement = Retirement(
            self.db,
            self.suspension_store,
            self.revocation_store,
            self.registry_store,
            self.snapshots,
            self.recorder,
            self.usage,
            self.clock,
            grace=max(SUSPENSION_GRACE, 2 * config.refresh_interval),
        )
        self.changes = Changes(
            self.db,
            self.registry_store,
            self.catalog,
            self.snapshots,
            self.recorder,
            self.retirement,
            self.usage,
        )
        self.access = AccessRequests(
            self.db,
            self.snapshots,
            self.catalog,
            self.changes,
            self.credentials,
            self.recorder,
            self.clock,
            observe_fulfillment=self.metrics.access_fulfillment.observe,
        )
        self.bundles = BundleSigner(self.snapshots)
        self.agents = Agents(
            self.db,
            self.snapshots,
            self.credentials,
            self.registry_store,
            self.suspension_store,
            self.recorder,
            self.clock,
        )
        self.credential_admin = CredentialAdmin(self.credentials, self.recorder)
        self.logins = Logins(
            self.snapshots, self.recorder, self.clock, self.issuer, self.trust_domain
        )
        self.revoker = Revoker(
            self.revocation_store, self.keys, self.snapshots, self.recorder, self.ca
        )
        self.suspender = Suspender(
            self.db,
            self.suspension_store,
            self.revocation_store,
            self.credentials,
            self.snapshots,
            self.recorder,
            self.clock,
            grace=max(SUSPENSION_GRACE, 2 * config.refresh_interval),
        )
        self.rotation = KeyRotation(
            self.keys, self.snapshots, self.recorder, config.key_rotation_interval
        )
        self.root_holders = RootHolders(self.db, self.clock)
        self.ca_rotation = CaRotation(
            self.ca,
            self.root_holders,
            self.snapshots,
            self.recorder,
            config.ca_rotation_interval,
            self.clock,
        )
        self.inventory = Inventory(
            self.registry_store,
            self.snapshots,
            self.agents,
            self.ca_rotation,
            self.observations,
            self.usage,
        )
        self.reports = Reports(self.db, self.snapshots, self.inventory, self.usage)
        self.policy_views = PolicyViews(self.catalog, self.snapshots, self.inventory, self.clock)
        self.federation = Federation(
            federation_store, self.registry_store, self.snapshots, self.recorder, self.clock
        )
        self.push = PushDelivery(
            self.db,
            self.registry_store,
            self.snapshots,
            self.replica,
            self.clock,
            self.metrics.registry,
        )
        self.analytics = AnalyticsRunner(
            self.db,
            self.detectors(),
            self.snapshots,
            self.recorder,
            self.suspender,
            self.clock,
            self.replica,
            lease_seconds=config.analytics_lease,
        )
        self.anomalies = Anomalies(self.db, self.recorder, self.clock)
        self.overview = Overview(self.db, self.snapshots, self.agents, self.keys, self.clock)
        self.live = LiveFeed(
            {OVERVIEW: self.overview.fingerprint, ANOMALIES: anomalies_fingerprint(self.db)}
        )

    def detectors(self) -> list[Detector]:
        """The detectors the analytics runner feeds (``analytics/``), in order."""
        snapshots, catalog = self.snapshots, self.catalog

        def policy_at(revision: int) -> PolicySet | None:
            version = catalog.get(revision)
            return None if version is None else PolicySet.from_documents(documents_of(version))

        return [EscalationDetector(policy_at, lambda: snapshots.registry), *all_detectors()]

    def remove_person(self, name: str, actor: str, reason: str) -> CredentialRecord:
        """``trustmesh user remove``: the person's credential is revoked, and so are
        their login tokens on every agent (a subject revocation of ``user:NAME``)."""
        removed = self.credential_admin.remove_person(name, actor, reason)
        self.revoker.revoke("subject", f"{USER_PREFIX}{name}", reason or "user removed", actor)
        return removed

    def audit_accepted(self, events: Iterable[Mapping[str, Any]]) -> None:
        """The events of an agent's batch the log just sequenced: their lag (a metric)
        and the identities' last use (``server/usage.py``)."""
        accepted = list(events)
        self.metrics.sequencing.observe(accepted)
        self.usage.decisions(accepted)

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        snapshots = self.snapshots
        self.cluster_keys = ClusterKeyCache(
            self._http,
            clock=self.clock,
            min_refresh_interval=self.config.cluster_jwks_min_refresh,
            max_keys_age=self.config.cluster_keys_max_age,
            store=ClusterKeyStore(self.db, self.recorder),  # the last good sets (DESIGN §10)
        )
        self.metrics.registry.register(ClusterKeysCollector(self.cluster_keys, self.clock))
        self.metrics.registry.register(
            AgentStatusCollector(
                self.agents.reports,
                snapshots.bundle_version,
                snapshots.bundle_published_at,
                self.clock,
            )
        )
        exchange = TokenExchange(
            issuer=self.issuer,
            trust_domain=self.trust_domain,
            cluster_keys=self.cluster_keys,
            registry=lambda: snapshots.registry,
            keyset=lambda: snapshots.keyset,
            revoked_until=snapshots.revoked_until,
            suspensions=lambda: snapshots.suspensions,
            clock=self.clock,
            default_ttl=self.config.default_ttl,
            max_sa_token_lifetime=self.config.max_sa_token_lifetime,
            sa_tokens=self.sa_tokens,
        )
        self.issuance = Issuance(
            exchange,
            self.recorder,
            self.tracing,
            self.metrics,
            self.usage,
            self.clock,
            self.observations,
        )
        signer = X509Signer(
            exchange=exchange,
            registry=lambda: snapshots.registry,
            ca=lambda: snapshots.ca,
            revoked_until=snapshots.revoked_until,
            suspensions=lambda: snapshots.suspensions,
            clock=self.clock,
            default_ttl=self.config.svid_ttl,
        )
        self.x509 = X509Issuance(
            signer,
            self.recorder,
            self.tracing,
            self.metrics,
            self.root_holders,
            self.usage,
            self.observations,
        )
        self.recorder.start()
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="refresh"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._checkpoint_loop(), name="audit-checkpoints"),
            asyncio.create_task(self.federation.run(), name="federation"),
            asyncio.create_task(self.push.run(), name="push"),
            asyncio.create_task(self._usage_loop(), name="usage"),
            asyncio.create_task(self._access_loop(), name="access-expiry"),
        ]
        if self.config.analytics == "thread":
            self._tasks.append(asyncio.create_task(self._analytics_loop(), name="analytics"))
        if self.db.dialect == "sqlite":
            self._tasks.append(asyncio.create_task(self._wal_loop(), name="sqlite-wal"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush_usage()
        if self.config.analytics == "thread":
            await self._release_analytics()
        await self.recorder.close()
        self.tracing.shutdown()
        try:  # the last events get a signed checkpoint before the process ends
            await asyncio.to_thread(self.audit.checkpoint_now)
        except Exception:
            log.exception("signing the final audit checkpoint failed")
        if self._http is not None:
            await self._http.aclose()
        self.db.dispose()

    async def analyse(self, stopping: asyncio.Event) -> None:
        """The analytics process (``server/analysis.py``): this replica only refreshes
        its snapshots (an AnomalyPolicy change, a suspension) and runs the detectors'
        rounds, until ``stopping`` is set; then it gives the lease up."""
        tasks = [
            asyncio.create_task(self._refresh_loop(), name="refresh"),
            asyncio.create_task(self._analytics_loop(), name="analytics"),
        ]
        try:
            await stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._release_analytics()
            self.db.dispose()

    async def _release_analytics(self) -> None:
        try:  # another replica takes the runner over at once, not after the lease
            await asyncio.to_thread(self.analytics.release)
        except Exception:
            log.exception("releasing the analytics lease failed")

    # -- background loops -----------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await asyncio.to_thread(self.snapshots.refresh)
            except Exception as exc:  # keep serving from the last snapshot; /readyz says so
                self._database_failed("refreshing state from the database failed", exc)
            else:
                self.health.ok(DATABASE)
            self.snapshots.notify_changes()

    async def _checkpoint_loop(self) -> None:
        """Sequence what a change staged but did not drain (this replica crashed, or
        the drain failed), and sign a checkpoint when the log grew and the sequencer
        did not sign one."""
        interval = max(self.config.audit_checkpoint_interval, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.audit.drain_outbox)
                await asyncio.to_thread(self.audit.checkpoint_now)
            except Exception as exc:
                self.health.failed(AUDIT, exc)
                self._database_failed(
                    "sequencing staged audit events or signing a checkpoint failed", exc
                )
            else:
                self.health.ok(AUDIT)

    async def _usage_loop(self) -> None:
        """Flush last use, then retire what went unused (``server/retirement.py``)."""
        while True:
            await asyncio.sleep(self.config.usage_flush_interval)
            await self.flush_usage()
            try:
                await asyncio.to_thread(self.retirement.retire_due)
            except Exception as exc:
                self._database_failed("retiring unused workloads failed", exc)

    async def _access_loop(self) -> None:
        """Record approved access requests past their expiry (``server/access.py``),
        once across replicas; the agents dropped their bindings at the expiry already."""
        while True:
            await asyncio.sleep(ACCESS_EXPIRY_INTERVAL)
            try:
                await asyncio.to_thread(self.access.expire_due)
            except Exception as exc:
                self._database_failed("recording expired access requests failed", exc)

    async def _analytics_loop(self) -> None:
        """The detectors over the audit log, on the one replica holding the lease
        (``server/analytics.py``)."""
        while True:
            # a round that read a full batch is followed at once: the runner keeps up
            # with the log at the detectors' own rate, not 500 entries a second
            await asyncio.sleep(0 if self.analytics.behind else self.config.analytics_interval)
            try:
                await asyncio.to_thread(self.analytics.run_once)
            except Exception as exc:
                self._database_failed("running the anomaly detectors failed", exc)

    async def flush_usage(self) -> None:
        """Write the pending refusals and last-use times gathered since the last flush
        (``server/usage.py``); on failure they wait for the next one."""
        batch = self.usage.take()
        try:
            await asyncio.to_thread(self.usage.write, batch)
        except Exception as exc:
            self.usage.failures += 1
            self.usage.give_back(batch)
            self._database_failed("writing pending service accounts and last use failed", exc)

    def _database_failed(self, what: str, exc: Exception) -> None:
        """A loop's round failed: a database that cannot be reached is an outage, said in
        one line (once per outage with its traceback), not a traceback a second."""
        if isinstance(exc, OperationalError):
            if self.health.is_ok(DATABASE):
                log.error("%s: the database cannot be reached: %s", what, exc)
            self.health.failed(DATABASE, exc)
            return
        log.exception(what)

    async def _wal_loop(self) -> None:
        """SQLite: checkpoint the WAL every second on a thread of its own, off the
        commits of the exchanges (``storage/db.py``); a commit is also durable from then."""
        while True:
            await asyncio.sleep(WAL_CHECKPOINT_INTERVAL)
            try:
                await asyncio.to_thread(self.db.checkpoint_wal)
            except Exception:
                log.exception("checkpointing the SQLite WAL failed")

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.maintain)
            except Exception:
                log.exception("key maintenance failed")
            await asyncio.sleep(self.config.maintenance_interval)

    def maintain(self, now: float | None = None) -> None:
        """Key rotation and removal, and dropping revocations that cover no valid token."""
        now = self.clock() if now is None else now
        self.revocation_store.remove_expired(now)
        self.snapshots.revocations.expire(now)
        self.rotation.maintain(now)
        self.ca_rotation.maintain(now)

    # -- health -----------------------------------------------------------------------------
    def ready(self, detail: bool = False, check: str = SERVE) -> tuple[bool, dict[str, Any]]:
        """Readiness as an orchestrator needs it (``server/health.py``): ``ready``, each
        check by name, and, when not ready, ``reasons``. ``check``: ``serve`` (discovery,
        JWKS, the bundle, from memory) or ``issue`` (also the database, the audit log
        and fresh state). ``detail`` (an authenticated caller) adds the revisions, the
        active kid, the log's size, the errors behind failing checks and the clusters served
        from their last good key set (no key source answering)."""
        snapshots = self.snapshots
        age = snapshots.age()
        bound = max(10.0, 5 * self.config.refresh_interval)
        checks: dict[str, dict[str, Any]] = {
            "keys": _served(lambda: snapshots.keyset.active.kid),
            "discovery": _served(
                lambda: discovery(self.issuer, self.trust_domain, snapshots.keyset)
            ),
            "jwks": _served(lambda: snapshots.keyset.jwks()),
            "bundle": _served(lambda: spiffe_bundle(snapshots.keyset, snapshots.ca)),
        }
        reasons = [f"{name}: cannot be served" for name, c in checks.items() if not c["ok"]]
        if check == ISSUE:
            checks["state"] = {"ok": age < bound, "age_seconds": round(age, 3)}
            checks["database"] = self.health.check(DATABASE, detail)
            audit = self.health.check(AUDIT, detail)
            if self.audit.inconsistent is not None:
                audit = {**audit, "ok": False, "inconsistent": True}
            checks["audit"] = audit
            if not checks["state"]["ok"]:
                reasons.append(
                    f"state: not refreshed from the database for {age:.0f} s (bound {bound:.0f} s)"
                )
            if not checks["database"]["ok"]:
                reasons.append("database: unreachable; no token is issued without its audit record")
            if not audit["ok"]:
                reasons.append("audit: the log cannot be written or is inconsistent")
        ready = not reasons
        body: dict[str, Any] = {
            "ready": ready,
            "check": check,
            "checks": checks,
            "state_age_seconds": round(age, 3),
            "audit_inconsistent": self.audit.inconsistent,
        }
        if reasons:
            body["reasons"] = reasons
        if detail:
            body.update(
                registry_revision=snapshots.registry.revision,
                keys_revision=snapshots.keyset.revision,
                active_kid=snapshots.keyset.active.kid,
                audit_size=self.audit.size,
                stored_cluster_keys=stored_keys_report(self.cluster_keys, self.clock()),
            )
        return ready, body


def _served(build: Callable[[], object]) -> dict[str, Any]:
    """A document the replica serves from memory can be built now."""
    try:
        build()
    except Exception:
        log.exception("a public document cannot be built")
        return {"ok": False}
    return {"ok": True}
