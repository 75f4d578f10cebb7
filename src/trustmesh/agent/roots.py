"""The X.509 CA roots the agent holds, taken from the SPIFFE bundle its key sync fetches
(``use: x509-svid`` keys, DESIGN §9), and its report of them to the control plane
(``POST /v1/agent/roots``): the evidence a prepared root waits for before it becomes
active (``trustmesh keys rotate --ca``). The roots are what an mTLS (XFCC) check chains
client certificates to.

The report goes out at once when the roots change and at least every
:data:`REPORT_INTERVAL` seconds otherwise, so the control plane knows the agent still
reports in.

The holder also keeps each federated trust domain's roots (DESIGN §9), from the bundles
the key sync receives: :meth:`RootHolder.roots_for` gives the roots a certificate
claiming an ID of that trust domain must chain to (never reported: they are not ours)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cryptography import x509
from cryptography.x509.verification import Store

from trustmesh.agent.controlplane import ControlPlaneClient, ControlPlaneState
from trustmesh.common.backoff import Backoff
from trustmesh.common.errors import ControlPlaneError
from trustmesh.identity.spiffe_bundle import FederatedBundle, read_federated
from trustmesh.identity.x509ca import fingerprint, roots_of_bundle

log = logging.getLogger("trustmesh.agent")

REPORT_INTERVAL = 30.0  # the control plane forgets an agent after three missed reports


class RootHolder:
    """The CA roots of the last key set applied. Readers take ``roots`` once.

    :meth:`store` is the per-trust-domain lookup the XFCC check validates client
    certificates with (``agent/xfcc.py``): the roots of a SPIFFE ID's own trust domain
    only. Today that is our trust domain; federated partners' bundles (DESIGN §9,
    ``FederatedTrustDomain``) are added here, each under its own trust domain, and
    ``generation`` moves whenever any set of roots changes."""

    def __init__(self) -> None:
        self.roots: tuple[x509.Certificate, ...] = ()
        self.fingerprints: tuple[str, ...] = ()
        self.trust_domain: str | None = None
        self.generation = 0
        self._stores: dict[str, Store] = {}
        self.federated: dict[str, FederatedBundle] = {}
        """Federated trust domain -> its bundle, as of the last state applied."""
        self._federated_prints: dict[str, tuple[str, ...]] = {}
        self.changed = asyncio.Event()

    def roots_for(self, trust_domain: str, now: float) -> tuple[x509.Certificate, ...]:
        """The roots that vouch for IDs of ``trust_domain`` at ``now``: ours, a
        federated domain's while its bundle is within ``use_until``, or none."""
        if trust_domain == self.trust_domain:
            return self.roots
        found = self.federated.get(trust_domain)
        return found.bundle.roots if found is not None and now <= found.use_until else ()

    def update(self, state: ControlPlaneState) -> bool:
        """Take the roots of ``state``'s bundle (and the federated domains'); returns
        whether our own changed. ``generation`` moves when any set of roots changes."""
        bundles, _ = read_federated(state.federated, state.trust_domain)
        self.federated = bundles
        federated_prints = {
            domain: tuple(fingerprint(r) for r in found.bundle.roots)
            for domain, found in bundles.items()
        }
        if federated_prints != self._federated_prints:
            self._federated_prints = federated_prints
            self._stores = {
                domain: store for domain, store in self._stores.items()
                if domain == self.trust_domain
            }  # fmt: skip
            self.generation += 1
        roots = roots_of_bundle(state.jwks.get("keys"))
        prints = tuple(fingerprint(r) for r in roots)
        if prints == self.fingerprints and state.trust_domain == self.trust_domain:
            return False
        self.roots, self.fingerprints = roots, prints
        self.trust_domain = state.trust_domain
        self._stores = {state.trust_domain: Store(list(roots))} if roots else {}
        self.generation += 1
        self.changed.set()
        return True

    def store(self, trust_domain: str, now: float) -> Store | None:
        """The roots that may vouch for SPIFFE IDs of ``trust_domain`` at ``now`` (ours,
        or a federated domain's while its bundle is within ``use_until``), or None."""
        if trust_domain != self.trust_domain:
            found = self.federated.get(trust_domain)
            if found is None or now > found.use_until or not found.bundle.roots:
                return None
            if trust_domain not in self._stores:
                self._stores[trust_domain] = Store(list(found.bundle.roots))
        return self._stores.get(trust_domain)


async def run_root_reports(
    client: ControlPlaneClient, holder: RootHolder, interval: float = REPORT_INTERVAL
) -> None:
    """Report the roots held, at once on a change and every ``interval`` seconds."""
    backoff = Backoff(base=0.5, cap=interval)
    while True:
        holder.changed.clear()
        delay = interval
        if holder.fingerprints:
            try:
                await client.report_roots(list(holder.fingerprints))
                backoff.reset()
            except ControlPlaneError as exc:
                log.warning("reporting the CA roots held failed: %s", exc)
                delay = backoff.next_delay()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(holder.changed.wait(), delay)
