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
A ``user`` subject names a person and matches only that person (:meth:`Engine.decide_user`,
the Kubernetes username ``user:NAME``); no workload subject — not even a
``DoesNotExist`` expression, which every claim set without the key meets — ever
matches a person, and a ``user`` subject never matches a workload: people and workloads
are looked up in separate indexes.

A binding with ``expiresAt`` (epoch seconds) stops matching once the engine's clock
reaches it, on its own, without another bundle. The engine keeps the next expiry; a
decision compares against it only when some binding expires (one attribute test
otherwise), and when the clock passes it the expired bindings leave the indexes and
the memos are dropped. Without a clock (the control plane's gate, the diff) every
binding of the bundle counts.

Speed comes from indexing, not from skipping checks (``bench engine``; docs/benchmarks.md):

- bindings are indexed by the SPIFFE ID and by one claim of each subject (its most
  selective), so an identity only looks at bindings that can name it, and checks of
  each only what its index key does not already hold (``_Subject.residual``); a subject
  with a SPIFFE ID pattern waits in a list of its trust domain, checked in full after
  the index;
- the bindings that apply to an identity are remembered per SPIFFE ID with the values
  of the claims bindings name (an absent claim told apart from a null one; another
  token of the SPIFFE ID with other claims is looked up again); the memo lives as long
  as the bundle, so a new revision invalidates it by construction;
- each binding is one bit; ``matching.CandidateIndex`` answers, from the request's verb
  (method), resource entry or host, the bits of the bindings that may cover it — a
  superset — and a decision matches in full only the identity's bindings among them;
- a decision's reason is written once per binding at load; a default deny's
  explanation is written when the reason is first read (the same text, from the same
  immutable inputs);
- how a service request's (host, namespace) reads in this cluster is remembered."""

from __future__ import annotations

import gc
import itertools
import math
import secrets
import threading
from collections.abc import Callable, Mapping
from functools import partial
from itertools import filterfalse
from operator import attrgetter
from typing import Any

from trustmesh.common.clock import Clock
from trustmesh.manifests import CompiledTemplate, TemplateIndex, template_workload_name
from trustmesh.policy.compiler import claim_counts
from trustmesh.policy.matching import (
    CandidateIndex,
    CompiledRule,
    ServiceRule,
    compile_rule,
    family_of,
    requirement_matches,
)
from trustmesh.request import KubernetesRequest, Request, ServiceRequest
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


class Decision:
    """One decision. Built on every request, so a plain slotted class (a frozen
    dataclass sets each field through ``object.__setattr__``: five times the cost).
    The reason of a default deny — the nearest-binding explanation — is written when
    it is first read (``reason``), from the same immutable inputs, so callers that
    only need the outcome (the effective diff's probes) do not pay for it."""

    __slots__ = (
        "_explain",
        "_reason",
        "allowed",
        "bindings",
        "decision_id",
        "denied",
        "policy_revision",
        "roles",
    )

    def __init__(
        self,
        allowed: bool,
        denied: bool,
        reason: str,
        bindings: tuple[str, ...],
        roles: tuple[str, ...],
        policy_revision: int,
        decision_id: str,
    ) -> None:
        self.allowed = allowed
        self.denied = denied  # an explicit deny binding matched (SubjectAccessReview "denied")
        self._reason = reason
        self._explain: Callable[[], str] | None = None
        self.bindings = bindings
        self.roles = roles
        self.policy_revision = policy_revision
        self.decision_id = decision_id

    @property
    def reason(self) -> str:
        explain = self._explain
        if explain is not None:
            self._reason += explain()
            self._explain = None
        return self._reason

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.allowed,
            self.denied,
            self.reason,
            self.bindings,
            self.roles,
            self.policy_revision,
            self.decision_id,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed!r}, denied={self.denied!r}, reason={self.reason!r}, "
            f"bindings={self.bindings!r}, roles={self.roles!r}, "
            f"policy_revision={self.policy_revision!r}, decision_id={self.decision_id!r})"
        )

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


