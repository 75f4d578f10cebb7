"""The registry of clusters and workloads: an immutable in-memory index built from the
stored manifests, plus the checks that span documents (references, conflicts)."""

from trustmesh.common.errors import RegistryConflict
from trustmesh.registry.index import Identity, Registry, build_registry
from trustmesh.registry.store import AppliedChange, RegistryStore

__all__ = [
    "AppliedChange",
    "Identity",
    "Registry",
    "RegistryConflict",
    "RegistryStore",
    "build_registry",
]
