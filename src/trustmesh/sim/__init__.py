"""Simulated Kubernetes clusters: real OIDC service-account token issuers (DESIGN §8).

``SimulatedCluster`` and ``key_id`` are loaded on first use, so ``trustmesh`` commands
that never simulate a cluster do not import its web server (Starlette, uvicorn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trustmesh.sim.cluster import SimulatedCluster, key_id

__all__ = ["SimulatedCluster", "key_id"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trustmesh.sim import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
