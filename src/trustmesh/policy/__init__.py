"""Policy: the request model, rule matching, the compiler from global roles and bindings
to per-cluster bundles, the decision engine, policy tests, diff and RBAC export.
Nothing here imports the web framework or the database."""
