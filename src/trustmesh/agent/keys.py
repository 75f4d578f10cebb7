"""The agent's copy of the control plane's identity (issuer, trust domain) and of the
SPIFFE bundle (JWKS), with the bundles of the federated trust domains (DESIGN §9):
pulled periodically (the bundle's refresh hint, capped), at once when a token names an
unknown ``kid`` (rate-limited), and applied to the authenticator. The last state
received is persisted in the data dir, so a restarted agent verifies tokens before it
reconnects. A federated bundle past its ``use_until`` is dropped here even while the
control plane cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from trustmesh.agent.authn import Authenticator
from trustmesh.agent.controlplane import ControlPlaneClient, ControlPlaneState
from trustmesh.common.backoff import Backoff
from trustmesh.common.errors import CredentialRejected, Unreachable
from trustmesh.common.files import write_atomically
from trustmesh.identity.spiffe_bundle import read_federated
from trustmesh.identity.svid import PartnerVerifier

log = logging.getLogger("trustmesh.agent")

STATE_FILE = "state.json"


def load_state(data_dir: Path, cluster: str) -> ControlPlaneState | None:
    path = data_dir / STATE_FILE
    try:
        state = ControlPlaneState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable agent state %s: %s", path, exc)
        return None
    return state if state.cluster == cluster else None


def _persisted(state: ControlPlaneState) -> tuple[object, ...]:
    """What a restarted agent needs again (a new received_at alone is not written)."""
    return state.jwks, state.issuer, state.federated, state.service_account_audience


def save_state(data_dir: Path, state: ControlPlaneState) -> None:
    write_atomically(data_dir / STATE_FILE, json.dumps(state.to_json()))


class KeySync:
    """Keeps ``authn`` configured with the control plane's current identity and keys.

    ``last_success`` and the forced-refresh rate limit are monotonic: they measure
    intervals, and are never compared with a token's times."""

    def __init__(
        self,
        client: ControlPlaneClient,
        authn: Authenticator,
        data_dir: Path,
        *,
        max_interval: float = 30.0,
        min_forced_interval: float = 1.0,
        on_state: Callable[[ControlPlaneState], object] | None = None,
    ) -> None:
        """``on_state``: told of every state applied (the CA roots' holder)."""
        self.client = client
        self.on_state = on_state
        self.authn = authn
        self.data_dir = data_dir
        self.max_interval = max_interval
        self.min_forced_interval = min_forced_interval
        self.state: ControlPlaneState | None = None
        self.last_success = 0.0  # monotonic
        self.last_error: str | None = None
        self.fatal: str | None = None
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._last_forced = float("-inf")
        self.backoff = Backoff(base=0.2, cap=10.0)

    def _apply(self, state: ControlPlaneState) -> None:
        self.authn.configure(issuer=state.issuer, trust_domain=state.trust_domain, jwks=state.jwks)
        bundles, problems = read_federated(state.federated, state.trust_domain)
        for problem in problems:
            log.warning("ignoring a federated bundle: %s", problem)
        self.authn.configure_partners(
            {
                domain: PartnerVerifier(found.bundle, found.use_until, self.authn.leeway)
                for domain, found in bundles.items()
            }
        )
        if self.on_state is not None:
            self.on_state(state)

    def restore(self) -> bool:
        state = load_state(self.data_dir, self.client.cluster)
        if state is None:
            return False
        self.state = state
        self._apply(state)
        return True

    def age(self) -> float | None:
        """Seconds since the last successful sync; None before the first."""
        return time.monotonic() - self.last_success if self.last_success else None

    async def sync_once(self) -> ControlPlaneState:
        state = await self.client.fetch_state()
        previous = self.state
        if previous is None or state != previous:
            self._apply(state)
            if previous is None or _persisted(state) != _persisted(previous):
                await asyncio.to_thread(save_state, self.data_dir, state)
        self.state = state
        self.last_success = time.monotonic()
        self.last_error = None
        self._synced.set()
        return state

    async def request_refresh(self, wait: float = 2.0) -> bool:
        """Ask for an immediate refresh (rate-limited); wait for it up to ``wait`` s.
        Returns whether a refresh happened."""
        now = time.monotonic()
        if now - self._last_forced < self.min_forced_interval:
            return False
        self._last_forced = now
        self._synced.clear()
        self._wake.set()
        try:
            await asyncio.wait_for(self._synced.wait(), wait)
        except TimeoutError:
            return False
        return True

    async def run(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Sync forever. A credential refused before any state was known is fatal (the
        agent could never become ready: fail fast and say why); refused later, the agent
        keeps serving what it has and keeps asking."""
        while True:
            try:
                state = await self.sync_once()
                self.backoff.reset()
                delay = min(self.max_interval, max(1.0, state.refresh_hint))
            except CredentialRejected as exc:
                self.last_error = str(exc)
                if self.state is None and on_fatal is not None:
                    self.fatal = str(exc)
                    on_fatal(str(exc))
                    return
                log.error("%s", exc)
                delay = self.backoff.cap
            except Unreachable as exc:
                self.last_error = f"no control plane reachable: {exc}"
                log.warning("%s", self.last_error)
                delay = self.backoff.next_delay()
            except Exception as exc:  # a malformed answer must not kill the loop
                self.last_error = f"sync failed: {exc.__class__.__name__}: {exc}"
                log.exception("sync failed")
                delay = self.backoff.next_delay()
            self.authn.expire_partners(self.authn.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
