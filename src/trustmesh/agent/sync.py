"""Keeping the agent's copy of control-plane state: its cluster's configuration and the
SPIFFE bundle (JWKS). Control-plane URLs are tried in the order given (failover);
when all fail, retries back off exponentially with jitter. The last state received is
persisted in the data dir, so a restarted agent verifies tokens before it reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustmesh.common.backoff import Backoff
from trustmesh.revocation import Revocation

log = logging.getLogger("trustmesh.agent")

STATE_FILE = "state.json"


class CredentialRejected(Exception):
    """The control plane refused the agent's credential (401/403) or it names another cluster."""


class Unreachable(Exception):
    pass


class AuditRejected(Exception):
    """The control plane refused an audit batch with a 4xx other than 401/403: the batch
    or the agent is wrong (a bug). The message carries the answer, problems included."""

    def __init__(self, server: str, status: int, answer: str) -> None:
        super().__init__(f"{server} answered HTTP {status} to an audit batch: {answer}")
        self.status = status


@dataclass(frozen=True)
class ControlPlaneState:
    cluster: str
    trust_domain: str
    issuer: str
    jwks: dict[str, Any]
    sequence: int
    refresh_hint: float
    server: str
    received_at: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlPlaneState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class ControlPlaneClient:
    def __init__(
        self, servers: list[str], credential: str, cluster: str, timeout: float = 3.0
    ) -> None:
        if not servers:
            raise ValueError("at least one control-plane URL is needed")
        self.servers = [s.rstrip("/") for s in servers]
        self.cluster = cluster
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            headers={"Authorization": f"Bearer {credential}"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _get(self, base: str, path: str) -> dict[str, Any]:
        response = await self._http.get(base + path)
        if response.status_code in (401, 403):
            try:
                reason = response.json().get("error_description", "")
            except ValueError:
                reason = ""
            raise CredentialRejected(
                f"{base} refused the agent credential: {reason or response.status_code}"
            )
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"{base}{path} did not answer a JSON object")
        return document

    async def fetch_revocations(self, since: int, wait: float) -> tuple[int, list[Revocation]]:
        """``GET /v1/revocations?since=R&wait=S`` on the servers in order."""
        from trustmesh.agent.revocations import ResyncNeeded

        failures = []
        for base in self.servers:
            try:
                response = await self._http.get(
                    base + "/v1/revocations",
                    params={"since": str(since), "wait": str(wait)},
                    timeout=httpx.Timeout(wait + 10.0),
                )
            except httpx.HTTPError as exc:
                failures.append(f"{base}: {exc.__class__.__name__}: {exc}")
                continue
            if response.status_code in (401, 403):
                raise CredentialRejected(f"{base} refused the agent credential")
            if response.status_code == 400 and since > 0:
                raise ResyncNeeded(response.text[:200])
            if response.status_code != 200:
                failures.append(f"{base}: HTTP {response.status_code}")
                continue
            document = response.json()
            entries = [Revocation.from_json(e) for e in document["entries"]]
            return int(document["revision"]), entries
        raise httpx.ConnectError("; ".join(failures))

    async def ship_audit(self, body: bytes, timeout: float | None = None) -> dict[str, Any]:
        """``POST /v1/audit/events`` with a ``{"events": [...]}`` body, on the servers in
        order until one takes it; its answer (``accepted``, ``duplicates``...).

        Connection errors and 5xx (stopping, database down) go on to the next server
        and, when none takes it, raise Unreachable; 401/403 raise CredentialRejected;
        any other answer raises AuditRejected (resending will not help, so failing over
        would not either)."""
        failures = []
        for base in self.servers:
            try:
                response = await self._http.post(
                    base + "/v1/audit/events",
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=httpx.Timeout(timeout)
                    if timeout is not None
                    else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.HTTPError as exc:
                failures.append(f"{base}: {exc.__class__.__name__}: {exc}")
                continue
            if response.status_code == 200:
                document = response.json()
                if not isinstance(document, dict):
                    raise AuditRejected(base, 200, "the answer is not a JSON object")
                return document
            if response.status_code >= 500:
                failures.append(f"{base}: HTTP {response.status_code} {response.text[:200]}")
                continue
            if response.status_code in (401, 403):
                raise CredentialRejected(
                    f"{base} refused the audit batch (HTTP {response.status_code}): {response.text[:300]}"
                )
            raise AuditRejected(base, response.status_code, response.text[:2000])
        raise Unreachable("; ".join(failures))

    async def fetch_bundle(self, after: str | None, wait: float, agent: str) -> str | None:
        """Long-poll the servers in order for a bundle newer than ``after``; None when
        nothing changed within ``wait`` seconds (HTTP 304)."""
        params = {"wait": str(wait), "agent": agent}
        if after is not None:
            params["after"] = after
        failures = []
        for base in self.servers:
            try:
                response = await self._http.get(
                    base + "/v1/agent/bundle", params=params, timeout=httpx.Timeout(wait + 10.0)
                )
            except httpx.HTTPError as exc:
                failures.append(f"{base}: {exc.__class__.__name__}: {exc}")
                continue
            if response.status_code == 304:
                return None
            if response.status_code in (401, 403):
                raise CredentialRejected(f"{base} refused the agent credential")
            if response.status_code != 200:
                failures.append(f"{base}: HTTP {response.status_code}")
                continue
            token = response.json().get("bundle")
            if not isinstance(token, str):
                raise ValueError(f"{base} answered no bundle")
            return token
        raise httpx.ConnectError("; ".join(failures))

    async def fetch(self) -> ControlPlaneState:
        """One round over the servers in order; the first that answers wins."""
        failures = []
        for base in self.servers:
            try:
                config = await self._get(base, "/v1/agent/config")
                bundle = await self._get(base, "/.well-known/spiffe-bundle")
            except CredentialRejected:
                raise
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"{base}: {exc.__class__.__name__}: {exc}")
                continue
            if config.get("cluster") != self.cluster:
                raise CredentialRejected(
                    f"the credential belongs to cluster {config.get('cluster')!r}, not {self.cluster!r}"
                )
            return ControlPlaneState(
                cluster=self.cluster,
                trust_domain=str(config["trust_domain"]),
                issuer=str(config["issuer"]),
                jwks={"keys": bundle.get("keys", [])},
                sequence=int(bundle.get("spiffe_sequence", 0)),
                refresh_hint=float(bundle.get("spiffe_refresh_hint", 60)),
                server=base,
                received_at=time.time(),
            )
        raise Unreachable("; ".join(failures))


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


