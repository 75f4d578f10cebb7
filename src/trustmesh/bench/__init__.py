"""``trustmesh bench …``: side-by-side benchmarks against the peers each issue names,
with load from separate processes."""
