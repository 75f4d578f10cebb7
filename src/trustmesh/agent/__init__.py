"""The per-cluster agent (``trustmesh agent``): keeps the control plane's keys, its
cluster's signed policy bundle and the revocation list in memory, answers every
authorization question locally through one pipeline (``decide.py``), and spools an
audit event for each answer. Depends on the shared domain packages, never on
``trustmesh.server``."""