_Check = Callable[[Mapping[str, Any]], bool]
# (claim key, value) to compare, or a check, or neither: see _Subject.residual
_Residual = tuple[str | None, str | None, "_Check | None"]


def _condition(key: str, operator: str, values: frozenset[str]) -> _Check:
    """One ``matchExpressions`` requirement as a check of the claims (the semantics of
    ``matching.requirement_matches``, specialised by operator once per bundle)."""
    if operator == "Exists":
        return lambda claims: key in claims
    if operator == "DoesNotExist":
        return lambda claims: key not in claims
    if operator == "In":

        def inside(claims: Mapping[str, Any]) -> bool:
            value = claims.get(key)
            return isinstance(value, str) and value in values

        return inside

    def outside(claims: Mapping[str, Any]) -> bool:  # NotIn: also an absent claim
        value = claims.get(key)
        return not (isinstance(value, str) and value in values)

    return outside


def _equals(key: str, value: str) -> _Check:
    return lambda claims: claims.get(key) == value


def _all_of(checks: list[_Check]) -> _Check | None:
    """None when there is nothing to check (the subject matches every identity that
    reaches its index bucket)."""
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    first, rest = checks[0], _all_of(checks[1:])
    assert rest is not None
    return lambda claims: first(claims) and rest(claims)


class _Subject:
    __slots__ = ("claims", "expressions", "pattern", "spiffe_id", "user")

    def __init__(self, body: dict[str, Any]) -> None:
        self.user: str | None = body.get("user")  # a person: matches no workload
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
        if self.user is not None:
            return False
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

    def residual(self, claim: int | None, expression: int | None) -> _Residual:
        """What is left to check of an identity found in this subject's index bucket:
        every condition but the SPIFFE ID (the bucket is keyed by it) and the claim
        (index into ``claims``) or ``In`` expression (index into ``expressions``) the
        bucket is keyed by — an identity reaches a claim bucket only through a string
        claim equal to its key's value. One claim left is (key, value, None), checked
        inline; anything else (None, None, a check), or (None, None, None): nothing."""
        claims = [pair for index, pair in enumerate(self.claims) if index != claim]
        expressions = [e for index, e in enumerate(self.expressions) if index != expression]
        if len(claims) == 1 and not expressions:
            return claims[0][0], claims[0][1], None
        checks = [_equals(key, value) for key, value in claims]
        checks.extend(_condition(key, operator, values) for key, operator, values in expressions)
        return None, None, _all_of(checks)


