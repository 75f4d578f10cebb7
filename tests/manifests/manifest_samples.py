"""Shared samples and helpers for the manifest tests (DESIGN §3); imported by name, as
tests/manifests has no __init__.py."""

from __future__ import annotations

import pytest

from trustmesh.common.errors import ManifestError
from trustmesh.manifests import Problem, parse_text

EC_KEY = """\
      - kty: EC
        crv: P-256
        x: f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU
        y: x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0
        kid: east-1
"""

CLUSTER = (
    """\
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: east
spec:
  issuer: https://oidc.east.example
  jwks:
    keys:
"""
    + EC_KEY
)

WORKLOAD = """\
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata:
  name: payments-api
spec:
  selector:
    cluster: east
    namespace: payments
    serviceAccount: api
"""


def problems_of(text: str, path: str = "m.yaml") -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        parse_text(text, path)
    return info.value.problems


def only_problem(text: str) -> Problem:
    found = problems_of(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]