def save_state(data_dir: Path, state: ControlPlaneState) -> None:
    """Write-then-rename with fsync, so a crash leaves the old or the new file, never half."""
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(state.to_json(), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Synchronizer:
    """Pulls state periodically (the bundle's refresh hint, capped), at once when asked
    (an unknown ``kid`` was seen; at most once per ``min_forced_interval``), and applies
    each new state through ``apply``."""

    def __init__(
        self,
        client: ControlPlaneClient,
        data_dir: Path,
        apply: Callable[[ControlPlaneState], None],
        *,
        max_interval: float = 30.0,
        min_forced_interval: float = 1.0,
    ) -> None:
        self.client = client
        self.data_dir = data_dir
        self.apply = apply
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

    def restore(self) -> bool:
        state = load_state(self.data_dir, self.client.cluster)
        if state is None:
            return False
        self.state = state
        self.apply(state)
        return True

    async def sync_once(self) -> ControlPlaneState:
        state = await self.client.fetch()
        if self.state is None or state != self.state:
            self.apply(state)
            if self.state is None or (state.jwks, state.issuer) != (
                self.state.jwks,
                self.state.issuer,
            ):
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

    async def run(
        self,
        on_first_sync: Callable[[], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """Sync forever. A credential refused before any state was known is fatal (the
        agent could never become ready: fail fast and say why); refused later, the agent
        keeps serving what it has and keeps asking."""
        first = True
        while True:
            try:
                state = await self.sync_once()
                self.backoff.reset()
                if first and on_first_sync is not None:
                    on_first_sync()
                first = False
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
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
