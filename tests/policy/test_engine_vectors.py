"""The engine against the named vectors in ``testdata/engine/`` (see its README).

Each ``decisions/`` file is a policy, compiled as an apply compiles it (manifests ->
``compile_all`` over the fixture inventory), and cases decided in file order by one
engine per cluster, as an agent decides them. Each ``refused/`` file is a policy that
must never reach an engine, with the problem it has to be refused for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from policy_fixtures import registry

from trustmesh.common.errors import ManifestError, PolicyError
from trustmesh.manifests import API_VERSION, parse_text
from trustmesh.policy.compiler import PolicySet, compile_all, identity_claims
from trustmesh.policy.engine import Decision, Engine
from trustmesh.request import parse_request

TESTDATA = Path(__file__).parent / "testdata" / "engine"
REGISTRY = registry()
DEFAULT_CLUSTER = "prod-eu"
# expect -> (allowed, denied)
OUTCOMES = {"allow": (True, False), "deny": (False, False), "explicit-deny": (False, True)}


def vectors(kind: str) -> list[Any]:
    files = sorted((TESTDATA / kind).glob("*.json"))
    assert files, f"no vectors under testdata/engine/{kind}"
    return [pytest.param(json.loads(f.read_text(encoding="utf-8")), id=f.stem) for f in files]


def manifest_text(vector: dict[str, Any]) -> str:
    """The vector's roles and bindings as the manifests an operator would apply."""
    documents = [
        {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
        for kind, key in (("GlobalRole", "roles"), ("RoleBinding", "bindings"))
        for name, spec in vector[key].items()
    ]
    return "\n---\n".join(json.dumps(d) for d in documents)


def compile_vector(vector: dict[str, Any]) -> dict[str, dict[str, Any]]:
    policy = PolicySet.from_documents(parse_text(manifest_text(vector), "vector.yaml"))
    return compile_all(policy, REGISTRY, revision=1)


def caller(subject: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A registered workload (its SPIFFE ID and the claims its tokens carry), or a
    SPIFFE ID with the claims given."""
    if "workload" in subject:
        name = subject["workload"]
        return REGISTRY.spiffe_id_of(name), identity_claims(REGISTRY, name)
    return subject["spiffeId"], dict(subject["claims"])


def mismatches(case: dict[str, Any], decision: Decision) -> list[str]:
    found = []
    got = {v: k for k, v in OUTCOMES.items()}[(decision.allowed, decision.denied)]
    if got != case["expect"]:
        found.append(f"expected {case['expect']}, got {got} ({decision.reason})")
    if got == "deny" and (decision.bindings or decision.roles):
        found.append(f"a default deny names bindings {decision.bindings} / roles {decision.roles}")
    for key in ("bindings", "roles"):
        if key in case and sorted(getattr(decision, key)) != sorted(case[key]):
            found.append(
                f"expected {key} {sorted(case[key])}, got {sorted(getattr(decision, key))}"
            )
    if "reason" in case and decision.reason != case["reason"]:
        found.append(f"expected reason {case['reason']!r}, got {decision.reason!r}")
    return found


@pytest.mark.parametrize("vector", vectors("decisions"))
def test_decision_vector(vector: dict[str, Any]) -> None:
    bundles = compile_vector(vector)
    engines: dict[str, Engine] = {}
    failures = []
    for case in vector["cases"]:
        cluster = case.get("cluster", vector.get("cluster", DEFAULT_CLUSTER))
        if cluster not in engines:
            engines[cluster] = Engine(bundles[cluster])
        spiffe_id, claims = caller(case["subject"])
        decision = engines[cluster].decide(spiffe_id, claims, parse_request(case["request"]))
        assert decision.policy_revision == 1
        failures.extend(f"{case['name']}: {problem}" for problem in mismatches(case, decision))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("vector", vectors("decisions"))
def test_decision_vectors_put_good_and_bad_cases_side_by_side(vector: dict[str, Any]) -> None:
    names = [case["name"] for case in vector["cases"]]
    assert len(names) == len(set(names)), "case names must be unique within a vector"
    expected = {case["expect"] for case in vector["cases"]}
    if vector["bindings"]:
        assert "allow" in expected and expected & {"deny", "explicit-deny"}


@pytest.mark.parametrize("vector", vectors("refused"))
def test_refused_vector(vector: dict[str, Any]) -> None:
    with pytest.raises((ManifestError, PolicyError)) as caught:
        compile_vector(vector)
    problems = [str(problem) for problem in caught.value.problems]
    assert any(vector["error"] in problem for problem in problems), problems
