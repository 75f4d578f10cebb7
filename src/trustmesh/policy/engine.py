"""The decision engine an agent runs over its cluster's bundle (DESIGN §3).

Semantics: deny overrides allow; without a matching allow the answer is deny (default
deny). A binding matches a request when one of its subjects matches the identity, the
request's namespace is in the binding's ``namespaces`` (when it lists any), and a rule
of its role covers the request.

Speed comes from indexing, not from skipping checks: bindings are indexed by the SPIFFE
ID and by one claim of each subject, so an identity only looks at bindings that can
name it; the bindings that do apply to an identity are remembered per identity (its
SPIFFE ID and the claims that bindings name, an absent claim told apart from a null
one; the memo lives as long as the bundle, so a new revision invalidates it by
construction);
and each binding keeps its role's rules split by request family."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.policy.compiler import claim_counts
from trustmesh.policy.matching import CompiledRule, compile_rule, family_of, requirement_matches
from trustmesh.request import Request

_FAMILIES = ("resource", "nonResource", "service")
# Stands in the memo key for a claim the identity does not carry: a claim that is
# present with a null value is a different identity (``Exists`` holds for it).
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    denied: bool  # an explicit deny binding matched (SubjectAccessReview "denied")
    reason: str
    bindings: tuple[str, ...]
    roles: tuple[str, ...]
    policy_revision: int
    decision_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "denied": self.denied,
            "reason": self.reason,
            "bindings": list(self.bindings),
            "roles": list(self.roles),
            "policy_revision": self.policy_revision,
            "decision_id": self.decision_id,
        }


class _Subject:
    __slots__ = ("claims", "expressions", "spiffe_id")

    def __init__(self, body: dict[str, Any]) -> None:
        self.spiffe_id: str | None = body.get("spiffeId")
        self.claims: tuple[tuple[str, str], ...] = tuple(sorted(body.get("claims", {}).items()))
        self.expressions: tuple[tuple[str, str, frozenset[str]], ...] = tuple(
            (e["key"], e["operator"], frozenset(e.get("values", ())))
            for e in body.get("matchExpressions", ())
        )

    def matches(self, spiffe_id: str, claims: Mapping[str, Any]) -> bool:
        if self.spiffe_id is not None and self.spiffe_id != spiffe_id:
            return False
        for key, value in self.claims:
            if claims.get(key) != value:
                return False
        for key, operator, values in self.expressions:
            if not requirement_matches(key, operator, values, claims):
                return False
        return True


class _Binding:
    __slots__ = ("deny", "name", "namespaces", "role", "rules", "subjects")

    def __init__(self, body: dict[str, Any], compiled: list[CompiledRule]) -> None:
        self.name: str = body["name"]
        self.role: str = body["role"]
        self.deny = body["effect"] == "deny"
        self.subjects = tuple(_Subject(s) for s in body["subjects"])
        namespaces = body.get("namespaces")
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.rules: dict[str, tuple[CompiledRule, ...]] = {
            family: tuple(r for r in compiled if r.family == family) for family in _FAMILIES
        }

    def covers(self, request: Request, family: str) -> bool:
        if self.namespaces is not None and request.namespace not in self.namespaces:
            return False
        for rule in self.rules[family]:  # noqa: SIM110 (a loop: no generator per call on the hot path)
            if rule.matches(request):  # type: ignore[arg-type]
                return True
        return False


_Entry = tuple[_Binding, _Subject]


class Engine:
    """Immutable once built: a new bundle means a new Engine, swapped atomically."""

    MEMO_SIZE = 100_000

    def __init__(self, bundle: Mapping[str, Any]) -> None:
        self.cluster: str = bundle["cluster"]
        self.revision: int = int(bundle["revision"])
        self.registry_revision: int = int(bundle.get("registryRevision", 0))
        self.identities: dict[str, dict[str, Any]] = dict(bundle.get("identities", {}))
        roles = bundle["roles"]
        compiled = {name: [compile_rule(rule) for rule in rules] for name, rules in roles.items()}
        self.bindings = tuple(_Binding(b, compiled[b["role"]]) for b in bundle["bindings"])
        # Each index entry is (binding, the subject indexed there): a subject can only
        # match identities that carry its index key, so only that subject is checked.
        self._by_spiffe: dict[str, list[_Entry]] = {}
        self._by_claim: dict[tuple[str, str], list[_Entry]] = {}
        self._unindexed: list[_Entry] = []
        # How many registered identities carry each claim value: a subject is indexed
        # under its most selective condition, so an identity meets few candidates.
        counts: dict[str, dict[str, int]] = bundle.get("claimCounts") or claim_counts(
            self.identities
        )

        def frequency(claim: tuple[str, str]) -> int:
            return counts.get(claim[0], {}).get(claim[1], 0)

        claim_keys: set[str] = set()
        for binding in self.bindings:
            for subject in binding.subjects:
                claim_keys.update(k for k, _ in subject.claims)
                claim_keys.update(e[0] for e in subject.expressions)
                for bucket in self._buckets_for(subject, frequency):
                    bucket.append((binding, subject))
        self._claim_keys = tuple(sorted(claim_keys))
        self._absent = (_ABSENT,) * len(self._claim_keys)
        self._index_keys = tuple(sorted({key for key, _ in self._by_claim}))
        self._memo: dict[tuple[Any, ...], tuple[tuple[_Binding, ...], tuple[_Binding, ...]]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = f"{secrets.token_hex(4)}-{self.revision}-"

    def _buckets_for(
        self, subject: _Subject, frequency: Callable[[tuple[str, str]], int]
    ) -> list[list[_Entry]]:
        """Index keys such that every identity the subject matches has one of them."""
        if subject.spiffe_id is not None:
            return [self._by_spiffe.setdefault(subject.spiffe_id, [])]
        options: list[list[tuple[str, str]]] = [[claim] for claim in subject.claims]
        options.extend(
            [(key, value) for value in sorted(values)]
            for key, operator, values in subject.expressions
            if operator == "In"
        )
        if not options:
            return [self._unindexed]
        best = min(options, key=lambda keys: sum(frequency(k) for k in keys))
        return [self._by_claim.setdefault(k, []) for k in best]

    def applicable(
        self, spiffe_id: str, claims: Mapping[str, Any]
    ) -> tuple[tuple[_Binding, ...], tuple[_Binding, ...]]:
        """(deny bindings, allow bindings) that name this identity, memoised."""
        key = (spiffe_id, tuple(map(claims.get, self._claim_keys, self._absent)))
        memo_key: tuple[Any, ...] | None = key
        try:
            found = self._memo.get(key)
        except TypeError:  # a non-hashable claim value named by a binding: no memo
            memo_key, found = None, None
        if found is not None:
            return found
        buckets = [self._by_spiffe.get(spiffe_id), self._unindexed]
        by_claim = self._by_claim
        for claim_key in self._index_keys:
            value = claims.get(claim_key)
            if isinstance(value, str):
                buckets.append(by_claim.get((claim_key, value)))
        matched: dict[_Binding, None] = {}
        for bucket in buckets:
            if bucket:
                for binding, subject in bucket:
                    if binding not in matched and subject.matches(spiffe_id, claims):
                        matched[binding] = None
        denies = [b for b in matched if b.deny]
        allows = [b for b in matched if not b.deny]
        found = (tuple(denies), tuple(allows))
        if memo_key is not None:
            if len(self._memo) >= self.MEMO_SIZE:
                self._memo.clear()
            self._memo[memo_key] = found
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
            policy_revision=self.revision,
            decision_id=f"{self._id_prefix}{next(self._ids)}",
        )
