"""The decision engine an agent runs over its cluster's bundle (DESIGN §3).

Semantics: deny overrides allow; without a matching allow the answer is deny (default
deny). A binding matches a request when one of its subjects matches the identity, the
request's namespace is in the binding's ``namespaces`` (when it lists any), and a rule
of its role covers the request.

Speed comes from indexing, not from skipping checks: bindings are indexed by the SPIFFE
ID and by one claim of each subject, so an identity only looks at bindings that can
name it; the bindings that do apply to an identity are remembered per identity (the
memo lives as long as the bundle, so a new revision invalidates it by construction);
and each binding keeps its role's rules split by request family."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.policy.matching import CompiledRule, compile_rule, expression_matches, family_of
from trustmesh.policy.request import Request

_FAMILIES = ("resource", "nonResource", "service")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    denied: bool  # an explicit deny binding matched (SubjectAccessReview "denied")
    reason: str
    bindings: tuple[str, ...]
    roles: tuple[str, ...]
    revision: int
    decision_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "denied": self.denied,
            "reason": self.reason,
            "bindings": list(self.bindings),
            "roles": list(self.roles),
            "revision": self.revision,
            "decision_id": self.decision_id,
        }


class _Subject:
    __slots__ = ("claims", "expressions", "spiffe_id")

    def __init__(self, body: dict[str, Any]) -> None:
        self.spiffe_id: str | None = body.get("spiffeId")
        self.claims: tuple[tuple[str, str], ...] = tuple(sorted(body.get("claims", {}).items()))
        self.expressions: tuple[dict[str, Any], ...] = tuple(body.get("matchExpressions", ()))

    def matches(self, spiffe_id: str, claims: Mapping[str, Any]) -> bool:
        if self.spiffe_id is not None and self.spiffe_id != spiffe_id:
            return False
        for key, value in self.claims:
            if claims.get(key) != value:
                return False
        return all(expression_matches(e, claims) for e in self.expressions)


class _Binding:
    __slots__ = ("deny", "name", "namespaces", "role", "rules", "subjects")

    def __init__(self, body: dict[str, Any], role_rules: list[dict[str, Any]]) -> None:
        self.name: str = body["name"]
        self.role: str = body["role"]
        self.deny = body["effect"] == "deny"
        self.subjects = tuple(_Subject(s) for s in body["subjects"])
        namespaces = body.get("namespaces")
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        compiled = [compile_rule(r) for r in role_rules]
        self.rules: dict[str, tuple[CompiledRule, ...]] = {
            family: tuple(r for r in compiled if r.family == family) for family in _FAMILIES
        }

    def covers(self, request: Request, family: str) -> bool:
        if self.namespaces is not None and request.namespace not in self.namespaces:
            return False
        return any(rule.matches(request) for rule in self.rules[family])  # type: ignore[arg-type]


class Engine:
    """Immutable once built: a new bundle means a new Engine, swapped atomically."""

    MEMO_SIZE = 100_000

    def __init__(self, bundle: Mapping[str, Any]) -> None:
        self.cluster: str = bundle["cluster"]
        self.revision: int = int(bundle["revision"])
        self.registry_revision: int = int(bundle.get("registryRevision", 0))
        self.identities: dict[str, dict[str, Any]] = dict(bundle.get("identities", {}))
        roles = bundle["roles"]
        self.bindings = tuple(_Binding(b, roles[b["role"]]) for b in bundle["bindings"])
        self._by_spiffe: dict[str, list[_Binding]] = {}
        self._by_claim: dict[tuple[str, str], list[_Binding]] = {}
        self._unindexed: list[_Binding] = []
        claim_keys: set[str] = set()
        for binding in self.bindings:
            for subject in binding.subjects:
                claim_keys.update(k for k, _ in subject.claims)
                claim_keys.update(e["key"] for e in subject.expressions)
                if subject.spiffe_id is not None:
                    bucket = self._by_spiffe.setdefault(subject.spiffe_id, [])
                elif subject.claims:
                    bucket = self._by_claim.setdefault(subject.claims[0], [])
                else:
                    bucket = self._unindexed
                if binding not in bucket:
                    bucket.append(binding)
        self._claim_keys = tuple(sorted(claim_keys))
        self._index_keys = tuple(sorted({key for key, _ in self._by_claim}))
        self._memo: dict[tuple[Any, ...], tuple[tuple[_Binding, ...], tuple[_Binding, ...]]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = f"{secrets.token_hex(4)}-{self.revision}-"

    def applicable(
        self, spiffe_id: str, claims: Mapping[str, Any]
    ) -> tuple[tuple[_Binding, ...], tuple[_Binding, ...]]:
        """(deny bindings, allow bindings) that name this identity, memoised."""
        key = (spiffe_id, *(claims.get(k) for k in self._claim_keys))
        found = self._memo.get(key)
        if found is not None:
            return found
        candidates = list(self._by_spiffe.get(spiffe_id, ()))
        for key in self._index_keys:
            value = claims.get(key)
            if isinstance(value, str):
                bucket = self._by_claim.get((key, value))
                if bucket:
                    candidates.extend(bucket)
        candidates.extend(self._unindexed)
        seen: set[int] = set()
        denies: list[_Binding] = []
        allows: list[_Binding] = []
        for binding in candidates:
            if id(binding) in seen:
                continue
            seen.add(id(binding))
            if any(s.matches(spiffe_id, claims) for s in binding.subjects):
                (denies if binding.deny else allows).append(binding)
        found = (tuple(denies), tuple(allows))
        if len(self._memo) >= self.MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = found
        return found

    def decide(self, spiffe_id: str, claims: Mapping[str, Any], request: Request) -> Decision:
        denies, allows = self.applicable(spiffe_id, claims)
        family = family_of(request)
        matched = [b for b in denies if b.covers(request, family)]
        if matched:
            first = matched[0]
            return self._decision(
                False, True, f"denied by RoleBinding {first.name} (role {first.role})", matched
            )
        matched = [b for b in allows if b.covers(request, family)]
        if matched:
            first = matched[0]
            return self._decision(
                True, False, f"allowed by RoleBinding {first.name} (role {first.role})", matched
            )
        return self._decision(False, False, "no RoleBinding allows this request (default deny)", [])

    def _decision(
        self, allowed: bool, denied: bool, reason: str, matched: list[_Binding]
    ) -> Decision:
        return Decision(
            allowed=allowed,
            denied=denied,
            reason=reason,
            bindings=tuple(b.name for b in matched),
            roles=tuple(dict.fromkeys(b.role for b in matched)),
            revision=self.revision,
            decision_id=f"{self._id_prefix}{next(self._ids)}",
        )
