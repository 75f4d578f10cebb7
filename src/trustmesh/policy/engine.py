"""The decision engine an agent runs over its cluster's bundle (DESIGN §3).

Semantics: deny overrides allow; without a matching allow the answer is deny (default
deny). A binding matches a request when one of its subjects matches the identity, the
request's namespace is in the binding's ``namespaces`` (when it lists any; a request
without a namespace is in none), and a rule of its role covers the request.

Requests arrive canonical (``request.parse_request``); the engine adds what depends on
its cluster (DESIGN §3 "Canonical requests", ``request/canonical.py``): a host
``<svc>.<ns>.svc.<clusterDomain>`` (the bundle's ``clusterDomain``) is read as
``<svc>.<ns>.svc`` in namespace ``<ns>``, a short host (``<svc>``, ``<svc>.<ns>``) with
a known namespace is expanded, and a short host without one is decided under every
reading — as written, and as each ``<svc>.<ns>.svc`` a rule names. The request is
allowed only if every reading is; an explicit deny under any reading wins; a host with
more than ``MAX_READINGS`` readings is denied (default deny) without deciding any, so
one question costs a bounded number of evaluations.

A default deny says why (``reason``): the allow binding that came nearest — it named
the identity — and the condition that failed (namespace, or the closest rule's host,
path, method, verb…). The explanation is computed for default denies only, over at
most ``EXPLAIN_BINDINGS`` bindings and ``EXPLAIN_RULES`` rules each.

Subjects match by SPIFFE ID — one ID, or a pattern of one trust domain (``*`` one path
segment, ``**`` any number: ``spiffe://partner.example/**``, DESIGN §9) — and by claims.

Speed comes from indexing, not from skipping checks: bindings are indexed by the SPIFFE
ID and by one claim of each subject, so an identity only looks at bindings that can
name it (a pattern subject with no claim to index by waits in a list of its trust
domain, looked at after the exact index); the bindings that do apply to an identity are remembered per identity (its
SPIFFE ID and the claims that bindings name, an absent claim told apart from a null
one; the memo lives as long as the bundle, so a new revision invalidates it by
construction); and each binding keeps its role's rules split by request family."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.policy.compiler import claim_counts
from trustmesh.policy.matching import (
    CompiledRule,
    ServiceRule,
    compile_rule,
    explain_rule,
    family_of,
    requirement_matches,
)
from trustmesh.request import Request, ServiceRequest
from trustmesh.request.canonical import (
    DEFAULT_CLUSTER_DOMAIN,
    SERVICE_SUFFIX,
    domain_suffix,
    is_short,
    readings,
    rule_host,
    service_host,
    strip_cluster_domain,
)
from trustmesh.spiffeid import (
    SpiffeIdPattern,
    is_spiffe_id_pattern,
    parse_spiffe_id_pattern,
    trust_domain_of,
)

_FAMILIES = ("resource", "nonResource", "service")
# Stands in the memo key for a claim the identity does not carry: a claim that is
# present with a null value is a different identity (``Exists`` holds for it).
_ABSENT = object()
DEFAULT_DENY = "no RoleBinding allows this request (default deny)"
EXPLAIN_BINDINGS = 32
EXPLAIN_RULES = 64
MAX_READINGS = 64
"""A short host without a namespace is decided under at most this many readings; past
it the answer is a default deny that asks for the namespace."""


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
    __slots__ = ("claims", "expressions", "pattern", "spiffe_id")

    def __init__(self, body: dict[str, Any]) -> None:
        self.spiffe_id: str | None = body.get("spiffeId")
        self.pattern: SpiffeIdPattern | None = None
        if self.spiffe_id is not None and is_spiffe_id_pattern(self.spiffe_id):
            self.pattern = parse_spiffe_id_pattern(self.spiffe_id)
            self.spiffe_id = None
        self.claims: tuple[tuple[str, str], ...] = tuple(sorted(body.get("claims", {}).items()))
        self.expressions: tuple[tuple[str, str, frozenset[str]], ...] = tuple(
            (e["key"], e["operator"], frozenset(e.get("values", ())))
            for e in body.get("matchExpressions", ())
        )

    def matches(self, spiffe_id: str, claims: Mapping[str, Any]) -> bool:
        if self.spiffe_id is not None and self.spiffe_id != spiffe_id:
            return False
        if self.pattern is not None and not self.pattern.matches(spiffe_id):
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

    def nearness(self, request: Request, family: str) -> int:
        """How near this binding (which names the identity but does not cover the
        request) came: 2 when a rule covers the request and only the namespace does
        not admit it, 1 when the namespace admits it (so no rule covers it), 0 when
        neither. Nothing is written here (:meth:`describe` does, for one binding)."""
        if self.namespaces is None or request.namespace in self.namespaces:
            return 1
        for rule in self.rules[family][:EXPLAIN_RULES]:
            if rule.matches(request):  # type: ignore[arg-type]
                return 2
        return 0

    def describe(self, request: Request, family: str, rank: int) -> str:
        """What this binding matched and what it missed, in words (``rank`` from
        :meth:`nearness`)."""
        namespace_ok = rank == 1
        closest: list[str] | None = [] if rank == 2 else None
        if rank != 2:
            for rule in self.rules[family][:EXPLAIN_RULES]:
                missed = explain_rule(rule, request)
                if closest is None or len(missed) < len(closest):
                    closest = missed
        where = ""
        if not namespace_ok:
            assert self.namespaces is not None
            where = (
                f"{request.namespace} is not one of {', '.join(sorted(self.namespaces))}"
                if request.namespace
                else "the request has no namespace"
            )
        if closest == []:
            text = f"the subject and the rule but not namespace: {where}"
        else:
            matched = "the subject and namespace" if self.namespaces is not None else "the subject"
            if not namespace_ok:
                matched = f"the subject but not namespace ({where}) and"
            else:
                matched += " but"
            if closest is None:
                text = f"{matched} role {self.role} has no {family} rule"
            else:
                text = f"{matched} no rule of role {self.role}: the closest misses " + ", ".join(
                    closest
                )
        return f"RoleBinding {self.name} matched {text}"


_Entry = tuple[_Binding, _Subject]


class Engine:
    """Immutable once built: a new bundle means a new Engine, swapped atomically."""

    MEMO_SIZE = 100_000

    def __init__(self, bundle: Mapping[str, Any]) -> None:
        self.cluster: str = bundle["cluster"]
        self.revision: int = int(bundle["revision"])
        self.registry_revision: int = int(bundle.get("registryRevision", 0))
        self.identities: dict[str, dict[str, Any]] = dict(bundle.get("identities", {}))
        self.cluster_domain: str = bundle.get("clusterDomain") or DEFAULT_CLUSTER_DOMAIN
        self._domain_suffix = domain_suffix(self.cluster_domain)
        roles = bundle["roles"]
        compiled = {
            name: [compile_rule(self._canonical_rule(rule)) for rule in rules]
            for name, rules in roles.items()
        }
        self.bindings = tuple(_Binding(b, compiled[b["role"]]) for b in bundle["bindings"])
        self._name_services(compiled)
        # Each index entry is (binding, the subject indexed there): a subject can only
        # match identities that carry its index key, so only that subject is checked.
        self._by_spiffe: dict[str, list[_Entry]] = {}
        self._by_claim: dict[tuple[str, str], list[_Entry]] = {}
        self._unindexed: list[_Entry] = []
        self._by_pattern_domain: dict[str, list[_Entry]] = {}
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

    def _canonical_rule(self, body: dict[str, Any]) -> dict[str, Any]:
        """A service rule's hosts as canonical requests are matched against them
        (``canonical.rule_host``: a version stored before ports and cluster domains
        were refused in rule hosts)."""
        hosts = body.get("services")
        if not hosts:
            return body
        suffix = self._domain_suffix
        read = [rule_host(h, suffix) for h in hosts]
        return body if read == hosts else {**body, "services": read}

    def _name_services(self, compiled: Mapping[str, list[CompiledRule]]) -> None:
        """What the readings of a short host draw on (``canonical.readings``): per
        service name, the namespaces of rule hosts ``<svc>.<ns>.svc``; the namespaces
        where a rule names every service (``*.<ns>.svc``, or ``*``/``*.svc`` in a
        binding that lists namespaces); whether a rule names every service anywhere
        (``*.svc``)."""
        by_service: dict[str, set[str]] = {}
        wildcard: set[str] = set()
        self._any_service = False
        for rules in compiled.values():
            for rule in rules:
                if not isinstance(rule, ServiceRule):
                    continue
                for host in rule.hosts:
                    labels = host.split(".")
                    if len(labels) == 3 and labels[2] == SERVICE_SUFFIX[1:]:
                        by_service.setdefault(labels[0], set()).add(labels[1])
                for suffix in rule.suffixes:
                    labels = suffix.split(".")
                    if suffix == SERVICE_SUFFIX:
                        self._any_service = True
                    elif len(labels) == 3 and labels[2] == SERVICE_SUFFIX[1:]:
                        wildcard.add(labels[1])
        for binding in self.bindings:
            if binding.namespaces is not None and any(
                rule.any_host or SERVICE_SUFFIX in rule.suffixes  # type: ignore[union-attr]
                for rule in binding.rules["service"]
            ):
                wildcard.update(binding.namespaces)
        self._by_service = {name: frozenset(spaces) for name, spaces in by_service.items()}
        self._wildcard_namespaces = frozenset(wildcard)

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
            if subject.pattern is not None:
                return [self._by_pattern_domain.setdefault(subject.pattern.trust_domain, [])]
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
        if self._by_pattern_domain:
            buckets.append(self._by_pattern_domain.get(trust_domain_of(spiffe_id)))
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

    def resolve(self, request: Request) -> Request:
        """The request as this cluster reads it (module docstring): the cluster domain
        removed from a service host, a short host expanded in a known namespace, the
        namespace taken from a service host. An ambiguous short host (no namespace)
        stays as it is: :meth:`decide` evaluates its readings."""
        if type(request) is not ServiceRequest:
            return request
        return self._resolve_service(request)

    def _resolve_service(self, request: ServiceRequest) -> ServiceRequest:
        host = request.host
        if host.endswith(self._domain_suffix):
            host = strip_cluster_domain(host, self._domain_suffix)
        host, namespace = service_host(host, request.namespace)
        if host == request.host and namespace == request.namespace:
            return request
        return ServiceRequest(host, request.path, request.method, namespace)

    def decide(self, spiffe_id: str, claims: Mapping[str, Any], request: Request) -> Decision:
        denies, allows = self.applicable(spiffe_id, claims)
        if type(request) is ServiceRequest:
            request = self._resolve_service(request)
            if not request.namespace and is_short(request.host):
                return self._decide_readings(denies, allows, request)
        return self._decide_one(denies, allows, request, family_of(request))

    def decide_reading(
        self, spiffe_id: str, claims: Mapping[str, Any], request: Request
    ) -> Decision:
        """The decision on ``request`` exactly as given, one reading, nothing resolved
        (the effective diff probes rules with it: ``policy/diff.py``)."""
        denies, allows = self.applicable(spiffe_id, claims)
        return self._decide_one(denies, allows, request, family_of(request))

    @staticmethod
    def _match(
        denies: tuple[_Binding, ...], allows: tuple[_Binding, ...], request: Request, family: str
    ) -> tuple[bool, list[_Binding]]:
        """(an explicit deny, the bindings that decide): the covering deny bindings,
        else the covering allow bindings (none: default deny)."""
        matched = [b for b in denies if b.covers(request, family)]
        if matched:
            return True, matched
        return False, [b for b in allows if b.covers(request, family)]

    def _decide_one(
        self,
        denies: tuple[_Binding, ...],
        allows: tuple[_Binding, ...],
        request: Request,
        family: str,
    ) -> Decision:
        denied, matched = self._match(denies, allows, request, family)
        if denied:
            first = matched[0]
            return self._decision(
                False, True, f"denied by RoleBinding {first.name} (role {first.role})", matched
            )
        if matched:
            first = matched[0]
            return self._decision(
                True, False, f"allowed by RoleBinding {first.name} (role {first.role})", matched
            )
        reason = DEFAULT_DENY + self._explain(allows, request, family)
        return self._decision(False, False, reason, [])

    def _decide_readings(
        self, denies: tuple[_Binding, ...], allows: tuple[_Binding, ...], request: ServiceRequest
    ) -> Decision:
        """An ambiguous short host: allowed only under every reading, an explicit deny
        under any reading wins (DESIGN §3)."""
        read = readings(
            request.host, self._by_service, self._wildcard_namespaces, self._any_service
        )
        if len(read) == 1:
            return self._decide_one(denies, allows, request, "service")
        if len(read) > MAX_READINGS:  # bounded work per question: fail closed
            reason = (
                f"{DEFAULT_DENY}: host {request.host} has {len(read)} readings, more than "
                f"{MAX_READINGS}; give the request its namespace"
            )
            return self._decision(False, False, reason, [])
        outcomes = []
        for host, namespace in read:
            reading = ServiceRequest(host, request.path, request.method, namespace)
            outcomes.append((reading, *self._match(denies, allows, reading, "service")))
        hits = [(reading, matched) for reading, denied, matched in outcomes if denied]
        if hits:
            reading, matched = hits[0]
            every = list(dict.fromkeys(b for _, bindings in hits for b in bindings))
            first = matched[0]
            reason = f"denied by RoleBinding {first.name} (role {first.role})"
            return self._decision(False, True, reason + _read_as(request, reading), every)
        for reading, _, matched in outcomes:
            if not matched:
                explanation = self._explain(allows, reading, "service")
                return self._decision(
                    False, False, DEFAULT_DENY + _read_as(request, reading) + explanation, []
                )
        every = list(dict.fromkeys(b for _, _, bindings in outcomes for b in bindings))
        first = outcomes[0][2][0]
        reason = (
            f"allowed by RoleBinding {first.name} (role {first.role}) under each of the "
            f"{len(outcomes)} readings of host {request.host}"
        )
        return self._decision(True, False, reason, every)

    @staticmethod
    def _explain(allows: tuple[_Binding, ...], request: Request, family: str) -> str:
        """Why a default deny: the first allow binding of the nearest kind — only its
        namespace failed, else its namespace held, else neither — and, in words, what
        its closest rule missed. Bounded: at most EXPLAIN_BINDINGS bindings and
        EXPLAIN_RULES rules each, and the sentence is written for one binding."""
        if not allows:
            return "; no allow RoleBinding names this identity"
        best, best_rank = allows[0], -1
        for binding in allows[:EXPLAIN_BINDINGS]:
            rank = binding.nearness(request, family)
            if rank > best_rank:
                best, best_rank = binding, rank
                if rank == 2:  # none can come nearer
                    break
        return f"; nearest: {best.describe(request, family, best_rank)}"

    def _decision(
        self, allowed: bool, denied: bool, reason: str, matched: list[_Binding]
    ) -> Decision:
        """One decision, one id."""
        return Decision(
            allowed=allowed,
            denied=denied,
            reason=reason,
            bindings=tuple(b.name for b in matched),
            roles=tuple(dict.fromkeys(b.role for b in matched)),
            policy_revision=self.revision,
            decision_id=f"{self._id_prefix}{next(self._ids)}",
        )


def _read_as(request: ServiceRequest, reading: ServiceRequest) -> str:
    if reading.host == request.host:
        return f" (host {request.host} read as written: the request names no namespace)"
    return f" (host {request.host} read as {reading.host})"
