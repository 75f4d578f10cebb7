"""A generated federation for ``trustmesh bench engine``: clusters, workloads, global
roles, role bindings and authorization requests, deterministic from a seed.

Everything is built as manifest bodies and loaded through the real path
(``document_from_body`` → ``build_registry`` → ``PolicySet.from_documents``), so the
benchmark measures the policy the control plane would compile, not a shortcut.

Path globs are generated with at most one ``**`` segment (the manifest schema allows
more); the Cedar translation is exact for that shape (see ``_cedar``)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.manifests import API_VERSION, Document, document_from_body
from trustmesh.policy.compiler import PolicySet, identity_claims
from trustmesh.policy.engine import Engine
from trustmesh.registry import Registry, build_registry
from trustmesh.request import Request, parse_request

TRUST_DOMAIN = "bench.example"

ENVIRONMENTS = ("prod", "staging", "dev")
REGIONS = ("eu-west", "us-east", "us-west", "ap-south")
TIERS = ("gold", "silver", "bronze")
TEAMS = ("core", "edge", "data", "ml")
API_GROUPS = ("", "apps", "batch", "networking.k8s.io", "rbac.authorization.k8s.io")
RESOURCES = (
    "pods",
    "deployments",
    "services",
    "configmaps",
    "secrets",
    "jobs",
    "cronjobs",
    "ingresses",
    "statefulsets",
    "roles",
)
SUBRESOURCES = ("log", "exec", "scale", "status", "portforward")
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RARE_VERBS = ("escalate", "bind", "impersonate")
NON_RESOURCE_URLS = ("/healthz", "/livez", "/readyz", "/metrics", "/version", "/openapi/v2")
NON_RESOURCE_PREFIXES = ("/api/*", "/apis/*", "/logs/*", "/debug/*", "/metrics/*")
SERVICES = ("orders", "billing", "search", "users", "inventory", "ledger", "auth", "reports")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
WORDS = ("v1", "v2", "items", "orders", "admin", "status", "history", "export", "users", "x1")


@dataclass(frozen=True)
class Sizes:
    clusters: int = 50
    workloads: int = 10_000
    projects: int = 100
    roles: int = 500
    bindings: int = 2_000
    template_identities: int = 0
    """Identities WorkloadTemplates give, beside the ``workloads`` explicit ones (one
    template per project and environment; namespace ``<project>-tpl``)."""

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


SCALE = Sizes(clusters=500, workloads=100_000, projects=1_000, roles=1_000, bindings=5_000)
"""``trustmesh bench scale`` (issue 11): ten times the workloads, 2.5 times the bindings
and ten times the clusters of the default; projects and roles grow with them (100
workloads a project, as in the default)."""


@dataclass(frozen=True)
class Identity:
    workload: str
    spiffe_id: str
    claims: dict[str, str]
    cluster: str


@dataclass(frozen=True)
class BenchRequest:
    """One authorization question: who asks, on which cluster's agent, what."""

    identity: Identity
    cluster: str
    request: Request
    family: str
    origin: str  # how the generator made it: allow-rule, deny-rule, near-miss, random


@dataclass
class World:
    documents: list[Document]
    registry: Registry
    policy: PolicySet
    identities: list[Identity]
    role_rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    binding_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cluster_labels(self, name: str) -> dict[str, str]:
        return dict(self.registry.clusters[name].labels)


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _project(i: int) -> str:
    return f"p{i:03d}"


def _sample(rng: random.Random, values: Sequence[str], low: int, high: int) -> list[str]:
    return rng.sample(list(values), rng.randint(low, min(high, len(values))))


# --- manifests ---------------------------------------------------------------------------


