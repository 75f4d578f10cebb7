"""The JWT side of the Workload API (SPIFFE Workload API §6): the trust domain's JWT
bundle, kept fresh, with which ``ValidateJWTSVID`` verifies; and JWT-SVIDs for the
audiences workloads ask for, exchanged at the control plane (RFC 8693, DESIGN §2).

* The bundle (``/.well-known/spiffe-bundle``, its ``jwt-svid`` keys that carry a
  ``kid``) and the issuer (``/.well-known/openid-configuration``) are fetched at start,
  again after the bundle's ``spiffe_refresh_hint`` (kept within 5 s to 5 min), and at once
  when a token names a ``kid`` the bundle lacks — at most once every
  ``min_forced_interval`` seconds, so unknown ``kid``\\s cannot make the sidecar hammer
  the control plane.
* Verification is the agent's and introspection's (``identity/svid.py``): allow-listed
  algorithm pinned to the key, our issuer, the requested audience, ``exp``/``nbf``, the
  federation claims, a ``sub`` in our trust domain.
* The federated trust domains' bundles (DESIGN §9) come with each fetch: their JWT keys
  join ``FetchJWTBundles``, a JWT-SVID whose ``sub`` is of a federated domain is
  validated with that domain's keys only (``PartnerVerifier``), and their X.509 roots
  go to ``on_federated`` (the SVID keeper). A bundle past its ``use_until`` is dropped,
  also while the control plane cannot be reached.
* JWT-SVIDs come from one :class:`~trustmesh.client.AsyncTokenSource` per audience set
  (the SDK's lease: refreshed before expiry, failover, backoff, the service-account
  token file read again each time); at most :data:`MAX_AUDIENCE_SETS` sets are kept."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx

from trustmesh.client import AsyncTokenSource
from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidToken, Unreachable
from trustmesh.identity.jws import decode_json_segment, split_compact
from trustmesh.identity.spiffe_bundle import FederatedBundle, read_federated
from trustmesh.identity.svid import (
    MAX_TOKEN_BYTES,
    KeyRing,
    PartnerVerifier,
    SvidVerifier,
    VerifiedIdentity,
    token_trust_domain,
)
from trustmesh.sidecar.controlplane import SidecarClient, TrustDomainState

log = logging.getLogger("trustmesh.sidecar")

MIN_REFRESH = 5.0
MAX_REFRESH = 300.0
MIN_FORCED_INTERVAL = 5.0
FORCED_REFRESH_WAIT = 2.0
LEEWAY = 10.0
MAX_AUDIENCE_SETS = 64


class JwtBundleKeeper:
    """The trust domain's JWT keys and issuer, refreshed in :meth:`run`."""

    def __init__(
        self,
        client: SidecarClient,
        clock: Clock,
        *,
        min_forced_interval: float = MIN_FORCED_INTERVAL,
    ) -> None:
        self.client = client
        self.clock = clock
        self.min_forced_interval = min_forced_interval
        self.state: TrustDomainState | None = None
        self.problem: str | None = None
        self.generation = 0
        self.keys = KeyRing()
        self.federated: dict[str, FederatedBundle] = {}
        self.partners: dict[str, PartnerVerifier] = {}
        self.on_federated: list[Callable[[dict[str, FederatedBundle]], Awaitable[None]]] = []
        self.backoff = Backoff(base=0.5, cap=30.0)
        self._changed = asyncio.Condition()
        self._fetching = asyncio.Lock()
        self._last_forced = float("-inf")  # monotonic

    async def wait_change(self, seen: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation != seen)

    async def fetch_once(self) -> None:
        async with self._fetching:  # one fetch at a time, forced or scheduled
            state = await self.client.fetch_trust_domain()
        previous = self.state
        self.state = state
        self.problem = None
        if previous is None or (state.jwks, state.issuer) != (previous.jwks, previous.issuer):
            self.keys.replace(state.jwks)
            log.info(
                "JWT bundle of %s from %s: %d keys",
                state.trust_domain,
                state.server,
                len(self.keys),
            )
            await self._notify()
        bundles, problems = read_federated(state.federated, state.trust_domain)
        for problem in problems:
            log.warning("ignoring a federated bundle: %s", problem)
        await self._set_federated(bundles)

    async def _notify(self) -> None:
        self.generation += 1
        async with self._changed:
            self._changed.notify_all()

    async def _set_federated(self, bundles: dict[str, FederatedBundle]) -> None:
        """Take the federated bundles still within their ``use_until``; on a change,
        tell the streams and ``on_federated``."""
        now = self.clock()
        bundles = {d: b for d, b in bundles.items() if b.use_until >= now}
        before = {d: b.bundle.canonical() for d, b in self.federated.items()}
        changed = {d: b.bundle.canonical() for d, b in bundles.items()} != before
        self.federated = bundles  # use_until may have moved, with the same keys
        self.partners = {
            domain: PartnerVerifier(found.bundle, found.use_until, LEEWAY)
            for domain, found in bundles.items()
        }
        if not changed:
            return
        log.info("federated trust domains: %s", ", ".join(sorted(bundles)) or "none")
        await self._notify()
        for callback in self.on_federated:
            await callback(bundles)

    async def refresh_now(self) -> bool:
        """Fetch now, at most once every ``min_forced_interval`` seconds and for at most
        ``FORCED_REFRESH_WAIT`` seconds; whether a fresh bundle came."""
        now = time.monotonic()
        if now - self._last_forced < self.min_forced_interval:
            return False
        self._last_forced = now
        try:
            await asyncio.wait_for(self.fetch_once(), FORCED_REFRESH_WAIT)
        except (Unreachable, TimeoutError):
            return False
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.fetch_once()
                self.backoff.reset()
                assert self.state is not None
                delay = min(MAX_REFRESH, max(MIN_REFRESH, self.state.refresh_hint))
            except Exception as exc:  # unreachable or malformed: the loop goes on
                self.problem = f"the JWT bundle could not be fetched ({exc})"
                # a traceback only for what is not the network's doing
                log.warning("%s", self.problem, exc_info=not isinstance(exc, Unreachable))
                delay = self.backoff.next_delay()
                await self._set_federated(self.federated)  # drop what is past use_until
            await asyncio.sleep(delay)

    def _verify(self, token: str, audience: str) -> VerifiedIdentity:
        state = self.state
        if state is None:
            raise InvalidToken("no_bundle", "the JWT bundle has not been fetched yet")
        if self.partners:
            domain = token_trust_domain(token)
            if domain != state.trust_domain:
                partner = self.partners.get(domain)
                if partner is None:
                    raise InvalidToken(
                        "unknown_kid", f"the token is of trust domain {domain[:100]}, not federated"
                    )
                return partner.verify(token, audience, self.clock())
        verifier = SvidVerifier(
            issuer=state.issuer,
            trust_domain=state.trust_domain,
            audience=audience,
            keys=self.keys,
            clock=self.clock,
            leeway=LEEWAY,
        )
        return verifier.verify(token)

    async def verify(self, token: str, audience: str) -> VerifiedIdentity:
        """The JWT-SVID ``token`` verified for ``audience``; InvalidToken otherwise. A
        ``kid`` the bundle lacks triggers one rate-limited refresh and one retry."""
        try:
            return self._verify(token, audience)
        except InvalidToken as exc:
            if exc.reason not in ("unknown_kid", "no_bundle") or not await self.refresh_now():
                raise
        return self._verify(token, audience)