class _Binding:
    __slots__ = (
        "alone",
        "bit",
        "decides",
        "deny",
        "expires_at",
        "name",
        "namespace_list",
        "namespaces",
        "role",
        "rules",
        "subjects",
    )

    def __init__(
        self, body: dict[str, Any], rules: dict[str, tuple[CompiledRule, ...]], bit: int
    ) -> None:
        self.name: str = body["name"]
        self.role: str = body["role"]
        self.deny = body["effect"] == "deny"
        expires = body.get("expiresAt")
        self.expires_at: float | None = float(expires) if expires is not None else None
        self.subjects = tuple(_Subject(s) for s in body["subjects"])
        namespaces = body.get("namespaces")
        self.namespaces = frozenset(namespaces) if namespaces is not None else None
        self.namespace_list = ", ".join(sorted(self.namespaces or ()))
        self.rules = rules  # the role's, by request family (shared by its bindings)
        # What a decision this binding decides alone says, written once per bundle.
        verb = "denied" if self.deny else "allowed"
        self.decides = f"{verb} by RoleBinding {self.name} (role {self.role})"
        self.alone: tuple[tuple[str, ...], tuple[str, ...]] = ((self.name,), (self.role,))
        self.bit = bit  # this binding in the engine's CandidateIndex

    def covers(self, request: Request, family: str) -> bool:
        if self.namespaces is not None and request.namespace not in self.namespaces:
            return False
        for rule in self.rules[family]:  # noqa: SIM110 (a loop: no generator per call on the hot path)
            if rule.matches(request):  # type: ignore[arg-type]
                return True
        return False

    def describe(self, request: Request, family: str, rank: int) -> str:
        """What this binding (which names the identity but does not cover the request)
        matched and what it missed, in words. ``rank``: 2 when a rule covers the request
        and only the namespace does not admit it, 1 when the namespace admits it (so no
        rule covers it), 0 when neither (``Engine._explain``)."""
        namespace_ok = rank == 1
        closest: list[str] | None = [] if rank == 2 else None
        if rank != 2:
            for rule in self.rules[family][:EXPLAIN_RULES]:
                missed = rule.explain(request)  # type: ignore[arg-type]
                if closest is None or len(missed) < len(closest):
                    closest = missed
        where = ""
        if not namespace_ok:
            assert self.namespaces is not None
            where = (
                f"{request.namespace} is not one of {self.namespace_list}"
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


_Entry = tuple[_Binding, str | None, str | None, "_Check | None"]
_is_deny = attrgetter("deny")
_bit = attrgetter("bit")
# (deny bindings, allow bindings, the deny bindings' bits, the allow bindings' bits)
_Found = tuple[tuple[_Binding, ...], tuple[_Binding, ...], int, int]
# how a service request's (host, namespace) reads: (host, namespace, ambiguous short host,
# both as given, the bits of the bindings with a service rule that may name the host)
_Read = tuple[str, str, bool, bool, int]


class Engine:
    """Immutable once built but for expiry (``_expire``, module docstring): a new bundle
    means a new Engine, swapped atomically."""

    MEMO_SIZE = 100_000

    def __init__(self, bundle: Mapping[str, Any], clock: Clock | None = None) -> None:
        """``clock``: bindings whose ``expiresAt`` it has reached stop matching (agents);
        None: every binding of the bundle counts (the gate, the diff)."""
        self._clock = clock
        # Building allocates many small objects and frees none: the cyclic collector
        # would walk the whole heap several times over for nothing (none of them form
        # cycles), which was half of the build. Paused for the build only.
        paused = gc.isenabled()
        gc.disable()
        try:
            self._build(bundle)
        finally:
            if paused:
                gc.enable()

    def _build(self, bundle: Mapping[str, Any]) -> None:
        self.cluster: str = bundle["cluster"]
        self.revision: int = int(bundle["revision"])
        self.registry_revision: int = int(bundle.get("registryRevision", 0))
        identities = bundle.get("identities") or {}
        # the bundle's own inventory, not a copy: at 100,000 identities a copy is 5 MB
        self.identities: dict[str, dict[str, Any]] = (
            identities if type(identities) is dict else dict(identities)
        )
        self.templates = TemplateIndex(
            CompiledTemplate.from_json(t) for t in bundle.get("templates") or ()
        )
        self._derived: dict[str, dict[str, Any] | None] = {}
        self._explicit_accounts: frozenset[tuple[str, str, str]] | None = None
        self.cluster_domain: str = bundle.get("clusterDomain") or DEFAULT_CLUSTER_DOMAIN
        self._domain_suffix = domain_suffix(self.cluster_domain)
        roles = bundle["roles"]
        compiled = {
            name: [compile_rule(self._canonical_rule(rule)) for rule in rules]
            for name, rules in roles.items()
        }
        by_family = {
            name: {family: tuple(r for r in rules if r.family == family) for family in _FAMILIES}
            for name, rules in compiled.items()
        }
        self.bindings = tuple(
            _Binding(b, by_family[b["role"]], 1 << i) for i, b in enumerate(bundle["bindings"])
        )
        self._role_rules = compiled  # in the bundle's order, for covering_rules
        role_bits: dict[str, int] = {}
        for binding in self.bindings:
            role_bits[binding.role] = role_bits.get(binding.role, 0) | binding.bit
        self._candidates = CandidateIndex(
            (bits, compiled[role]) for role, bits in role_bits.items()
        )
        self._name_services(compiled)
        # Each index entry is (binding, what is left to check of the subject indexed
        # there): a subject can only match identities that carry its index key, so only
        # that subject is checked, and not for the condition the key already holds.
        self._by_spiffe: dict[str, list[_Entry]] = {}
        self._by_claim: dict[tuple[str, str], list[_Entry]] = {}
        self._unindexed: list[_Entry] = []
        # subjects with a SPIFFE ID pattern, by its trust domain: checked in full
        self._by_pattern_domain: dict[str, list[tuple[_Binding, _Subject]]] = {}
        # people, by name: their bindings, in bundle order (never a workload's)
        self._by_user: dict[str, list[_Binding]] = {}
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
                if subject.user is not None:
                    people = self._by_user.setdefault(subject.user, [])
                    if binding not in people:
                        people.append(binding)
                    continue
                claim_keys.update(k for k, _ in subject.claims)
                claim_keys.update(e[0] for e in subject.expressions)
                if subject.pattern is not None:
                    domain = subject.pattern.trust_domain
                    self._by_pattern_domain.setdefault(domain, []).append((binding, subject))
                    continue
                buckets, residual = self._buckets_for(subject, frequency)
                for bucket in buckets:
                    bucket.append((binding, *residual))
        self._claim_keys = tuple(sorted(claim_keys))
        self._absent = (_ABSENT,) * len(self._claim_keys)
        self._index_keys = tuple(sorted({key for key, _ in self._by_claim}))
        self._memo: dict[str, tuple[tuple[Any, ...], _Found]] = {}
        self._user_memo: dict[str, _Found] = {}
        self._hosts: dict[tuple[str, str], _Read] = {}
        expiries = [b.expires_at for b in self.bindings if b.expires_at is not None]
        self._next_expiry = min(expiries) if expiries else math.inf
        # only then does a decision read the clock (module docstring)
        self._expiring = self._clock is not None and bool(expiries)
        self._expired = 0  # the bits of the bindings that have expired
        self._expiry_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._id_prefix = f"{secrets.token_hex(4)}-{self.revision}-"

    def identity(self, spiffe_id: str) -> dict[str, Any] | None:
        """The inventory entry (``workload``, ``claims``) of a registered SPIFFE ID: a
        Workload's from the bundle's ``identities``, else one a template of the bundle
        gives (read back into its cluster, namespace and service account, which no
        Workload selects; with ``template``). None for an ID neither holds."""
        entry = self.identities.get(spiffe_id)
        if entry is not None or not self.templates:
            return entry
        if spiffe_id in self._derived:
            return self._derived[spiffe_id]
        read = self.templates.read_back(spiffe_id)
        found = self._derived_entry(*read) if read is not None else None
        if len(self._derived) >= self.MEMO_SIZE:
            self._derived.clear()
        self._derived[spiffe_id] = found
        return found

    def account_identity(
        self, cluster: str, namespace: str, service_account: str
    ) -> tuple[str, dict[str, Any]] | None:
        """(SPIFFE ID, entry) a template gives this service account, when no Workload
        selects it; None otherwise (Workloads are in ``identities``)."""
        account = (cluster, namespace, service_account)
        template = self.templates.match(*account)
        entry = self._derived_entry(template, account) if template is not None else None
        return (template.spiffe_id(*account), entry) if template and entry else None

    def _derived_entry(
        self, template: CompiledTemplate, account: tuple[str, str, str]
    ) -> dict[str, Any] | None:
        if self._explicit_accounts is None:
            self._explicit_accounts = frozenset(
                (
                    str(e["claims"].get("cluster")),
                    str(e["claims"].get("namespace")),
                    str(e["claims"].get("service_account")),
                )
                for e in self.identities.values()
                if isinstance(e.get("claims"), dict)
            )
        if account in self._explicit_accounts:
            return None  # a Workload selects it: explicit wins
        return {
            "workload": template_workload_name(template.name, *account),
            "claims": template.claims_for(*account),
            "template": template.name,
        }

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
    ) -> tuple[list[list[_Entry]], _Residual]:
        """Index keys such that every identity the subject matches has one of them, and
        what is left to check of an identity found under them."""
        if subject.spiffe_id is not None:
            return [self._by_spiffe.setdefault(subject.spiffe_id, [])], subject.residual(None, None)
        # (keys, the claim or the In expression they stand for)
        options: list[tuple[list[tuple[str, str]], int | None, int | None]] = [
            ([claim], index, None) for index, claim in enumerate(subject.claims)
        ]
        options.extend(
            ([(key, value) for value in sorted(values)], None, index)
            for index, (key, operator, values) in enumerate(subject.expressions)
            if operator == "In"
        )
        if not options:
            return [self._unindexed], subject.residual(None, None)
        keys, claim, expression = min(
            options, key=lambda option: sum(frequency(k) for k in option[0])
        )
        return [self._by_claim.setdefault(k, []) for k in keys], subject.residual(claim, expression)

    def applicable(
        self, spiffe_id: str, claims: Mapping[str, Any]
    ) -> tuple[tuple[_Binding, ...], tuple[_Binding, ...]]:
        """(deny bindings, allow bindings) that name this identity, memoised."""
        denies, allows, _, _ = self._applicable(spiffe_id, claims)
        return denies, allows

    def _applicable(self, spiffe_id: str, claims: Mapping[str, Any]) -> _Found:
        """(deny bindings, allow bindings, their bits) of this identity. Remembered
        per SPIFFE ID with the values of the claims bindings name: an identity whose
        claims differ from the remembered ones is looked up again (and remembered
        instead). Compared with ``==``, so unhashable claim values are remembered too."""
        if self._expiring and self._clock() >= self._next_expiry:  # type: ignore[misc]
            self._expire()
        values = tuple(map(claims.get, self._claim_keys, self._absent))
        remembered = self._memo.get(spiffe_id)
        if remembered is not None and remembered[0] == values:
            return remembered[1]
        return self._remember(spiffe_id, claims, values)

    def _remember(
        self, spiffe_id: str, claims: Mapping[str, Any], values: tuple[Any, ...]
    ) -> _Found:
        memo = self._memo  # before the lookup: see _expire
        found = self._lookup(spiffe_id, claims)
        if len(memo) >= self.MEMO_SIZE:
            memo.clear()
        memo[spiffe_id] = (values, found)
        return found

    def _lookup(self, spiffe_id: str, claims: Mapping[str, Any]) -> _Found:
        buckets = [self._by_spiffe.get(spiffe_id), self._unindexed]
        by_claim = self._by_claim
        for claim_key in self._index_keys:
            value = claims.get(claim_key)
            if isinstance(value, str):
                buckets.append(by_claim.get((claim_key, value)))
        # In order of discovery (a binding already found stays where it was found).
        matched: dict[_Binding, None] = {}
        for bucket in buckets:
            if bucket:
                for binding, key, value, check in bucket:
                    if key is not None:
                        if claims.get(key) == value:
                            matched[binding] = None
                    elif check is None or check(claims):
                        matched[binding] = None
        if self._by_pattern_domain:
            for binding, subject in self._by_pattern_domain.get(trust_domain_of(spiffe_id), ()):
                if binding not in matched and subject.matches(spiffe_id, claims):
                    matched[binding] = None
        denies = tuple(filter(_is_deny, matched))
        allows = tuple(filterfalse(_is_deny, matched))
        return denies, allows, sum(map(_bit, denies)), sum(map(_bit, allows))

    @property
    def people(self) -> tuple[str, ...]:
        """The people ``user`` subjects name, sorted."""
        return tuple(sorted(self._by_user))

    @property
    def next_expiry(self) -> float | None:
        """When the next binding expires (epoch seconds), None when none will."""
        return None if self._next_expiry == math.inf else self._next_expiry

    def _expire(self) -> None:
        """Drop the bindings whose ``expiresAt`` the clock has reached: out of every
        index (new lists, so a decision iterating the old ones finishes undisturbed),
        then fresh memos (a lookup started before keeps writing into the old memo)."""
        assert self._clock is not None
        with self._expiry_lock:
            now = self._clock()
            if now < self._next_expiry:
                return  # another thread did it
            dead = 0
            upcoming = math.inf
            for binding in self.bindings:
                expires = binding.expires_at
                if expires is None:
                    continue
                if expires <= now:
                    dead |= binding.bit
                elif expires < upcoming:
                    upcoming = expires
            self._expired |= dead
            gone = self._expired

            def alive(entries: list[Any]) -> list[Any]:
                return [e for e in entries if not (e[0].bit if type(e) is tuple else e.bit) & gone]

            for index in (self._by_spiffe, self._by_claim, self._by_user):
                for key in list(index):
                    index[key] = alive(index[key])  # type: ignore[index]
            for domain in list(self._by_pattern_domain):
                self._by_pattern_domain[domain] = alive(self._by_pattern_domain[domain])
            self._unindexed = alive(self._unindexed)
            self._next_expiry = upcoming
            self._expiring = upcoming != math.inf
            self._memo = {}
            self._user_memo = {}

    def expired(self, name: str) -> bool:
        """Whether the binding ``name`` has expired (by this engine's clock)."""
        if self._expiring and self._clock() >= self._next_expiry:  # type: ignore[misc]
            self._expire()
        return any(b.name == name and b.bit & self._expired for b in self.bindings)

    def applicable_user(self, name: str) -> tuple[tuple[_Binding, ...], tuple[_Binding, ...]]:
        """(deny bindings, allow bindings) that name the person ``name``."""
        denies, allows, _, _ = self._user_found(name)
        return denies, allows

    def _user_found(self, name: str) -> _Found:
        if self._expiring and self._clock() >= self._next_expiry:  # type: ignore[misc]
            self._expire()
        memo = self._user_memo
        found = memo.get(name)
        if found is None:
            matched = self._by_user.get(name, ())
            denies = tuple(filter(_is_deny, matched))
            allows = tuple(filterfalse(_is_deny, matched))
            found = (denies, allows, sum(map(_bit, denies)), sum(map(_bit, allows)))
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            memo[name] = found
        return found

    def decide_user(self, name: str, request: Request) -> Decision:
        """The decision for the person ``name`` (the Kubernetes username ``user:NAME``):
        the bindings with a ``user: name`` subject only, never a workload subject."""
        return self._decide_found(self._user_found(name), request)

    def decide_reading_user(self, name: str, request: Request) -> Decision:
        """:meth:`decide_reading` for a person (the effective diff's probes)."""
        family = family_of(request)
        found = self._user_found(name)
        return self._decide_one(found, request, family, self._candidates.of(request, family))

    def covering_rules(self, binding: str, request: Request) -> list[int]:
        """The positions, in its role's rules in the bundle, of the rules of the binding
        named ``binding`` that cover ``request`` (as :meth:`resolve` reads it; the
        binding's namespaces aside) — what "explain this decision" shows
        (``policy/explain.py``). Empty for a binding the bundle does not have."""
        found = next((b for b in self.bindings if b.name == binding), None)
        if found is None:
            return []
        request = self.resolve(request)
        family = family_of(request)
        return [
            i
            for i, rule in enumerate(self._role_rules[found.role])
            if rule.family == family and rule.matches(request)  # type: ignore[arg-type]
        ]

    def resolve(self, request: Request) -> Request:
        """The request as this cluster reads it (module docstring): the cluster domain
        removed from a service host, a short host expanded in a known namespace, the
        namespace taken from a service host. An ambiguous short host (no namespace)
        stays as it is: :meth:`decide` evaluates its readings."""
        if type(request) is not ServiceRequest:
            return request
        return self._resolve_service(request)

    def _resolve_service(self, request: ServiceRequest) -> ServiceRequest:
        return self._read_service(request)[0]

    def _read_service(self, request: ServiceRequest) -> tuple[ServiceRequest, bool]:
        """(the request as this cluster reads it, whether its host is an ambiguous short
        host to decide under every reading)."""
        host, namespace = request.host, request.namespace
        read = self._hosts.get((host, namespace)) or self._read_host(host, namespace)
        if read[3]:
            return request, read[2]
        return ServiceRequest(read[0], request.path, request.method, read[1]), read[2]

    def _read_host(self, host: str, namespace: str) -> _Read:
        """How a (host, namespace) reads: a pure function of the two and of the bundle,
        remembered (bounded) like the identities."""
        key = (host, namespace)
        if host.endswith(self._domain_suffix):
            host = strip_cluster_domain(host, self._domain_suffix)
        host, namespace = service_host(host, namespace)
        ambiguous = not namespace and is_short(host)
        unchanged = (host, namespace) == key
        read = (host, namespace, ambiguous, unchanged, self._candidates.host(host))
        if len(self._hosts) >= self.MEMO_SIZE:
            self._hosts.clear()
        self._hosts[key] = read
        return read

    def decide(self, spiffe_id: str, claims: Mapping[str, Any], request: Request) -> Decision:
        if self._expiring and self._clock() >= self._next_expiry:  # type: ignore[misc]
            self._expire()
        # _applicable, inlined for an identity already seen
        values = tuple(map(claims.get, self._claim_keys, self._absent))
        remembered = self._memo.get(spiffe_id)
        if remembered is not None and remembered[0] == values:
            found = remembered[1]
        else:
            found = self._remember(spiffe_id, claims, values)
        # _decide_found, inlined (the hot path: one call less)
        kind = type(request)
        candidates = self._candidates
        if kind is ServiceRequest:
            # _read_service and CandidateIndex.service, inlined
            host, namespace = request.host, request.namespace  # type: ignore[union-attr]
            read = self._hosts.get((host, namespace)) or self._read_host(host, namespace)
            if not read[3]:
                request = ServiceRequest(read[0], request.path, request.method, read[1])  # type: ignore[union-attr]
            if read[2]:
                return self._decide_readings(found[0], found[1], request)  # type: ignore[arg-type]
            methods = candidates.methods.get(request.method, candidates.any_method)  # type: ignore[union-attr]
            return self._decide_one(found, request, "service", methods & read[4])
        if kind is KubernetesRequest:
            return self._decide_one(
                found,
                request,
                "resource",
                candidates.resource(request),  # type: ignore[arg-type]
            )
        family = family_of(request)
        return self._decide_one(found, request, family, candidates.of(request, family))

    def _decide_found(self, found: _Found, request: Request) -> Decision:
        """The decision on ``request`` over the bindings ``found`` for one subject
        (:meth:`decide` inlines it)."""
        kind = type(request)
        candidates = self._candidates
        if kind is ServiceRequest:
            # _read_service and CandidateIndex.service, inlined
            host, namespace = request.host, request.namespace  # type: ignore[union-attr]
            read = self._hosts.get((host, namespace)) or self._read_host(host, namespace)
            if not read[3]:
                request = ServiceRequest(read[0], request.path, request.method, read[1])  # type: ignore[union-attr]
            if read[2]:
                return self._decide_readings(found[0], found[1], request)  # type: ignore[arg-type]
            methods = candidates.methods.get(request.method, candidates.any_method)  # type: ignore[union-attr]
            return self._decide_one(found, request, "service", methods & read[4])
        if kind is KubernetesRequest:
            return self._decide_one(
                found,
                request,
                "resource",
                candidates.resource(request),  # type: ignore[arg-type]
            )
        family = family_of(request)
        return self._decide_one(found, request, family, candidates.of(request, family))

    def decide_reading(
        self, spiffe_id: str, claims: Mapping[str, Any], request: Request
    ) -> Decision:
        """The decision on ``request`` exactly as given, one reading, nothing resolved
        (the effective diff probes rules with it: ``policy/diff.py``)."""
        found = self._applicable(spiffe_id, claims)
        family = family_of(request)
        return self._decide_one(found, request, family, self._candidates.of(request, family))

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
        self, found: _Found, request: Request, family: str, candidates: int
    ) -> Decision:
        """``_match``, over only the identity's bindings that may cover the request
        (``candidates`` from the CandidateIndex, ANDed with the identity's bits)."""
        denies, allows, deny_bits, allow_bits = found
        hits = candidates & deny_bits
        if hits:
            matched = self._covering(hits, denies, request, family)
            if matched is not None:
                return self._decided(False, True, matched)
        hits = candidates & allow_bits
        if hits:
            matched = self._covering(hits, allows, request, family)
            if matched is not None:
                return self._decided(True, False, matched)
        decision = Decision(
            False, False, DEFAULT_DENY, (), (), self.revision, f"{self._id_prefix}{next(self._ids)}"
        )
        decision._explain = partial(self._explain, allows, request, family, hits)
        return decision

    def _covering(
        self, hits: int, ordered: tuple[_Binding, ...], request: Request, family: str
    ) -> list[_Binding] | None:
        """The bindings among ``hits`` (bits) that cover the request, in the order of
        ``ordered`` (the identity's), or None."""
        bindings = self.bindings
        namespace = request.namespace
        matched: list[_Binding] | None = None
        while hits:
            at = hits.bit_length() - 1
            hits ^= 1 << at
            binding = bindings[at]
            namespaces = binding.namespaces
            if namespaces is not None and namespace not in namespaces:
                continue
            for rule in binding.rules[family]:
                if rule.matches(request):  # type: ignore[arg-type]
                    if matched is None:
                        matched = [binding]
                    else:
                        matched.append(binding)
                    break
        if matched is not None and len(matched) > 1:
            matched.sort(key=ordered.index)
        return matched

    def _decided(self, allowed: bool, denied: bool, matched: list[_Binding]) -> Decision:
        first = matched[0]
        if len(matched) == 1:
            names, roles = first.alone
        else:
            names = tuple(b.name for b in matched)
            roles = tuple(dict.fromkeys(b.role for b in matched))
        return Decision(
            allowed,
            denied,
            first.decides,
            names,
            roles,
            self.revision,
            f"{self._id_prefix}{next(self._ids)}",
        )

    def _decide_readings(
        self, denies: tuple[_Binding, ...], allows: tuple[_Binding, ...], request: ServiceRequest
    ) -> Decision:
        """An ambiguous short host: allowed only under every reading, an explicit deny
        under any reading wins (DESIGN §3)."""
        read = readings(
            request.host, self._by_service, self._wildcard_namespaces, self._any_service
        )
        if len(read) == 1:
            found = (denies, allows, sum(b.bit for b in denies), sum(b.bit for b in allows))
            return self._decide_one(found, request, "service", self._candidates.service(request))
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
    def _explain(
        allows: tuple[_Binding, ...], request: Request, family: str, hits: int | None = None
    ) -> str:
        """Why a default deny: the first allow binding of the nearest kind — only its
        namespace failed (rank 2), else its namespace held (rank 1), else neither (0)
        — and, in words, what its closest rule missed. Bounded: at most
        EXPLAIN_BINDINGS bindings and EXPLAIN_RULES rules each, and the sentence is
        written for one binding. ``hits``: the bits of the allow bindings that may
        cover the request (CandidateIndex); only they can be of rank 2. None: any."""
        if not allows:
            return "; no allow RoleBinding names this identity"
        namespace = request.namespace
        considered = allows[:EXPLAIN_BINDINGS]
        if hits != 0:  # the first binding of rank 2, in the identity's order
            for binding in considered:
                if hits is not None and not binding.bit & hits:
                    continue
                namespaces = binding.namespaces
                if namespaces is None or namespace in namespaces:
                    continue
                for rule in binding.rules[family][:EXPLAIN_RULES]:
                    if rule.matches(request):  # type: ignore[arg-type]
                        return f"; nearest: {binding.describe(request, family, 2)}"
        for binding in considered:
            namespaces = binding.namespaces
            if namespaces is None or namespace in namespaces:
                return f"; nearest: {binding.describe(request, family, 1)}"
        return f"; nearest: {allows[0].describe(request, family, 0)}"

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
