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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustmesh.identity.keys import KeyManager, KeyRecord, KeySet
from trustmesh.identity.kubernetes_sa import ClusterKeyCache
from trustmesh.identity.rfc8693 import DEFAULT_TTL, TokenExchange
from trustmesh.identity.sealing import MasterKey
from trustmesh.identity.spiffe import cluster_audience, normalize_trust_domain
from trustmesh.identity.svid import KeyRing, SvidVerifier
from trustmesh.manifests import Document, ManifestError, Problem, parse_text
from trustmesh.registry import AppliedChange, Registry, RegistryStore
from trustmesh.server.credentials import CLUSTER, CredentialStore, Principal
from trustmesh.storage import Database, open_database
from trustmesh.storage import meta as meta_store

log = logging.getLogger("trustmesh.server")

SPIFFE_REFRESH_HINT = 60


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
        self.keys = KeyManager(
            self.db, MasterKey.load_or_create(master_path), self.config.signing_alg
        )
        self.keys.check_master_key()
        self.keys.ensure_keys()
        self.credentials = CredentialStore(self.db)
        self.admin_token_created = self.credentials.ensure_admin(data_dir / "admin.token")
        self.registry_store = RegistryStore(self.db, self.trust_domain)
        self._swap_keys(self.keys.load())
        self._registry = self.registry_store.load()
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
            default_ttl=self.config.default_ttl,
        )
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="refresh"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
            keys=KeyRing(keyset.jwks()),
        )

    def refresh(self) -> None:
        """Reload whatever another replica (or this one) changed."""
        with self.db.engine.connect() as conn:
            revisions = meta_store.revisions(conn)
        if revisions.get(meta_store.KEYS_REVISION, 0) != self._keyset.revision:
            self._swap_keys(self.keys.load())
        if revisions.get(meta_store.REGISTRY_REVISION, 0) != self._registry.revision:
            self._registry = self.registry_store.load()
        self.last_refresh = time.monotonic()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # keep serving from the last snapshot; /readyz reports it
                log.exception("refreshing state from the database failed")

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.maintain)
            except Exception:
                log.exception("key maintenance failed")
            await asyncio.sleep(self.config.maintenance_interval)

    def maintain(self, now: float | None = None) -> None:
        rotated = self.keys.rotate_if_older_than(self.config.key_rotation_interval, now)
        removed = self.keys.remove_expired(now)
        if rotated is not None or removed:
            if rotated is not None:
                log.warning("signing key rotated automatically: %s is active", rotated.kid)
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
        self, files: list[tuple[str, str]], actor: str, dry_run: bool = False
    ) -> tuple[int, list[AppliedChange]]:
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
        revision, changes = self.registry_store.apply(documents, actor, dry_run)
        if not dry_run:
            self.refresh()
        return revision, changes

    def list_objects(self, kind: str) -> list[dict[str, Any]]:
        items = self.registry_store.list_bodies(kind)
        if kind == "Workload":
            registry = self._registry
            for item in items:
                name = item["metadata"]["name"]
                if name in registry.workloads:
                    item["status"]["spiffeId"] = registry.spiffe_id_of(name)
        return items

    def list_keys(self) -> list[KeyRecord]:
        return self.keys.list_keys()

    def rotate_keys(self) -> KeyRecord:
        record = self.keys.rotate()
        self.refresh()
        return record

    def cluster_credential(self, cluster: str, actor: str) -> str:
        if cluster not in self.registry_store.load().clusters:
            raise NotFound(f"cluster {cluster} is not registered")
        return self.credentials.create(CLUSTER, created_by=actor, cluster=cluster)

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
