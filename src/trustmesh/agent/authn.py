"""Authentication at the agent: a verified-token cache in front of the JWT-SVID
verifier, over the key set the control plane publishes — and, for JWT-SVIDs of a
federated trust domain (DESIGN §9), that domain's own bundle as the control plane
ships it (``PartnerVerifier``). Our keys answer first (a ``kid`` they know: our
verifier, which takes only IDs of our trust domain), so our own tokens pay nothing for
federation; a ``kid`` they do not know sends the token to the bundle of the trust
domain its ``sub`` names, which takes only IDs of that domain — a partner's keys can
never vouch for ours or a third's.

A person's login token (``identity/login.py``, ``typ: trustmesh-login+jwt``) is
verified only by :meth:`Authenticator.authenticate_person`, which the TokenReview
webhook alone calls, with its own key ring (accepting that type only) and no cache
shared with the JWT-SVIDs: the SVID path refuses the type, so a login token never
authenticates at ``/v1/authorize`` or ext_authz.

This is the only place a federated token turns into a VerifiedIdentity; whether the
identity is revoked, and what it may do, is decided after it (``agent/decide.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from trustmesh.agent.cache import VerifiedTokenCache, token_digest
from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidToken
from trustmesh.identity.login import LOGIN_TYPS, LoginVerifier
from trustmesh.identity.svid import (
    SVID_TYPS,
    KeyRing,
    PartnerVerifier,
    SvidVerifier,
    VerifiedIdentity,
    token_trust_domain,
)
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
        self.login_keys = KeyRing(accepted_typs=LOGIN_TYPS)
        self._login: LoginVerifier | None = None
        self.partners: Mapping[str, PartnerVerifier] = {}

    @property
    def configured(self) -> bool:
        return self._verifier is not None and len(self.keys) > 0

    def configure(self, *, issuer: str, trust_domain: str, jwks: dict[str, object]) -> None:
        """Install the control plane's identity and key set. A key that disappears drops
        every cached verification (a removed or revoked key must stop working at once)."""
        removed = self.keys.replace(jwks)
        self.login_keys.replace(jwks)
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
            self._login = LoginVerifier(
                issuer=issuer,
                audience=cluster_audience(trust_domain, self.cluster),
                keys=self.login_keys,
                leeway=self.leeway,
            )
            self.cache.clear()
        elif removed:
            self.cache.clear()

    def configure_partners(self, partners: Mapping[str, PartnerVerifier]) -> None:
        """Install the federated trust domains' verifiers (trust domain -> verifier).
        A domain that leaves, or a partner key that disappears, drops every cached
        verification."""
        previous = self.partners
        self.partners = dict(partners)
        for domain, verifier in previous.items():
            now = self.partners.get(domain)
            if now is None or not set(verifier.keys.kids()) <= set(now.keys.kids()):
                self.cache.clear()
                return

    def expire_partners(self, now: float) -> None:
        """Drop the federated bundles past their ``use_until`` (the agent may have lost
        the control plane that would drop them)."""
        if any(v.use_until < now for v in self.partners.values()):
            self.configure_partners({d: v for d, v in self.partners.items() if v.use_until >= now})

    def authenticate(self, token: str, now: float) -> VerifiedIdentity:
        """A verified identity (from the cache while the token is valid at ``now``), or
        InvalidToken."""
        digest = token_digest(token)
        identity = self.cache.get(digest, now)
        if identity is None:
            verifier = self._verifier
            if verifier is None:
                raise InvalidToken("not_ready", "agent has no keys from the control plane yet")
            try:
                identity = verifier.verify(token, now)
            except InvalidToken as exc:
                if exc.reason != "unknown_kid" or not self.partners:
                    raise
                identity = self._verify_partner(token, verifier, now, exc)
            self.cache.put(digest, identity)
        return identity

    def authenticate_person(self, token: str, now: float) -> VerifiedIdentity:
        """A person's login token for this cluster (``user:NAME``), or InvalidToken (a
        token for another cluster: ``wrong_audience``). Not cached: the API server
        caches its TokenReview answers itself."""
        verifier = self._login
        if verifier is None:
            raise InvalidToken("not_ready", "agent has no keys from the control plane yet")
        return verifier.verify(token, now)

    def _verify_partner(
        self, token: str, ours: SvidVerifier, now: float, unknown: InvalidToken
    ) -> VerifiedIdentity:
        """A token whose ``kid`` our keys do not know, by the bundle of its ``sub``'s
        trust domain; ``unknown`` again when that domain is ours."""
        domain = token_trust_domain(token)
        if domain == ours.trust_domain:
            raise unknown
        partner = self.partners.get(domain)
        if partner is None:
            # Reason unknown_kid: the control plane may have a bundle we have not seen
            # yet, and that reason asks for one (rate-limited) refresh.
            raise InvalidToken(
                "unknown_kid", f"token is of trust domain {domain[:100]}, not one we federate with"
            )
        return partner.verify(token, ours.audience, now)
