"""Policy: rule matching, the compiler from global roles and bindings to per-cluster
bundles, signed bundles, the decision engine, policy tests and the gate that runs them,
the versioned catalog, the effective diff and RBAC export. The request model it decides
on is ``trustmesh.request``. Nothing here imports the web framework."""
