"""The policy gate (DESIGN §3 "Publishing runs every PolicyTest first"): a candidate —
the policy and the registry as they would be after a change — is compiled into every
cluster's bundle and every PolicyTest case is decided on it. A change that does not
compile raises PolicyError; one that fails a case raises PolicyTestFailed; either way
nothing has been written, and the version in force stays."""

from __future__ import annotations

from trustmesh.common.errors import PolicyTestFailed
from trustmesh.policy.compiler import PolicySet, compile_all
from trustmesh.policy.testing import CaseResult, run_policy_tests
from trustmesh.registry import Registry


def gate(policy: PolicySet, registry: Registry, revision: int) -> list[CaseResult]:
    """Every case's result when all pass (``revision``: the revision the candidate
    would get)."""
    bundles = compile_all(policy, registry, revision)  # raises PolicyError
    results = run_policy_tests(policy, registry, revision, bundles)
    failed = [r for r in results if not r.passed]
    if failed:
        raise PolicyTestFailed(failed, len(results))
    return results
