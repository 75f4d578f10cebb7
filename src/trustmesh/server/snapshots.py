"""A replica's view of the control plane's state, and the one place it changes.

State has one owner: the database. Each replica keeps immutable snapshots of what its
hot paths read — the registry, the signing keys (and a verifier over them), the X.509
CA roots, the policy in force, the revocation list, the suspensions, the federated
trust domains' bundles — and swaps one when its revision counter in the
``meta`` table moves: :meth:`Snapshots.refresh` runs every ``refresh_interval`` and
right after this replica's own writes, so several stateless replicas on one PostgreSQL
database agree within that interval. Nothing on the exchange path touches the
database for them: a suspension is checked against :attr:`Snapshots.suspensions`.

Long polls (agents waiting for a bundle or revocations, SSF receivers) wait on
:meth:`Snapshots.wait_until`, woken by :meth:`Snapshots.notify_changes` when a revision
moves, and ended at once when the replica begins to stop. A credential holds at most
``long_polls_per_credential`` of them at once on a replica (:class:`LongPollLimit`):
beyond, 429 with ``Retry-After``, so one leaked credential cannot hold every connection
the replica will take."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from trustmesh.common.clock import Clock
from trustmesh.common.errors import TooManyRequests
from trustmesh.common.limits import DEFAULT_LONG_POLLS_PER_CREDENTIAL
from trustmesh.identity.keys import KeyManager, KeySet
from trustmesh.identity.svid import SVID_TYPS, KeyRing, SvidVerifier, VerifiedIdentity
from trustmesh.identity.x509ca import CaManager, CaSet
from trustmesh.policy.catalog import PolicyCatalog, documents_of
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry import Registry, RegistryStore
from trustmesh.registry.federation import FederationSet, FederationStore
from trustmesh.revocation import Revocation, RevocationSet
from trustmesh.revocation.store import RevocationStore
from trustmesh.revocation.suspension import SuspensionSet, SuspensionStore
from trustmesh.storage import Database
from trustmesh.storage import meta as meta_store

WAIT_SLICE = 0.5  # long polls look at the stop flag at least this often
LONG_POLL_RETRY_AFTER = 5  # seconds; a poll held elsewhere ends within ~30 s


class LongPollLimit:
    """How many long polls (and revocation streams) each credential holds on this
    replica, at most ``per_credential`` at once. Runs on the event loop only."""

    def __init__(self, per_credential: int = DEFAULT_LONG_POLLS_PER_CREDENTIAL) -> None:
        if per_credential < 1:
            raise ValueError("a credential must be allowed at least one long poll")
        self.per_credential = per_credential
        self._held: dict[str, int] = {}

    def held(self, credential: str) -> int:
        return self._held.get(credential, 0)

    def acquire(self, credential: str) -> Callable[[], None]:
        """Take one of the credential's long polls, or raise TooManyRequests; returns
        the release (idempotent)."""
        held = self.held(credential)
        if held >= self.per_credential:
            raise TooManyRequests(
                f"this credential already holds {held} long polls on this server (the "
                f"limit); retry once one has ended",
                headers={"Retry-After": str(LONG_POLL_RETRY_AFTER)},
            )
        self._held[credential] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._held[credential] - 1
                if left:
                    self._held[credential] = left
                else:
                    del self._held[credential]

        return release

    @contextlib.contextmanager
    def hold(self, credential: str) -> Iterator[None]:
        release = self.acquire(credential)
        try:
            yield
        finally:
            release()


class Snapshots:
    def __init__(
        self,
        db: Database,
        *,
        issuer: str,
        trust_domain: str,
        keys: KeyManager,
        registry_store: RegistryStore,
        catalog: PolicyCatalog,
        revocation_store: RevocationStore,
        suspension_store: SuspensionStore,
        ca: CaManager,
        federation_store: FederationStore,
        clock: Clock,
        long_polls_per_credential: int = DEFAULT_LONG_POLLS_PER_CREDENTIAL,
    ) -> None:
        self.db = db
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.keys = keys
        self.registry_store = registry_store
        self.catalog = catalog
        self.revocation_store = revocation_store
        self.suspension_store = suspension_store
        self.ca_manager = ca
        self.federation_store = federation_store
        self.clock = clock
        self.stopping = False
        self.long_polls = LongPollLimit(long_polls_per_credential)
        self.last_refresh = 0.0  # monotonic
        self._changed = asyncio.Event()
        self._load()
        self._notified = self.change_marker()

    def _load(self) -> None:
        self._swap_keys(self.keys.load())
        self._load_registry()
        self.revocations: RevocationSet = self.revocation_store.load()
        self.suspensions: SuspensionSet = self.suspension_store.load()
        self.ca: CaSet = self.ca_manager.load()
        self.federation: FederationSet = self.federation_store.load()
        self._load_policy()
        self.last_refresh = time.monotonic()

    def _load_policy(self) -> None:
        version = self.catalog.current()
        self.policy = PolicySet.from_documents(documents_of(version))
        self.policy_revision = version.revision
        self.policy_published_at = version.created_at

    def _load_registry(self) -> None:
        with self.db.engine.connect() as conn:
            self.registry: Registry = self.registry_store.load(conn)
            self.registry_published_at = (
                meta_store.published_at(conn, meta_store.REGISTRY_REVISION) or 0.0
            )

    def bundle_published_at(self) -> float:
        """When the version of :meth:`bundle_version` was published: the later of its
        policy revision's commit and its registry revision's (a registry changed
        before this was recorded counts as 0, i.e. the policy's time)."""
        return max(self.policy_published_at, self.registry_published_at)

    def _swap_keys(self, keyset: KeySet) -> None:
        self.keyset = keyset
        self.verifier = SvidVerifier(
            issuer=self.issuer,
            trust_domain=self.trust_domain,
            audience=None,
            keys=KeyRing(keyset.jwks(), accepted_typs=SVID_TYPS),
            clock=self.clock,
        )

    def refresh(self) -> None:
        """Reload whatever another replica (or this one) changed."""
        with self.db.engine.connect() as conn:
            revisions = meta_store.revisions(conn)
        if revisions.get(meta_store.KEYS_REVISION, 0) != self.keyset.revision:
            self._swap_keys(self.keys.load())
        if revisions.get(meta_store.REGISTRY_REVISION, 0) != self.registry.revision:
            self._load_registry()
        if revisions.get(meta_store.REVOCATION_REVISION, 0) != self.revocations.revision:
            self.revocations = self.revocation_store.load()
        if revisions.get(meta_store.POLICY_REVISION, 0) != self.policy_revision:
            self._load_policy()
        if revisions.get(meta_store.SUSPENSION_REVISION, 0) != self.suspensions.revision:
            self.suspensions = self.suspension_store.load()
        if revisions.get(meta_store.CA_REVISION, 0) != self.ca.revision:
            self.ca = self.ca_manager.load()
        if revisions.get(meta_store.FEDERATION_REVISION, 0) != self.federation.revision:
            self.federation = self.federation_store.load()
        self.last_refresh = time.monotonic()

    def age(self) -> float:
        """Seconds since the snapshots were last checked against the database."""
        return time.monotonic() - self.last_refresh

    # -- reads of the revocation snapshot ------------------------------------------------
    def revoked_until(self, subject: str, cluster: str) -> float | None:
        """The latest second up to which tokens of this subject or cluster are revoked."""
        latest = [
            entry.revoked_at
            for entry in (
                self.revocations.latest("subject", subject),
                self.revocations.latest("cluster", cluster),
            )
            if entry is not None
        ]
        return max(latest) if latest else None

    def revocation_of(self, identity: VerifiedIdentity) -> Revocation | None:
        return self.revocations.revoked(
            jti=identity.jti,
            subject=identity.spiffe_id,
            cluster=identity.cluster,
            kid=identity.kid,
            issued_at=float(identity.claims.get("iat", 0)),
        )

    # -- change notification -------------------------------------------------------------
    def bundle_version(self) -> tuple[int, int]:
        """(policy revision, registry revision): what an agent's bundle is built from."""
        return (self.policy_revision, self.registry.revision)

    def change_marker(self) -> tuple[int, int, int]:
        return (*self.bundle_version(), self.revocations.revision)

    def notify_changes(self) -> None:
        """Wake the long polls if a revision moved (call on the event loop)."""
        marker = self.change_marker()
        if marker != self._notified:
            self._notified = marker
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    def begin_stopping(self) -> None:
        """From the signal handler: long polls answer at once from now on."""
        self.stopping = True

    async def wait_until(
        self, done: Callable[[], bool], timeout: float, holder: str | None = None
    ) -> bool:
        """Wait until ``done()`` holds (looked at after every change), ``timeout``
        seconds pass, or the replica begins to stop; returns ``done()``. A wait for
        ``holder`` (a credential id) counts against its long polls (TooManyRequests
        beyond); one that ends at once does not."""
        if holder is not None and timeout > 0 and not done() and not self.stopping:
            with self.long_polls.hold(holder):
                return await self.wait_until(done, timeout)
        deadline = time.monotonic() + timeout
        while not done() and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):  # slices, so a shutdown ends the wait
                await asyncio.wait_for(self._changed.wait(), min(remaining, WAIT_SLICE))
        return done()

    async def next_change(self, timeout: float) -> bool:
        """Wait for the next change notification; False after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True
