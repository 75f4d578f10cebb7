"""Small inventories and policies written as manifests, as an operator would."""

from __future__ import annotations

from trustmesh.manifests import parse_text
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry import Registry, build_registry

TRUST_DOMAIN = "corp.example"

INVENTORY = """
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: prod-eu}
spec: {issuer: "https://prod-eu.example", labels: {environment: prod, region: eu}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: dev-us}
spec: {issuer: "https://dev-us.example", labels: {environment: dev, region: us}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: payments}
spec:
  selector: {cluster: prod-eu, namespace: shop, serviceAccount: payments}
  claims: {project: shop, environment: prod, tier: gold}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: ci}
spec:
  selector: {cluster: dev-us, namespace: build, serviceAccount: ci}
  claims: {project: tools, environment: dev, tier: bronze}
"""


def registry(text: str = INVENTORY) -> Registry:
    return build_registry(TRUST_DOMAIN, 1, parse_text(text, "inventory.yaml"))


def policy(text: str) -> PolicySet:
    return PolicySet.from_documents(parse_text(text, "policy.yaml"))


def role(name: str, *rules: str) -> str:
    body = "\n".join(f"  - {r}" for r in rules)
    return f"""---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {name}}}
spec:
  rules:
{body}
"""


def binding(name: str, role_name: str, subjects: str, extra: str = "") -> str:
    more = "".join(f"\n  {line}" for line in extra.splitlines() if line)
    return f"""---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {name}}}
spec:
  role: {role_name}
  subjects: {subjects}{more}
"""
