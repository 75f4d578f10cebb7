"""The per-cluster agent: keeps the control plane's keys (and later policy and
revocations) in memory, verifies federated tokens locally, answers authorization
questions. Depends on the shared domain packages, never on ``trustmesh.server``."""
