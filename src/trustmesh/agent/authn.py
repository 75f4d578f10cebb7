"""Authentication at the agent: a verified-token cache in front of the JWT-SVID
verifier, over the key set the control plane publishes.

This is the only place a federated token turns into a VerifiedIdentity; whether the
identity is revoked, and what it may do, is decided after it (``agent/decide.py``)."""

from __future__ import annotations

from trustmesh.agent.cache import VerifiedTokenCache, token_digest
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidToken
from trustmesh.identity.svid import SVID_TYPS, KeyRing, SvidVerifier, VerifiedIdentity
from trustmesh.spiffeid import cluster_audience


class Authenticator:
    def __init__(
        self,
        *,
        cluster: str,
        clock: Clock,
        leeway: float = 10.0,
        cache_size: int = 100_000,
    ) -> None:
        self.cluster = cluster
        self.leeway = leeway
        self.clock = clock
        self.cache = VerifiedTokenCache(cache_size, leeway)
        self.keys = KeyRing(accepted_typs=SVID_TYPS)
        self._verifier: SvidVerifier | None = None

    @property
    def configured(self) -> bool:
        return self._verifier is not None and len(self.keys) > 0

    def configure(self, *, issuer: str, trust_domain: str, jwks: dict[str, object]) -> None:
        """Install the control plane's identity and key set. A key that disappears drops
        every cached verification (a removed or revoked key must stop working at once)."""
        removed = self.keys.replace(jwks)
        verifier = self._verifier
        if verifier is None or verifier.issuer != issuer or verifier.trust_domain != trust_domain:
            self._verifier = SvidVerifier(
                issuer=issuer,
                trust_domain=trust_domain,
                audience=cluster_audience(trust_domain, self.cluster),
                keys=self.keys,
                clock=self.clock,
                leeway=self.leeway,
            )
            self.cache.clear()
        elif removed:
            self.cache.clear()

    def authenticate(self, token: str, now: float) -> VerifiedIdentity:
        """A verified identity (from the cache while the token is valid at ``now``), or
        InvalidToken."""
        digest = token_digest(token)
        identity = self.cache.get(digest, now)
        if identity is None:
            if self._verifier is None:
                raise InvalidToken("not_ready", "agent has no keys from the control plane yet")
            identity = self._verifier.verify(token, now)
            self.cache.put(digest, identity)
        return identity
