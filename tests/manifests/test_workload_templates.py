"""The pure rules of WorkloadTemplate (manifests/_templates.py): glob overlap is exact
(a witness both globs match, or none exists), derived SPIFFE IDs read back into their
one (cluster, namespace, service account), and the registry refuses templates that
can meet (selectors, or SPIFFE IDs) or take a Workload's SPIFFE ID."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.common.errors import RegistryConflict
from trustmesh.manifests import parse_text
from trustmesh.manifests._templates import glob_regex, globs_overlap
from trustmesh.registry import build_registry

GLOB = st.text(alphabet="ab-*", min_size=1, max_size=6)
NAME = st.text(alphabet="ab-", min_size=0, max_size=8)


@settings(max_examples=400, deadline=None)
@given(GLOB, GLOB, st.lists(NAME, max_size=40))
def test_glob_overlap_is_exact(a: str, b: str, names: list[str]) -> None:
    witness = globs_overlap(a, b)
    if witness is not None:
        assert glob_regex(a).fullmatch(witness) and glob_regex(b).fullmatch(witness)
    else:
        for name in names:
            assert not (glob_regex(a).fullmatch(name) and glob_regex(b).fullmatch(name))


@pytest.mark.parametrize(
    ("a", "b", "meet"),
    [
        ("team-*", "*-prod", "team-prod"),
        ("team-*", "payments", None),
        ("a*b", "*c*", "acb"),
        ("a*", "b*", None),
        ("*", "x", "x"),
        ("api*", "api", "api"),
    ],
)
def test_glob_overlap_examples(a: str, b: str, meet: str | None) -> None:
    assert globs_overlap(a, b) == meet


HEAD = """apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {name: east}
spec: {issuer: "https://east.example", jwksUri: "https://east.example/jwks", labels: {env: prod}}
"""


def template(name: str, namespaces: str, accounts: str, spiffe: str | None = None) -> str:
    extra = f'\n  spiffeIdTemplate: "{spiffe}"' if spiffe else ""
    return f"""---
apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata: {{name: {name}}}
spec:
  clusters: {{names: [east]}}
  namespaces: {namespaces}
  serviceAccounts: {accounts}{extra}
"""


def registry(text: str):  # type: ignore[no-untyped-def]
    return build_registry("corp.example", 1, parse_text(HEAD + text))


def test_a_derived_spiffe_id_reads_back_into_its_service_account() -> None:
    reg = registry(
        template(
            "t",
            '["ns-*"]',
            '["*"]',
            "spiffe://corp.example/x/{serviceAccount}/{cluster}/{namespace}",
        )
    )
    [compiled] = reg.compiled_templates
    identity = reg.resolve("east", "ns-a", "api.v2")
    assert identity is not None and identity.spiffe_id == "spiffe://corp.example/x/api.v2/east/ns-a"
    assert compiled.read_back(identity.spiffe_id) == ("east", "ns-a", "api.v2")
    assert compiled.read_back("spiffe://corp.example/x/api/east/other") is None  # no match
    assert compiled.read_back("spiffe://corp.example/x/api/west/ns-a") is None  # cluster
    assert reg.resolve("west", "ns-a", "api") is None
    # only names spelled as Kubernetes spells them reach the globs and the SPIFFE ID
    for namespace, account in (
        ("ns-a/../b", "api"),
        ("ns-A", "api"),
        ("ns-a", "a/b"),
        ("ns-a.b", "x"),
    ):
        assert reg.resolve("east", namespace, account) is None
    assert compiled.read_back("spiffe://corp.example/x/API/east/ns-a") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            template("a", '["team-*"]', '["*"]') + template("b", '["*-prod"]', '["api"]'),
            "WorkloadTemplate a and WorkloadTemplate b (<stdin>:",
        ),
        (
            template(
                "a",
                '["one"]',
                '["*"]',
                "spiffe://corp.example/{cluster}/{namespace}/{serviceAccount}",
            )
            + template(
                "b",
                '["two"]',
                '["*"]',
                "spiffe://corp.example/{cluster}/{serviceAccount}/{namespace}",
            ),
            "can give one SPIFFE ID to two service accounts",
        ),
        (
            template("a", '["shop"]', '["*"]')
            + """---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: w}
spec:
  selector: {cluster: east, namespace: other, serviceAccount: x}
  spiffeId: spiffe://corp.example/cluster/east/ns/shop/sa/api
""",
            "would give spiffe://corp.example/cluster/east/ns/shop/sa/api, the SPIFFE ID of Workload w",
        ),
        (
            template("a", '["shop"]', '["*"]').replace("names: [east]", "names: [west]"),
            "'west' is not a registered Cluster",
        ),
    ],
)
def test_templates_that_can_meet_are_refused(text: str, problem: str) -> None:
    with pytest.raises(RegistryConflict) as refused:
        registry(text)
    assert problem in str(refused.value)


def test_disjoint_templates_and_one_shape_are_accepted() -> None:
    reg = registry(template("a", '["one"]', '["*"]') + template("b", '["two"]', '["*"]'))
    assert reg.resolve("east", "one", "x").template == "a"  # type: ignore[union-attr]
    assert reg.resolve("east", "two", "x").template == "b"  # type: ignore[union-attr]
    assert re.fullmatch(r"a/east/one/x", reg.resolve("east", "one", "x").workload)  # type: ignore[union-attr]
