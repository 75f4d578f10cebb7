"""``WorkloadTemplate`` (DESIGN §11): one manifest giving identities to every service
account it matches, and the pure functions both the control plane and the agents use
on it — matching a canonical (cluster, namespace, service account), deriving the
SPIFFE ID and claims, reading a derived SPIFFE ID back into its (cluster, namespace,
service account), and deciding whether two templates can match one service account.

Rules (docs/manifests.md "WorkloadTemplate"):

* ``namespaces`` are names or globs, ``serviceAccounts`` globs; a glob's only wildcard
  is ``*`` (any run of characters, none included).
* ``spiffeIdTemplate`` holds ``{cluster}``, ``{namespace}`` and ``{serviceAccount}``,
  each exactly once and each a whole path segment, so every derived SPIFFE ID reads
  back into exactly one (cluster, namespace, service account): that is how an agent
  finds the claims of an X.509-SVID's identity.
* ``claims`` values may use the same placeholders anywhere.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.common.errors import SpiffeIdError
from trustmesh.spiffeid import parse_spiffe_id

from ._policy_kinds import ClusterScope, build_cluster_scope

PLACEHOLDERS = {
    "cluster": "{cluster}",
    "namespace": "{namespace}",
    "serviceAccount": "{serviceAccount}",
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_GLOB_NAME = re.compile(r"^[a-z0-9*]([-a-z0-9.*]*[a-z0-9*])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def canonical_account(namespace: str, sa: str) -> bool:
    """Whether a namespace and service-account name are spelled as Kubernetes spells
    them (a DNS-1123 label, a DNS-1123 subdomain): only such names are matched against
    templates' globs and put into SPIFFE IDs; anything else matches no template."""
    return (
        len(namespace) <= 63
        and len(sa) <= 253
        and DNS_LABEL.match(namespace) is not None
        and DNS_SUBDOMAIN.match(sa) is not None
    )


DEFAULT_SPIFFE_ID_TEMPLATE = "/cluster/{cluster}/ns/{namespace}/sa/{serviceAccount}"
"""The path of the default SPIFFE ID (DESIGN §2), with the placeholders."""


def glob_value(value: str) -> None:
    """A name or a ``*`` glob of lowercase letters, digits, ``-`` and ``.``."""
    if len(value) > 253 or not _GLOB_NAME.match(value) or "**" in value:
        raise ValueError(
            f"{value!r} is not a name or glob: use lowercase letters, digits, '-', '.' and "
            "'*' (any run of characters), starting and ending with a letter, digit or '*'"
        )


def placeholders_of(text: str) -> list[str]:
    """The placeholders of ``text``; ValueError for an unknown one or a stray brace."""
    found = _PLACEHOLDER.findall(text)
    for name in found:
        if name not in PLACEHOLDERS:
            known = ", ".join(PLACEHOLDERS.values())
            raise ValueError(f"{text!r}: unknown placeholder {{{name}}}; known: {known}")
    if "{" in _PLACEHOLDER.sub("", text) or "}" in _PLACEHOLDER.sub("", text):
        raise ValueError(f"{text!r}: a brace outside a placeholder ({{cluster}}, ...)")
    return found


def render(text: str, cluster: str, namespace: str, service_account: str) -> str:
    values = {"cluster": cluster, "namespace": namespace, "serviceAccount": service_account}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def spiffe_id_template(value: str) -> None:
    """A SPIFFE ID once rendered, each placeholder exactly once, each a whole segment."""
    if not value.startswith("spiffe://"):
        raise ValueError(f"spiffeIdTemplate {value!r} must start with spiffe://")
    found = placeholders_of(value)
    domain, _, path = value[len("spiffe://") :].partition("/")
    if "{" in domain:
        raise ValueError(f"spiffeIdTemplate {value!r}: the trust domain takes no placeholder")
    for name in PLACEHOLDERS:
        if found.count(name) != 1:
            raise ValueError(
                f"spiffeIdTemplate {value!r} must hold {{{name}}} exactly once, so that each "
                "service account gets its own SPIFFE ID"
            )
    for segment in path.split("/"):
        if "{" in segment and _PLACEHOLDER.fullmatch(segment) is None:
            raise ValueError(
                f"spiffeIdTemplate {value!r}: a placeholder must be a whole path segment "
                f"(/{{namespace}}/), not part of {segment!r}"
            )
    try:
        parse_spiffe_id(render(value, "c", "n", "s"))
    except SpiffeIdError as exc:
        raise ValueError(
            f"spiffeIdTemplate {value!r} does not give a valid SPIFFE ID: {exc.description}"
        ) from None


