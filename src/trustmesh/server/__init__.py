"""The control plane (``trustmesh server``): the composition root (``controlplane.py``),
its services (snapshots, issuance, changes, bundles, agents, revoke, rotation, the
audit recorder) and the HTTP routes over them (``routes/``). Never imported by the
agent."""
