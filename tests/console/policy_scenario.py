"""What the console's workloads and policy pages are tested over (``test_policy_api.py``,
``test_policy_pages.py``): a control plane given, as an operator would, two clusters
(prod and dev), explicit Workloads (more than one page of them), a WorkloadTemplate
whose identity a simulated cluster's service account received (so it is observed and
listed), and two policy revisions, the second of which makes an escalation (a
workload bound to a role of every verb on every resource)."""

from __future__ import annotations

from dataclasses import dataclass

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    eventually,
    serve_cluster,
    unique,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster

FILLER = 120  # explicit Workloads beyond the named ones: more than two pages of 50
HOST = "orders.shop.svc"


def template_yaml(name: str, cluster: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata:
  name: {name}
spec:
  clusters: {{names: [{cluster}]}}
  namespaces: ["team-*"]
  serviceAccounts: ["*"]
  claims:
    project: "{{namespace}}"
    environment: prod
"""


def base_policy() -> str:
    """Revision "before": payments reads pods in shop and GETs the orders API; a deny
    keeps it off secrets."""
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: pod-reader}}
spec:
  rules: [{{apiGroups: [""], resources: [pods], verbs: [get, list]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-reader}}
spec:
  rules: [{{services: [{HOST}], paths: ["/api/**"], methods: [GET]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: secret-reader}}
spec:
  rules: [{{apiGroups: [""], resources: [secrets], verbs: [get]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-pods}}
spec:
  role: pod-reader
  subjects: [{{claims: {{project: shop}}}}]
  namespaces: [shop]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: payments-orders}}
spec:
  role: orders-reader
  subjects: [{{workload: payments}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: no-secrets-for-payments}}
spec:
  role: secret-reader
  effect: deny
  subjects: [{{workload: payments}}]
"""


def escalation(cluster: str) -> str:
    """Revision "after": ``ci`` may do anything on the dev cluster."""
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: everything}}
spec:
  rules: [{{apiGroups: ["*"], resources: ["*"], verbs: ["*"]}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: ci-everything}}
spec:
  role: everything
  subjects: [{{workload: ci}}]
  clusters: {{names: [{cluster}]}}
"""


@dataclass
class Scenario:
    server: Server
    origin: SimulatedCluster
    prod: str
    dev: str
    before: int
    after: int
    derived: str  # the template-derived identity's workload name

    def stop(self) -> None:
        self.origin.stop()


def populate(server: Server) -> Scenario:
    """Give ``server`` the scenario (module docstring); the caller stops the scenario's
    simulated cluster (``Scenario.stop``)."""
    origin = serve_cluster("console")
    try:
        prod, dev = unique("prod-"), unique("dev-")
        documents = [
            cluster_yaml(prod, origin.issuer, labels="{environment: prod}"),
            cluster_yaml(dev, f"http://127.0.0.1:9/{dev}", labels="{environment: dev}"),
            workload_yaml("payments", prod, "shop", "payments"),
            workload_yaml("ci", dev, "build", "ci")
            .replace("environment: prod", "environment: dev")
            .replace("project: shop", "project: tools"),
            template_yaml("teams", prod),
            *(
                workload_yaml(f"worker-{i:03d}", prod, "batch", f"worker-{i:03d}")
                for i in range(FILLER)
            ),
        ]
        server.apply("---\n".join(documents), path="inventory.yaml")
        before = server.apply(base_policy(), path="policy.yaml")["policyRevision"]
        audience = f"spiffe://{TRUST_DOMAIN}/cluster/{prod}"
        answer = server.exchange(origin.mint("team-a", "api"), audience)
        assert answer.status_code == 200, answer.text
        derived = f"teams/{prod}/team-a/api"

        def last_seen() -> bool:
            items = server.admin.get("/v1/workloads", params={"source": "template"}).json()
            return [
                (i["metadata"]["name"], bool(i["status"]["usage"]["lastCredentialAt"]))
                for i in items["items"]
            ] == [(derived, True)]

        eventually(last_seen, "the template-derived identity's credential recorded (usage flush)")
        after = server.apply(escalation(dev), path="escalation.yaml")["policyRevision"]
        assert after > before
        return Scenario(server, origin, prod, dev, before, after, derived)
    except BaseException:
        origin.stop()
        raise
