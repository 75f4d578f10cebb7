"""Authentication at the agent: verified-token cache in front of the JWT-SVID verifier.

This is the only place a federated token turns into a VerifiedIdentity; authorization
(issue 3) receives that identity and nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable

from trustmesh.agent.cache import VerifiedTokenCache, token_digest
from trustmesh.agent.revocations import RevocationHolder
from trustmesh.identity.spiffe import cluster_audience
from trustmesh.identity.svid import SVID_TYPS, InvalidToken, KeyRing, SvidVerifier, VerifiedIdentity


class Authenticator:
    def __init__(
        self,
        *,
        cluster: str,
        leeway: float = 10.0,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.leeway = leeway
        self.clock = clock
        self.cache = VerifiedTokenCache(cache_size, leeway)
        self.keys = KeyRing(accepted_typs=SVID_TYPS)
        self.revocations: RevocationHolder | None = None
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
                leeway=self.leeway,
            )
            self.cache.clear()
        elif removed:
            self.cache.clear()

    def authenticate(self, token: str) -> VerifiedIdentity:
        """A verified identity, or InvalidToken. The revocation check runs on every
        call, cached or not (four O(1) lookups), and refuses everything when the list is
        staler than its bound in strict mode."""
        digest = token_digest(token)
        identity = self.cache.get(digest, self.clock())
        if identity is None:
            if self._verifier is None:
                raise InvalidToken("not_ready", "agent has no keys from the control plane yet")
            identity = self._verifier.verify(token)
            self.cache.put(digest, identity)
        holder = self.revocations
        if holder is not None:
            if holder.enforcing_denial():
                raise InvalidToken(
                    "revocation_state_stale",
                    f"the revocation list is {holder.age():.0f} s old, beyond its {holder.bound:.0f} s bound "
                    "(strict mode refuses until the control plane is reachable again)",
                )
            entry = holder.revocations.revoked(
                jti=identity.jti,
                subject=identity.spiffe_id,
                cluster=identity.cluster,
                kid=identity.kid,
                issued_at=identity.claims["iat"],
            )
            if entry is not None:
                raise InvalidToken(
                    "revoked", f"token revoked ({entry.kind} revocation {entry.revision})"
                )
        return identity
