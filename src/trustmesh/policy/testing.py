"""Policy tests (DESIGN §3 PolicyTest): every case is decided by the same engine the
agents run, on the candidate's bundle for the case's cluster. One failing case refuses
a version; ``trustmesh policy test DIR`` runs the same checks offline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trustmesh.manifests import PolicyTestCase
from trustmesh.policy.compiler import PolicySet, compile_all
from trustmesh.policy.engine import Decision, Engine
from trustmesh.registry import Registry


@dataclass(frozen=True)
class CaseResult:
    test: str
    case: str
    cluster: str
    expected: str
    got: str
    reason: str
    bindings: tuple[str, ...] = ()  # the bindings that matched (coverage reports)

    @property
    def passed(self) -> bool:
        return self.expected == self.got

    def describe(self) -> str:
        return (
            f"PolicyTest {self.test}, {self.case} (cluster {self.cluster}): expected {self.expected}, "
            f"got {self.got}: {self.reason}"
        )

    def to_json(self) -> dict[str, Any]:
        body = {k: v for k, v in self.__dict__.items() if k != "bindings"}
        return {**body, "passed": self.passed}


def run_policy_tests(
    policy: PolicySet,
    registry: Registry,
    revision: int = 0,
    bundles: dict[str, dict[str, Any]] | None = None,
) -> list[CaseResult]:
    """Decide every case; raises compiler.PolicyError if the policy does not compile."""
    if bundles is None:
        bundles = compile_all(policy, registry, revision)
    engines: dict[str, Engine] = {}
    results = []
    for test_name, test in sorted(policy.tests.items()):
        for case in test.cases:
            engine = engines.get(case.cluster)
            if engine is None:
                engine = engines[case.cluster] = Engine(bundles[case.cluster])
            subject = case.subject
            if subject.user is not None:  # a person (Kubernetes requests only)
                results.append(
                    _result(test_name, case, engine.decide_user(subject.user, case.request))
                )
                continue
            named = registry.identity_named(subject.workload) if subject.workload else None
            if named is not None:  # a Workload, or an identity a template gives
                spiffe_id = named.spiffe_id
                claims: dict[str, Any] = dict(named.claims)
            else:
                spiffe_id = (
                    subject.spiffe_id or f"spiffe://{registry.trust_domain}/policy-test/{test_name}"
                )
                claims = dict(subject.claims)
            decision = engine.decide(spiffe_id, claims, case.request)
            results.append(_result(test_name, case, decision))
    return results


def _result(test: str, case: PolicyTestCase, decision: Decision) -> CaseResult:
    return CaseResult(
        test=test,
        case=case.name,
        cluster=case.cluster,
        expected=case.expect,
        got="allow" if decision.allowed else "deny",
        reason=decision.reason,
        bindings=tuple(decision.bindings),
    )
