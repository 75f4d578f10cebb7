"""Property tests: junk input only ever raises ManifestError (DESIGN §3)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_samples import CLUSTER, WORKLOAD

from trustmesh.common.errors import ManifestError
from trustmesh.manifests import Document, document_from_body, parse_text

YAML_BITS = st.sampled_from(
    [
        "\n", "  ", "- ", ": ", "---\n", "...\n", "{", "}", "[", "]", ",", "&a ", "*a", "!!str ",
        "!!python/object:os.system ", "!x ", "<<: ", "? ", "|\n", ">\n", "'", '"', "#",
        "%YAML 1.1\n",
        "apiVersion: trustmesh.io/v1alpha1\n", "kind: Cluster\n", "kind: Workload\n",
        "metadata:\n", "  name: a\n", "spec:\n", "  issuer: https://i.example\n", "  selector:\n",
        "    cluster: c\n", "  jwks:\n", "    keys:\n", "      - kty: EC\n", "true", "1", "1.5",
        "null", "2024-01-01", "0x1F", "1:30", "\t", "\x00", "\ufeff", "é",
    ]
)  # fmt: skip

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _parses_or_refuses(text: str) -> None:
    try:
        docs = parse_text(text, "fuzz.yaml")
    except ManifestError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.path == "fuzz.yaml" and problem.line >= 0
            assert str(problem).startswith("fuzz.yaml:")
    else:
        assert all(isinstance(d, Document) for d in docs)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    _parses_or_refuses(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(YAML_BITS | st.text(max_size=4), max_size=40))
def test_random_yaml_fragments(bits: list[str]) -> None:
    _parses_or_refuses("".join(bits))


@settings(max_examples=200)
@given(JSON)
def test_random_yaml_values(value: Any) -> None:
    _parses_or_refuses(yaml.safe_dump(value))
    _parses_or_refuses(yaml.safe_dump({"apiVersion": "trustmesh.io/v1alpha1", "spec": value}))


@settings(max_examples=200)
@given(st.sampled_from([CLUSTER, WORKLOAD]), st.integers(0, 400), st.text(max_size=6))
def test_mutated_manifests(base: str, position: int, insert: str) -> None:
    position %= len(base) + 1
    _parses_or_refuses(base[:position] + insert + base[position:])


@settings(max_examples=200)
@given(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]), JSON)
def test_random_stored_bodies(field: str, value: Any) -> None:
    [doc] = parse_text(WORKLOAD)
    try:
        again = document_from_body({**doc.body, field: value})
    except ManifestError as error:
        assert all(p.path == "<stored>" and p.line == 0 for p in error.problems)
    else:
        assert again.kind == "Workload"