def _resource_rule(rng: random.Random, guard: bool) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    rule["apiGroups"] = ["*"] if rng.random() < 0.1 else _sample(rng, API_GROUPS, 1, 2)
    roll = rng.random()
    if guard:
        rule["resources"] = rng.choice(
            (["secrets"], ["pods/exec"], ["*/exec", "pods/portforward"], ["roles"], ["*/scale"])
        )
    elif roll < 0.08:
        rule["resources"] = ["*"]
    else:
        resources = _sample(rng, RESOURCES, 1, 3)
        if rng.random() < 0.3:
            resources.append(rng.choice(RESOURCES) + "/" + rng.choice(SUBRESOURCES))
        if rng.random() < 0.15:
            resources.append("*/" + rng.choice(SUBRESOURCES))
        rule["resources"] = resources
    if guard:
        rule["verbs"] = _sample(rng, ("get", "list", "create", "delete", "*"), 1, 2)
    else:
        rule["verbs"] = ["*"] if rng.random() < 0.12 else _sample(rng, VERBS, 1, 4)
        if rng.random() < 0.03:
            rule["verbs"].append(rng.choice(RARE_VERBS))
    if rng.random() < 0.15:
        rule["resourceNames"] = [f"obj-{rng.randrange(20)}" for _ in range(rng.randint(1, 3))]
    return rule


def _non_resource_rule(rng: random.Random) -> dict[str, Any]:
    urls = _sample(rng, NON_RESOURCE_URLS, 0, 2) + _sample(rng, NON_RESOURCE_PREFIXES, 0, 2)
    if not urls or rng.random() < 0.03:
        urls.append("*" if rng.random() < 0.5 else rng.choice(NON_RESOURCE_URLS))
    verbs = rng.choice((["get"], ["get", "post"], ["*"], ["get", "head"]))
    return {"nonResourceURLs": urls, "verbs": verbs}


def _path_glob(rng: random.Random) -> str:
    """A glob of 1-4 segments, at most one ``**``, some ``*`` and ``v*``-style segments."""
    if rng.random() < 0.03:
        return rng.choice(("*", "/**"))
    segments = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    for i in range(len(segments)):
        roll = rng.random()
        if roll < 0.2:
            segments[i] = "*"
        elif roll < 0.27:
            segments[i] = segments[i][0] + "*"
    roll = rng.random()
    if roll < 0.3:
        segments.append("**")
    elif roll < 0.4 and len(segments) > 1:
        segments.insert(rng.randrange(1, len(segments)), "**")
    return "/" + "/".join(segments)


def _service_rule(rng: random.Random, projects: int, guard: bool) -> dict[str, Any]:
    hosts = []
    for _ in range(rng.randint(1, 2)):
        roll = rng.random()
        project = _project(rng.randrange(projects))
        if roll < 0.03:
            hosts.append("*")
        elif roll < 0.3:
            hosts.append(f"*.{project}.svc")
        else:
            hosts.append(f"{rng.choice(SERVICES)}.{project}.svc")
    if guard:
        paths = [rng.choice(("/admin/**", "/**/export", "/v1/admin/*", "/*/users/**"))]
        methods = rng.choice((["DELETE"], ["*"], ["PUT", "PATCH"], ["POST"]))
    else:
        paths = [_path_glob(rng) for _ in range(rng.randint(1, 3))]
        methods = ["*"] if rng.random() < 0.1 else _sample(rng, METHODS[:5], 1, 3)
    return {"services": hosts, "paths": paths, "methods": methods}