def claim_template(value: str) -> None:
    placeholders_of(value)


# --- globs ---------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in pattern))


def globs_overlap(a: str, b: str) -> str | None:
    """A string both ``*`` globs match (the shortest the search finds), or None when no
    string matches both. Exact: a breadth-first walk of the pair of positions."""
    start = (0, 0)
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        i, j = state = queue.popleft()
        if i == len(a) and j == len(b):
            out: list[str] = []
            step = parent[state]
            while step is not None:
                previous, char = step
                out.append(char)
                step = parent[previous]
            return "".join(reversed(out))
        moves: list[tuple[tuple[int, int], str]] = []
        star_a = i < len(a) and a[i] == "*"
        star_b = j < len(b) and b[j] == "*"
        if star_a:
            moves.append(((i + 1, j), ""))
        if star_b:
            moves.append(((i, j + 1), ""))
        if i < len(a) and j < len(b):
            if not star_a and not star_b and a[i] == b[j]:
                moves.append(((i + 1, j + 1), a[i]))
            elif star_a and not star_b:
                moves.append(((i, j + 1), b[j]))
            elif star_b and not star_a:
                moves.append(((i + 1, j), a[i]))
        for nxt, char in moves:
            if nxt not in parent:
                parent[nxt] = (state, char)
                queue.append(nxt)
    return None


# --- the spec ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadTemplateSpec:
    clusters: ClusterScope
    namespaces: tuple[str, ...]
    service_accounts: tuple[str, ...]
    spiffe_id_template: str | None
    """None: the default SPIFFE ID, ``spiffe://<trust domain>/cluster/{cluster}/...``."""
    claims: dict[str, str]
    max_token_ttl: int | None


def build_workload_template(spec: dict[str, Any]) -> WorkloadTemplateSpec:
    return WorkloadTemplateSpec(
        clusters=build_cluster_scope(spec["clusters"]),
        namespaces=tuple(spec["namespaces"]),
        service_accounts=tuple(spec["serviceAccounts"]),
        spiffe_id_template=spec.get("spiffeIdTemplate"),
        claims=dict(spec["claims"]),
        max_token_ttl=spec.get("maxTokenTTL"),
    )


# --- compiled: what the registry and the agents' bundles hold -----------------------


def template_workload_name(template: str, cluster: str, namespace: str, sa: str) -> str:
    """The workload name of a template-derived identity (audit ``workload``, revocation
    and suspension by workload): never a Workload's name, which has no ``/``."""
    return f"{template}/{cluster}/{namespace}/{sa}"


