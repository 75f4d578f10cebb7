"""trustmesh: federated workload identity, local authorization and audit for Kubernetes clusters."""

__version__ = "0.1.0"
