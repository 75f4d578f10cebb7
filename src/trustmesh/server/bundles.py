"""Signed policy bundles, one per cluster (DESIGN §3): compiled from the policy and the
registry in force and signed with the active key, cached per (policy revision,
registry revision, key revision, cluster). What every cluster's bundle shares —
flattened roles, the identity inventory, claim counts, the policy hash — is computed
once per revision, not once per cluster."""

from __future__ import annotations

from typing import Any

from trustmesh.common.errors import NotFound
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import claim_counts, compile_bundle, flatten_roles, inventory
from trustmesh.server.snapshots import Snapshots


class BundleSigner:
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self._signed: dict[tuple[int, int, int, str], str] = {}
        self._shared: tuple[tuple[int, int], tuple[Any, ...]] | None = None

    def signed_bundle(self, cluster: str) -> tuple[tuple[int, int], str]:
        """(version, compact JWS) of ``cluster``'s current bundle; NotFound for a
        cluster that is not registered."""
        snapshots = self.snapshots
        version = snapshots.bundle_version()
        key = (*version, snapshots.keyset.revision, cluster)  # re-signed after a key rotation
        cached = self._signed.get(key)
        if cached is not None:
            return version, cached
        registry, policy = snapshots.registry, snapshots.policy
        if cluster not in registry.clusters:
            raise NotFound(f"cluster {cluster} is not registered")
        if self._shared is None or self._shared[0] != version:
            flat, _ = flatten_roles(policy.roles)
            identities = inventory(registry)
            shared = (flat, identities, policy.content_hash(), claim_counts(identities))
            self._shared = (version, shared)
        flat, identities, policy_hash, counts = self._shared[1]
        bundle = compile_bundle(
            policy, registry, cluster, version[0], flat, identities, policy_hash, counts
        )
        bundle["publishedAt"] = snapshots.bundle_published_at()  # agents measure the lag
        token = sign_bundle(bundle, snapshots.keyset.active)
        if len(self._signed) > 4 * max(1, len(registry.clusters)):
            self._signed.clear()
        self._signed[key] = token
        return version, token