def token_subject(token: str) -> str | None:
    """The ``sub`` of a JWT-SVID the control plane just issued to us (not verified: it
    came over our own channel to the issuer)."""
    try:
        claims = decode_json_segment(split_compact(token, MAX_TOKEN_BYTES)[1], "payload")
    except InvalidToken:
        return None
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


class JwtSvids:
    """JWT-SVIDs for the audience sets workloads ask for, one lease per set."""

    def __init__(
        self,
        servers: Sequence[str],
        sa_token_file: Path,
        http: httpx.AsyncClient,
        clock: Clock,
        max_sets: int = MAX_AUDIENCE_SETS,
    ) -> None:
        self.servers = list(servers)
        self.sa_token_file = sa_token_file
        self.http = http
        self.clock = clock
        self.max_sets = max_sets
        self._sources: OrderedDict[tuple[str, ...], AsyncTokenSource] = OrderedDict()

    async def fetch(self, audiences: Sequence[str]) -> str:
        """A JWT-SVID whose ``aud`` holds every one of ``audiences``. Raises
        :class:`~trustmesh.client.TokenUnavailable` (or its ``ExchangeRejected``)."""
        wanted = tuple(sorted(set(audiences)))
        source = self._sources.get(wanted)
        if source is None:
            if len(self._sources) >= self.max_sets:
                self._sources.popitem(last=False)  # the oldest set; its client is shared
            source = AsyncTokenSource(
                self.servers, self.sa_token_file, wanted, clock=self.clock, http_client=self.http
            )
            self._sources[wanted] = source
        else:
            self._sources.move_to_end(wanted)
        return await source.token()
