"""The agent's policy: the verified bundle of its cluster and the engine built from it.

Bundles arrive by long poll (``GET /v1/agent/bundle?after=P.R&wait=25``): the control
plane answers as soon as a newer revision exists, so a change reaches agents within
about a second of being applied; a poll that times out is simply repeated, which makes
the long poll also the periodic pull. A bundle is used only if its signature verifies
with the agent's key set, it names this cluster, and its (policy revision, registry
revision) moves forward; then the new engine is swapped in with one assignment.
The last accepted bundle is kept in the data dir so a restarted agent enforces it
before reconnecting.

**Propagation.** A bundle carries ``publishedAt`` (epoch seconds: when the control
plane's policy or registry revision it is built from was committed); the time from
then to the bundle being in force here is observed in ``propagation`` and kept as
``last_lag`` (a bundle restored from the data dir is not counted)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

from trustmesh.agent.controlplane import ControlPlaneClient
from trustmesh.agent.keys import KeySync
from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock
from trustmesh.common.errors import ControlPlaneError, CredentialRejected, InvalidToken
from trustmesh.common.files import write_atomically
from trustmesh.common.histogram import LAG_BUCKETS, Histogram
from trustmesh.identity.svid import KeyRing
from trustmesh.policy.bundle import bundle_version, verify_bundle
from trustmesh.policy.engine import Engine

log = logging.getLogger("trustmesh.agent")

BUNDLE_FILE = "bundle.jws"
AGENT_ID_FILE = "agent-id"
LONG_POLL_SECONDS = 25.0


def agent_id(data_dir: Path) -> str:
    """A stable id for this agent instance (its data dir), reported with each poll."""
    path = data_dir / AGENT_ID_FILE
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_hex(8)
    write_atomically(path, value + "\n")
    return value


class PolicyHolder:
    """Owns the agent's current engine. Readers take ``engine`` once per decision.
    Bundles are verified with ``keys``, the control plane's published key set."""

    def __init__(self, cluster: str, data_dir: Path, keys: KeyRing, clock: Clock) -> None:
        self.cluster = cluster
        self.data_dir = data_dir
        self.keys = keys
        self.clock = clock
        self.engine: Engine | None = None
        self.version: tuple[int, int] | None = None
        self.last_error: str | None = None
        self.received_at = 0.0
        self.propagation = Histogram(LAG_BUCKETS)
        self.last_lag: float | None = None

    def install(self, token: str, persist: bool = True) -> bool:
        """Verify and install a bundle; returns whether it replaced the current one."""
        bundle = verify_bundle(token, self.keys, self.cluster)
        version = bundle_version(bundle)
        if self.version is not None and version <= self.version:
            return False  # revisions only move forward
        engine = Engine(bundle, clock=self.clock)  # time-bound bindings expire on their own
        self.engine, self.version = engine, version
        self.received_at = self.clock()
        if persist:
            write_atomically(self.data_dir / BUNDLE_FILE, token)
            published = bundle.get("publishedAt")
            if isinstance(published, int | float) and not isinstance(published, bool):
                self.last_lag = max(0.0, self.clock() - float(published))
                self.propagation.observe(self.last_lag)
        log.info("policy revision %s (registry %s) in force", *version)
        return True

    def restore(self) -> bool:
        path = self.data_dir / BUNDLE_FILE
        if not path.exists():
            return False
        try:
            return self.install(path.read_text(), persist=False)
        except (InvalidToken, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring the persisted bundle: %s", exc)
            return False

    def status(self) -> dict[str, Any]:
        return {
            "policy_revision": self.version[0] if self.version else None,
            "registry_revision": self.version[1] if self.version else None,
            "bundle_error": self.last_error,
        }


async def run_bundle_sync(
    client: ControlPlaneClient, holder: PolicyHolder, keys_sync: KeySync, agent: str
) -> None:
    backoff = Backoff(base=0.2, cap=10.0)
    while True:
        after = f"{holder.version[0]}.{holder.version[1]}" if holder.version else None
        try:
            token = await client.fetch_bundle(after, LONG_POLL_SECONDS, agent)
            if token is not None:
                try:
                    holder.install(token)
                except InvalidToken as exc:
                    if exc.reason == "unknown_kid" and await keys_sync.request_refresh():
                        holder.install(token)  # signed by a key we just learned
                    else:
                        raise
            holder.last_error = None
            backoff.reset()
            continue
        except CredentialRejected as exc:
            holder.last_error = str(exc)
            log.error("policy bundle: %s", exc)
        except InvalidToken as exc:
            holder.last_error = f"bundle refused: {exc.description}"
            log.error("%s", holder.last_error)
        except (ControlPlaneError, ValueError, KeyError, OSError) as exc:
            holder.last_error = f"bundle fetch failed: {exc.__class__.__name__}: {exc}"
        await asyncio.sleep(backoff.next_delay())
