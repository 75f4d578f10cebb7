"""Simulated Kubernetes clusters: real OIDC service-account token issuers (DESIGN §8)."""

from trustmesh.sim.cluster import SimulatedCluster, key_id

__all__ = ["SimulatedCluster", "key_id"]