def _role(rng: random.Random, projects: int, guard: bool) -> dict[str, Any]:
    rules = []
    for _ in range(rng.randint(1, 2) if guard else rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.45:
            rules.append(_resource_rule(rng, guard))
        elif roll < 0.6:
            rules.append(_non_resource_rule(rng))
        else:
            rules.append(_service_rule(rng, projects, guard))
    return {"rules": rules}


def _expression(rng: random.Random, projects: int) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.35:
        return {"key": "tier", "operator": "NotIn", "values": _sample(rng, TIERS, 1, 2)}
    if roll < 0.6:
        values = [_project(rng.randrange(projects)) for _ in range(3)]
        return {"key": "project", "operator": "In", "values": sorted(set(values))}
    if roll < 0.75:
        return {"key": "environment", "operator": "NotIn", "values": ["prod"]}
    if roll < 0.9:
        return {"key": "team", "operator": "Exists", "values": []}
    return {"key": "team", "operator": "DoesNotExist", "values": []}


def _subject(rng: random.Random, sizes: Sizes, workloads: list[dict[str, Any]]) -> dict[str, Any]:
    roll = rng.random()
    project = _project(rng.randrange(sizes.projects))
    if roll < 0.32:
        return {"claims": {"project": project}}
    if roll < 0.5:
        return {"claims": {"project": project, "tier": rng.choice(TIERS)}}
    if roll < 0.62:
        return {"workload": rng.choice(workloads)["metadata"]["name"]}
    if roll < 0.72:
        values = sorted({project, *(_project(rng.randrange(sizes.projects)) for _ in range(3))})
        return {
            "claims": {"environment": rng.choice(ENVIRONMENTS)},
            "matchExpressions": [{"key": "project", "operator": "In", "values": values}],
        }
    if roll < 0.87:
        return {
            "claims": {"project": project},
            "matchExpressions": [_expression(rng, sizes.projects)],
        }
    if roll < 0.92:
        w = rng.choice(workloads)["spec"]["selector"]
        spiffe = f"spiffe://{TRUST_DOMAIN}/cluster/{w['cluster']}/ns/{w['namespace']}/sa/{w['serviceAccount']}"
        return {"spiffeId": spiffe}
    return {
        "matchExpressions": [
            {"key": "project", "operator": "In", "values": [project]},
            _expression(rng, sizes.projects),
        ]
    }


def _cluster_scope(rng: random.Random, clusters: list[str]) -> dict[str, Any] | None:
    roll = rng.random()
    if roll < 0.4:
        return None
    if roll < 0.65:
        return {"names": rng.sample(clusters, rng.randint(1, min(5, len(clusters))))}
    if roll < 0.85:
        return {"selector": {"matchLabels": {"environment": rng.choice(ENVIRONMENTS)}}}
    if roll < 0.95:
        regions = _sample(rng, REGIONS, 1, 2)
        return {
            "selector": {
                "matchExpressions": [{"key": "region", "operator": "In", "values": regions}]
            }
        }
    return {
        "names": [rng.choice(clusters)],
        "selector": {
            "matchLabels": {"environment": rng.choice(ENVIRONMENTS)},
            "matchExpressions": [
                {"key": "region", "operator": "NotIn", "values": [rng.choice(REGIONS)]}
            ],
        },
    }


def generate_bodies(sizes: Sizes, seed: int) -> list[dict[str, Any]]:
    """Manifest bodies: clusters, workloads, global roles and role bindings."""
    rng = random.Random(seed)  # noqa: S311 - a benchmark workload, not a secret
    bodies: list[dict[str, Any]] = []
    clusters = [f"c{i:02d}" for i in range(sizes.clusters)]
    cluster_env: dict[str, str] = {}
    for i, name in enumerate(clusters):
        env = ENVIRONMENTS[i % len(ENVIRONMENTS)]
        cluster_env[name] = env
        labels = {"environment": env, "region": REGIONS[(i // 3) % len(REGIONS)]}
        bodies.append(
            _doc("Cluster", name, {"issuer": f"https://{name}.k8s.bench.example", "labels": labels})
        )
    workloads: list[dict[str, Any]] = []
    for i in range(sizes.workloads):
        name = f"w{i:05d}"
        cluster = rng.choice(clusters)
        project = _project(rng.randrange(sizes.projects))
        claims = {"workload_id": name, "project": project, "environment": cluster_env[cluster]}
        if rng.random() < 0.9:
            claims["tier"] = rng.choice(TIERS)
        if rng.random() < 0.3:
            claims["team"] = rng.choice(TEAMS)
        namespace = project if rng.random() < 0.7 else f"{project}-{rng.choice(('jobs', 'web'))}"
        selector = {"cluster": cluster, "namespace": namespace, "serviceAccount": f"sa-{name}"}
        workloads.append(_doc("Workload", name, {"selector": selector, "claims": claims}))
    bodies.extend(workloads)
    guards = max(1, sizes.roles // 10)
    for i in range(sizes.roles):
        bodies.append(
            _doc("GlobalRole", f"role-{i:03d}", _role(rng, sizes.projects, guard=i < guards))
        )
    for i in range(sizes.bindings):
        deny = rng.random() < 0.18
        role = rng.randrange(guards) if deny and rng.random() < 0.75 else rng.randrange(sizes.roles)
        spec: dict[str, Any] = {
            "role": f"role-{role:03d}",
            "effect": "deny" if deny else "allow",
            "subjects": [
                _subject(rng, sizes, workloads) for _ in range(1 if rng.random() < 0.8 else 2)
            ],
        }
        scope = _cluster_scope(rng, clusters)
        if scope is not None:
            spec["clusters"] = scope
        if rng.random() < 0.3:
            first = spec["subjects"][0].get("claims", {}).get("project") or _project(
                rng.randrange(sizes.projects)
            )
            spec["namespaces"] = sorted(
                {first, f"{first}-jobs", _project(rng.randrange(sizes.projects))}
            )
        bodies.append(_doc("RoleBinding", f"rb-{i:04d}", spec))
    if sizes.template_identities:
        bodies.extend(_templates(sizes))
    return bodies


def _templates(sizes: Sizes) -> list[dict[str, Any]]:
    """One WorkloadTemplate per (project, environment): the clusters of that
    environment, namespace ``<project>-tpl``, any service account; claims as the
    explicit workloads carry them (project, environment, a tier)."""
    out = []
    for p in range(sizes.projects):
        project = _project(p)
        for env in ENVIRONMENTS:
            spec = {
                "clusters": {
                    "selector": {
                        "matchExpressions": [
                            {"key": "environment", "operator": "In", "values": [env]}
                        ]
                    }
                },
                "namespaces": [f"{project}-tpl"],
                "serviceAccounts": ["*"],
                "claims": {
                    "project": project,
                    "environment": env,
                    "tier": TIERS[p % len(TIERS)],
                },
            }
            out.append(_doc("WorkloadTemplate", f"tpl-{project}-{env}", spec))
    return out


def template_accounts(sizes: Sizes, seed: int) -> list[tuple[str, str, str]]:
    """The (cluster, namespace, service account) of ``sizes.template_identities``
    service accounts the templates of ``generate_bodies`` match."""
    rng = random.Random(seed * 104_729 + 3)  # noqa: S311 - a benchmark workload
    clusters = [f"c{i:02d}" for i in range(sizes.clusters)]
    return [
        (
            rng.choice(clusters),
            f"{_project(rng.randrange(sizes.projects))}-tpl",
            f"t{i:05d}",
        )
        for i in range(sizes.template_identities)
    ]


def load_world(
    bodies: Sequence[dict[str, Any]],
    revision: int = 1,
    accounts: Sequence[tuple[str, str, str]] = (),
) -> World:
    """Validate every body as a manifest and index it, as ``trustmesh apply`` would.
    ``accounts``: service accounts the templates give identities to (``template_accounts``),
    counted in the inventory as observed."""
    documents = [document_from_body(body) for body in bodies]
    registry = build_registry(
        TRUST_DOMAIN,
        revision,
        [d for d in documents if d.kind in ("Cluster", "Workload", "WorkloadTemplate")],
    )
    policy = PolicySet.from_documents(documents)
    identities = [
        Identity(
            workload=name,
            spiffe_id=registry.spiffe_id_of(name),
            claims=identity_claims(registry, name),
            cluster=registry.workloads[name].selector.cluster,
        )
        for name in sorted(registry.workloads)
    ]
    for account in accounts:
        derived = registry.resolve(*account)
        if derived is None or derived.template is None:
            raise ValueError(f"no template gives {account}")
        identities.append(
            Identity(derived.workload, derived.spiffe_id, dict(derived.claims), account[0])
        )
    world = World(documents=documents, registry=registry, policy=policy, identities=identities)
    for doc in documents:
        if doc.kind == "GlobalRole":
            world.role_rules[doc.name] = list(doc.body["spec"].get("rules", []))
        elif doc.kind == "RoleBinding":
            world.binding_bodies[doc.name] = doc.body["spec"]
    return world


# --- requests ----------------------------------------------------------------------------


def _pick(rng: random.Random, values: Sequence[str], universe: Sequence[str]) -> str:
    choice = rng.choice(list(values))
    return rng.choice(list(universe)) if choice == "*" else choice


def _glob_instance(rng: random.Random, glob: str) -> str:
    if glob in ("*", "/**"):
        return "/" + "/".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
    out: list[str] = []
    for segment in glob.split("/")[1:]:
        if segment == "**":
            out.extend(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
        elif segment == "*":
            out.append(rng.choice(WORDS))
        elif segment.endswith("*"):
            out.append(segment[:-1] + rng.choice(("", "1", "2", "beta")))
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _host_instance(rng: random.Random, host: str, projects: int) -> str:
    if host == "*":
        out = f"{rng.choice(SERVICES)}.{_project(rng.randrange(projects))}.svc"
    elif host.startswith("*."):
        out = rng.choice(SERVICES) + host[1:]
    else:
        out = host
    return out + (":8443" if rng.random() < 0.15 else "")


def _from_rule(
    rng: random.Random,
    rule: dict[str, Any],
    namespaces: list[str] | None,
    identity: Identity,
    projects: int,
) -> dict[str, Any]:
    if "nonResourceURLs" in rule:
        url = rng.choice(rule["nonResourceURLs"])
        if url == "*":
            url = rng.choice(NON_RESOURCE_URLS)
        elif url.endswith("*"):
            url = url[:-1] + "/".join(rng.choice(WORDS) for _ in range(rng.randint(0, 2)))
        return {"verb": _pick(rng, rule["verbs"], ("get", "post", "head")), "nonResourceURL": url}
    namespace = rng.choice(namespaces) if namespaces else identity.claims["namespace"]
    if "services" in rule:
        out = {
            "host": _host_instance(rng, rng.choice(rule["services"]), projects),
            "path": _glob_instance(rng, rng.choice(rule["paths"])),
            "method": _pick(rng, rule["methods"], METHODS),
        }
        if rng.random() < 0.1:
            out["path"] += "?q=1"
        if rng.random() < 0.5:
            out["namespace"] = namespace
        return out
    resource = _pick(rng, rule["resources"], RESOURCES)
    subresource = ""
    if resource.startswith("*/"):
        resource, subresource = rng.choice(RESOURCES), resource[2:]
    elif "/" in resource:
        resource, subresource = resource.split("/", 1)
    request = {
        "verb": _pick(rng, rule["verbs"], VERBS + RARE_VERBS),
        "apiGroup": _pick(rng, rule["apiGroups"], API_GROUPS),
        "resource": resource,
        "namespace": namespace,
    }
    if subresource:
        request["subresource"] = subresource
    if rule.get("resourceNames"):
        request["name"] = rng.choice(rule["resourceNames"])
    elif rng.random() < 0.5:
        request["name"] = f"obj-{rng.randrange(20)}"
    return request


def _near_miss(rng: random.Random, request: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """Change one attribute, so the request is probably no longer covered."""
    out = dict(request)
    if "host" in out:
        roll = rng.random()
        if roll < 0.3:
            out["method"] = rng.choice(METHODS)
        elif roll < 0.6:
            out["path"] = out["path"].split("?")[0].rstrip("/") + "/" + rng.choice(WORDS)
        elif roll < 0.8:
            out["path"] = "/" + "/".join(out["path"].split("?")[0].split("/")[2:])
        else:
            out["host"] = out["host"].replace(".svc", ".svc.other")
    elif "nonResourceURL" in out:
        if rng.random() < 0.5:
            out["verb"] = rng.choice(("post", "delete", "head"))
        else:
            out["nonResourceURL"] = "/x" + out["nonResourceURL"]
    else:
        roll = rng.random()
        if roll < 0.3:
            out["verb"] = rng.choice(VERBS + RARE_VERBS)
        elif roll < 0.5:
            out["namespace"] = rng.choice((identity.claims["project"] + "-web", "kube-system", ""))
        elif roll < 0.7:
            out["subresource"] = rng.choice(SUBRESOURCES)
        elif roll < 0.85:
            out["name"] = f"obj-{rng.randrange(40)}"
        else:
            out["apiGroup"] = rng.choice(API_GROUPS)
    return out


def _random_request(rng: random.Random, identity: Identity, projects: int) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.45:
        request = {
            "verb": rng.choice(VERBS),
            "apiGroup": rng.choice(API_GROUPS),
            "resource": rng.choice(RESOURCES),
            "namespace": identity.claims["namespace"],
        }
        if rng.random() < 0.2:
            request["subresource"] = rng.choice(SUBRESOURCES)
        return request
    if roll < 0.6:
        return {"verb": "get", "nonResourceURL": rng.choice(NON_RESOURCE_URLS)}
    return {
        "host": f"{rng.choice(SERVICES)}.{_project(rng.randrange(projects))}.svc",
        "path": "/" + "/".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),
        "method": rng.choice(METHODS),
    }


def _family(request: dict[str, Any]) -> str:
    if "host" in request:
        return "service"
    return "nonResource" if "nonResourceURL" in request else "resource"


def generate_requests(
    world: World,
    count: int,
    seed: int,
    sizes: Sizes,
    clusters: Sequence[str] | None = None,
    bundles: dict[str, dict[str, Any]] | None = None,
) -> list[BenchRequest]:
    """``count`` requests: an identity from the inventory, evaluated mostly on its own
    cluster (15% on another one), asking for something a binding that names it covers
    (an allow or a deny binding), a near miss of that, or something random.
    ``clusters``: only these clusters' agents are asked, by identities of these
    clusters (the scale benchmark times a sample of its 500 clusters); ``bundles``:
    already compiled.

    Which bindings name an identity is read from throwaway engines (the benchmark's
    timed engines are built separately, with empty memos)."""
    rng = random.Random(seed * 7919 + 1)  # noqa: S311 - a benchmark workload, not a secret
    from trustmesh.policy.compiler import compile_all

    if bundles is None:
        bundles = compile_all(world.policy, world.registry, 1)
    asked = sorted(world.registry.clusters) if clusters is None else sorted(clusters)
    engines = {name: Engine(bundles[name]) for name in asked}
    identities = (
        world.identities
        if clusters is None
        else [i for i in world.identities if i.cluster in engines]
    )
    out: list[BenchRequest] = []
    for _ in range(count):
        identity = rng.choice(identities)
        cluster = identity.cluster if rng.random() < 0.85 else rng.choice(asked)
        denies, allows = engines[cluster].applicable(identity.spiffe_id, identity.claims)
        roll = rng.random()
        origin = "random"
        body: dict[str, Any]
        if allows and roll < 0.62:
            binding = rng.choice(allows)
            origin = "allow-rule"
        elif denies and roll < 0.8:
            binding = rng.choice(denies)
            origin = "deny-rule"
        else:
            binding = None
        if binding is None:
            body = _random_request(rng, identity, sizes.projects)
        else:
            spec = world.binding_bodies[binding.name]
            rule = rng.choice(world.role_rules[spec["role"]])
            body = _from_rule(rng, rule, spec.get("namespaces"), identity, sizes.projects)
            if rng.random() < 0.3:
                body = _near_miss(rng, body, identity)
                origin = "near-miss"
        out.append(BenchRequest(identity, cluster, parse_request(body), _family(body), origin))
    return out