@dataclass(frozen=True)
class CompiledTemplate:
    """A template as it applies: its clusters resolved to the registered names it
    selects, and its SPIFFE ID template with the trust domain filled in."""

    name: str
    clusters: frozenset[str]
    namespaces: tuple[str, ...]
    service_accounts: tuple[str, ...]
    spiffe_id_template: str
    claims: Mapping[str, str]
    max_token_ttl: int | None

    _ns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _sa: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    prefix: str = field(init=False, repr=False, compare=False)
    """``spiffe://<trust domain>/``"""
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The path's segments, placeholders as written (``{namespace}``)."""

    def __post_init__(self) -> None:
        domain, _, path = self.spiffe_id_template[len("spiffe://") :].partition("/")
        derived = {
            "_ns": tuple(glob_regex(g) for g in self.namespaces),
            "_sa": tuple(glob_regex(g) for g in self.service_accounts),
            "prefix": f"spiffe://{domain}/",
            "segments": tuple(path.split("/")),
        }
        for name, value in derived.items():  # frozen: set once, here
            object.__setattr__(self, name, value)

    def matches(self, cluster: str, namespace: str, sa: str) -> bool:
        return (
            cluster in self.clusters
            and any(r.fullmatch(namespace) for r in self._ns)
            and any(r.fullmatch(sa) for r in self._sa)
        )

    def spiffe_id(self, cluster: str, namespace: str, sa: str) -> str:
        return render(self.spiffe_id_template, cluster, namespace, sa)

    def claims_for(self, cluster: str, namespace: str, sa: str) -> dict[str, str]:
        """The claims a token of this identity carries (as the exchange mints them)."""
        claims = {k: render(v, cluster, namespace, sa) for k, v in self.claims.items()}
        claims.setdefault("workload_id", template_workload_name(self.name, cluster, namespace, sa))
        return {
            **dict(sorted(claims.items())),
            "cluster": cluster,
            "namespace": namespace,
            "service_account": sa,
        }

    def parse(self, spiffe_id: str) -> tuple[str, str, str] | None:
        """The (cluster, namespace, service account) ``spiffe_id`` spells in this
        template's shape, whether or not the template matches it."""
        prefix = self.prefix
        if not spiffe_id.startswith(prefix):
            return None
        parts = spiffe_id[len(prefix) :].split("/")
        if len(parts) != len(self.segments):
            return None
        values: dict[str, str] = {}
        for segment, part in zip(self.segments, parts, strict=True):
            placeholder = _PLACEHOLDER.fullmatch(segment)
            if placeholder is not None:
                values[placeholder.group(1)] = part
            elif segment != part:
                return None
        return (values["cluster"], values["namespace"], values["serviceAccount"])

    def read_back(self, spiffe_id: str) -> tuple[str, str, str] | None:
        """The (cluster, namespace, service account) this template would give
        ``spiffe_id`` to, or None; the template must still match it."""
        found = self.parse(spiffe_id)
        if found is None or not canonical_account(found[1], found[2]):
            return None
        return found if self.matches(*found) else None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "clusters": sorted(self.clusters),
            "namespaces": list(self.namespaces),
            "serviceAccounts": list(self.service_accounts),
            "spiffeIdTemplate": self.spiffe_id_template,
            "claims": dict(self.claims),
        }
        if self.max_token_ttl is not None:
            body["maxTokenTTL"] = self.max_token_ttl
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CompiledTemplate:
        return cls(
            name=str(body["name"]),
            clusters=frozenset(body["clusters"]),
            namespaces=tuple(body["namespaces"]),
            service_accounts=tuple(body["serviceAccounts"]),
            spiffe_id_template=str(body["spiffeIdTemplate"]),
            claims=dict(body.get("claims") or {}),
            max_token_ttl=body.get("maxTokenTTL"),
        )


def compile_template(
    name: str, spec: WorkloadTemplateSpec, trust_domain: str, clusters: Iterable[str]
) -> CompiledTemplate:
    template = spec.spiffe_id_template or f"spiffe://{trust_domain}{DEFAULT_SPIFFE_ID_TEMPLATE}"
    return CompiledTemplate(
        name=name,
        clusters=frozenset(clusters),
        namespaces=spec.namespaces,
        service_accounts=spec.service_accounts,
        spiffe_id_template=template,
        claims=dict(spec.claims),
        max_token_ttl=spec.max_token_ttl,
    )


def _any_overlap(a: Sequence[str], b: Sequence[str]) -> str | None:
    for x in a:
        for y in b:
            if "*" not in x and "*" not in y:
                if x == y:
                    return x
                continue
            found = globs_overlap(x, y)
            if found is not None:
                return found
    return None


def templates_overlap(a: CompiledTemplate, b: CompiledTemplate) -> tuple[str, str, str] | None:
    """A (cluster, namespace, service account) both templates match, or None when no
    service account can match both (exact over the registered clusters and the globs'
    characters; a witness may be a name Kubernetes would not allow)."""
    common = sorted(a.clusters & b.clusters)
    if not common:
        return None
    namespace = _any_overlap(a.namespaces, b.namespaces)
    if namespace is None:
        return None
    sa = _any_overlap(a.service_accounts, b.service_accounts)
    return None if sa is None else (common[0], namespace, sa)


