"""``trustmesh sidecar``: runs beside a workload and hands it an X.509-SVID (DESIGN §9),
the Istio pilot-agent shape on trustmesh's own trust path.

``x509.py`` (key, CSR, the X509-SVID checks), ``controlplane.py`` (the one client of
the control plane), ``keeper.py`` (renewal at half-life, failover, backoff, expiry),
``jwt.py`` (JWT bundle and JWT-SVIDs), ``workload_api.py`` (the SPIFFE Workload API
over gRPC), ``sds.py`` (Envoy SDS v3), ``folder.py`` (the credential folder),
``main.py`` (wiring and the process). See docs/sidecar.md."""

from trustmesh.sidecar.main import SidecarConfig, run_sidecar

__all__ = ["SidecarConfig", "run_sidecar"]
