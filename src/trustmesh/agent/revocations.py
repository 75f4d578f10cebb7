"""The agent's revocation list and how fresh it is (DESIGN §5).

Entries arrive by long poll (``GET /v1/revocations?since=R&wait=25&held=R``): the control
plane answers the moment a revocation is recorded, so every agent enforces it well
within a second; every ``full_resync`` seconds the agent re-reads the whole list as a
backstop. The list is persisted (write, fsync, rename) together with the wall-clock
time of the last successful sync, so a restarted agent enforces what it knew before it
has even reconnected — and knows how old that knowledge is.

**Staleness bound.** If the agent has not heard from the control plane for longer than
``bound`` seconds (default: the default token lifetime, 300 s), its list may miss a
revocation. In strict mode (the default) it then refuses every token — authentication
fails with reason ``revocation_state_stale``, so every surface denies; with fail-open
it keeps answering from what it has and says so in ``/readyz`` and metrics.

**Propagation.** Each entry carries ``published_at`` (when the control plane recorded
it); for the entries a long poll brings, the time from then to their being enforced
here is observed in ``propagation`` (a full read's entries are not: most are old)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from trustmesh.agent.controlplane import ControlPlaneClient
from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock
from trustmesh.common.errors import (
    ControlPlaneError,
    CredentialRejected,
    InvalidToken,
    ResyncNeeded,
)
from trustmesh.common.files import write_atomically
from trustmesh.common.histogram import LAG_BUCKETS, Histogram
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.revocation import Revocation, RevocationSet

log = logging.getLogger("trustmesh.agent")

REVOCATIONS_FILE = "revocations.json"
DEFAULT_STALENESS_BOUND = 300.0
LONG_POLL_SECONDS = 25.0
FULL_RESYNC_SECONDS = 600.0


class RevocationHolder:
    """Owns the agent's revocation set and knows how old it is, on the agent's clock."""

    def __init__(
        self,
        data_dir: Path,
        clock: Clock,
        bound: float = DEFAULT_STALENESS_BOUND,
        fail_open: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.clock = clock
        self.bound = bound
        self.fail_open = fail_open
        self.revocations = RevocationSet()
        self.synced_at: float | None = None  # wall clock of the last successful sync
        self.last_error: str | None = None
        self.propagation = Histogram(LAG_BUCKETS)
        self.last_lag: float | None = None

    # -- freshness -------------------------------------------------------------------
    def age(self, now: float | None = None) -> float:
        if self.synced_at is None:
            return float("inf")
        return max(0.0, (self.clock() if now is None else now) - self.synced_at)

    def stale(self, now: float | None = None) -> bool:
        return self.age(now) > self.bound

    def enforcing_denial(self, now: float | None = None) -> bool:
        """True when strict mode must refuse tokens because the list is too old."""
        return not self.fail_open and self.stale(now)

    def check(self, identity: VerifiedIdentity, now: float) -> None:
        """Raise InvalidToken if ``identity`` may not be used: its token (or its
        subject, cluster or key) is revoked, or the list is staler than its bound in
        strict mode, where every identity is refused. Four O(1) lookups."""
        if self.enforcing_denial(now):
            raise InvalidToken(
                "revocation_state_stale",
                f"the revocation list is {self.age(now):.0f} s old, beyond its {self.bound:.0f} s bound "
                "(strict mode refuses until the control plane is reachable again)",
            )
        entry = self.revocations.revoked(
            jti=identity.jti,
            subject=identity.spiffe_id,
            cluster=identity.cluster,
            kid=identity.kid,
            # A federated domain's JWT-SVID may carry no iat: any subject revocation
            # then covers it (it cannot show it was issued after).
            issued_at=identity.claims.get("iat", 0),
        )
        if entry is not None:
            raise InvalidToken(
                "revoked", f"token revoked ({entry.kind} revocation {entry.revision})"
            )

    def status(self) -> dict[str, Any]:
        age = self.age()
        return {
            "revocation_revision": self.revocations.revision,
            "revocations": len(self.revocations),
            "revocation_age_seconds": None if age == float("inf") else round(age, 3),
            "revocation_bound_seconds": self.bound,
            "revocation_stale": self.stale(),
            "revocation_mode": "fail-open" if self.fail_open else "strict",
            "revocation_error": self.last_error,
        }

    # -- state -------------------------------------------------------------------------
    def apply(self, revision: int, entries: list[Revocation], full: bool) -> bool:
        """Install what the control plane sent; returns whether the set changed."""
        now = self.clock()
        if full:
            replacement = RevocationSet(entries)
            replacement.revision = revision
            changed = [e.revision for e in replacement.entries()] != [
                e.revision for e in self.revocations.entries()
            ]
            self.revocations = replacement
        else:
            changed = self.revocations.apply(entries) > 0
            self.revocations.revision = max(self.revocations.revision, revision)
        self.revocations.expire(now)
        self.synced_at = now
        self.persist()
        if not full:
            enforced = self.clock()
            for entry in entries:
                if entry.published_at is not None:
                    self.last_lag = max(0.0, enforced - entry.published_at)
                    self.propagation.observe(self.last_lag)
        return changed

    def persist(self) -> None:
        document = json.loads(self.revocations.to_json())
        document["synced_at"] = self.synced_at
        write_atomically(self.data_dir / REVOCATIONS_FILE, json.dumps(document))

    def restore(self) -> bool:
        path = self.data_dir / REVOCATIONS_FILE
        try:
            document = json.loads(path.read_text())
            revocations = RevocationSet(Revocation.from_json(e) for e in document["entries"])
            revocations.revision = int(document["revision"])
            synced_at = document.get("synced_at")
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return False
        revocations.expire(self.clock())
        self.revocations = revocations
        self.synced_at = float(synced_at) if synced_at is not None else None
        return True


RECONNECT_CAP = 5.0  # the longest wait between attempts while the control plane is away


async def run_revocation_sync(client: ControlPlaneClient, holder: RevocationHolder) -> None:
    """The first round is always a full read, answered at once (never a long poll: with
    nothing newer to send, that would hold the agent's readiness for its whole wait).
    Each long poll reports the revision the list is at (``held``, the overview's
    revocation lag); a full read does not: it replaces the list, and the revision kept
    from before may be ahead of a control plane restored from a backup."""
    backoff = Backoff(base=0.2, cap=RECONNECT_CAP)
    last_full: float | None = None  # monotonic; None: no full read yet
    while True:
        full = last_full is None or time.monotonic() - last_full > FULL_RESYNC_SECONDS
        since = 0 if full else holder.revocations.revision
        try:
            revision, entries = await client.fetch_revocations(
                since, 0.0 if full else LONG_POLL_SECONDS, None if full else since
            )
            holder.apply(revision, entries, full)
            if full:
                last_full = time.monotonic()
            holder.last_error = None
            backoff.reset()
            continue
        except CredentialRejected as exc:
            holder.last_error = str(exc)
            log.error("revocations: %s", exc)
        except ResyncNeeded:
            last_full = None
            continue
        except (ControlPlaneError, OSError) as exc:
            holder.last_error = f"revocation sync failed: {exc.__class__.__name__}: {exc}"
            log.warning("%s", holder.last_error)
        await asyncio.sleep(backoff.next_delay())