def _value_sets_meet(a: CompiledTemplate, pa: str, b: CompiledTemplate, pb: str) -> bool:
    """Whether placeholder ``pa`` of ``a`` and ``pb`` of ``b`` can take one value."""

    def values(t: CompiledTemplate, p: str) -> tuple[str, ...]:
        if p == "cluster":
            return tuple(sorted(t.clusters))
        return t.namespaces if p == "namespace" else t.service_accounts

    return _any_overlap(values(a, pa), values(b, pb)) is not None


def _literal_fits(t: CompiledTemplate, placeholder: str, literal: str) -> bool:
    if placeholder == "cluster":
        return literal in t.clusters
    globs = t.namespaces if placeholder == "namespace" else t.service_accounts
    return any(glob_regex(g).fullmatch(literal) for g in globs)


def spiffe_ids_can_meet(a: CompiledTemplate, b: CompiledTemplate) -> bool:
    """Whether the two templates can give one SPIFFE ID to two different service
    accounts: their SPIFFE ID templates unify, segment by segment, with a placeholder
    in a different place (the same shape gives one ID only to one service account,
    which ``templates_overlap`` already refuses)."""
    if (
        a.spiffe_id_template.partition("/")[2].partition("/")[0]
        != (b.spiffe_id_template.partition("/")[2].partition("/")[0])
    ):
        return False
    if len(a.segments) != len(b.segments) or a.segments == b.segments:
        return False
    for x, y in zip(a.segments, b.segments, strict=True):
        px, py = _PLACEHOLDER.fullmatch(x), _PLACEHOLDER.fullmatch(y)
        if px is None and py is None:
            if x != y:
                return False
        elif px is not None and py is not None:
            if not _value_sets_meet(a, px.group(1), b, py.group(1)):
                return False
        elif px is not None:
            if not _literal_fits(a, px.group(1), y):
                return False
        elif py is not None and not _literal_fits(b, py.group(1), x):
            return False
    return True


class TemplateIndex:
    """Templates indexed for lookups at scale: the one template matching a (cluster,
    namespace, service account) — by exact namespace first, then those with a glob —
    and a SPIFFE ID read back once per distinct SPIFFE ID template shape. Templates an
    apply accepted never overlap, so at most one matches."""

    def __init__(self, templates: Iterable[CompiledTemplate]) -> None:
        self.templates = tuple(templates)
        self._by_namespace: dict[str, list[CompiledTemplate]] = {}
        self._globbed: list[CompiledTemplate] = []
        shapes: dict[tuple[str, tuple[str, ...]], CompiledTemplate] = {}
        for template in self.templates:
            if any("*" in n for n in template.namespaces):
                self._globbed.append(template)
            else:
                for namespace in template.namespaces:
                    self._by_namespace.setdefault(namespace, []).append(template)
            shapes.setdefault((template.prefix, template.segments), template)
        self._shapes = tuple(shapes.values())  # one template stands for its shape

    def __bool__(self) -> bool:
        return bool(self.templates)

    def match(self, cluster: str, namespace: str, sa: str) -> CompiledTemplate | None:
        if not canonical_account(namespace, sa):
            return None
        for template in self._by_namespace.get(namespace, ()):
            if template.matches(cluster, namespace, sa):
                return template
        for template in self._globbed:
            if template.matches(cluster, namespace, sa):
                return template
        return None

    def read_back(self, spiffe_id: str) -> tuple[CompiledTemplate, tuple[str, str, str]] | None:
        """The template that gives ``spiffe_id`` and to which service account."""
        for shape in self._shapes:
            account = shape.parse(spiffe_id)
            if account is None:
                continue
            template = self.match(*account)
            if (
                template is not None
                and template.segments == shape.segments
                and template.prefix == shape.prefix
            ):
                return template, account
        return None
