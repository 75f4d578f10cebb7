"""Reports over stored policy versions, computed where the versions and the registry
are (DESIGN §3, §12): the effective diff between two revisions (``GET
/v1/policy/diff``, which ``trustmesh policy diff`` and the console both read) and
"explain this decision" (``POST /v1/policy/explain``).

Both compile a version's policy over today's inventory (``policy/diff.py``): a
binding subject or cluster the registry no longer has matches nothing. The diff
counts the template-derived identities observed so far (``Registry.observed``, as
``get workloads`` lists them). Explain builds the cluster's bundle for the revision
(the current revision's is the bundle its agents hold) and asks the engine an agent
runs, on the control plane's clock (a time-bound binding past its expiry does not
match, as on an agent); the last few engines are kept, so asking again is cheap."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from trustmesh.common.clock import Clock
from trustmesh.common.errors import InvalidRequest, NotFound
from trustmesh.policy.catalog import PolicyCatalog, PolicyVersion, documents_of
from trustmesh.policy.compiler import PolicySet
from trustmesh.policy.diff import diff_policies, inventory_bundle
from trustmesh.policy.engine import Engine
from trustmesh.policy.explain import explain
from trustmesh.registry import Registry
from trustmesh.request import parse_request
from trustmesh.server.inventory import Inventory
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import parse_spiffe_id

ENGINES = 8
"""Engines kept for explain, by (policy revision, registry revision, cluster)."""
MAX_NAME = 253
MAX_SPIFFE_ID = 2048
EXPLAIN_MEMBERS = frozenset({"cluster", "identity", "request", "revision"})

Revision = int | str
"""A revision number (0: the empty policy) or ``"current"``."""


class PolicyViews:
    def __init__(
        self,
        catalog: PolicyCatalog,
        snapshots: Snapshots,
        inventory: Inventory,
        clock: Clock,
    ) -> None:
        self.catalog = catalog
        self.snapshots = snapshots
        self.inventory = inventory
        self.clock = clock
        self._engines: OrderedDict[tuple[int, int, str], tuple[Engine, dict[str, Any]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def version(self, revision: Revision) -> PolicyVersion:
        """A stored version (0: the empty policy, ``current``: the newest); NotFound."""
        if revision == "current":
            return self.catalog.current()
        assert isinstance(revision, int)
        found = self.catalog.get(revision)
        if found is None:
            raise NotFound(f"policy revision {revision} does not exist")
        return found

    def diff(self, old: Revision, new: Revision) -> dict[str, Any]:
        """``{"from", "to", "appeared", "disappeared", "escalations"}``: the effective
        change from ``old`` to ``new`` over today's inventory, with escalation flags
        (``policy/diff.py``); PolicyError when a version's roles do not fit together."""
        before, after = self.version(old), self.version(new)
        result = diff_policies(
            PolicySet.from_documents(documents_of(before)),
            PolicySet.from_documents(documents_of(after)),
            self.inventory.registry_with_observed(),
        )
        return {"from": before.revision, "to": after.revision, **result.to_json()}

    def explain(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to ``POST /v1/policy/explain`` (module docstring); InvalidRequest
        naming the member for bad input, NotFound for a revision that does not exist."""
        unknown = sorted(set(document) - EXPLAIN_MEMBERS)
        if unknown:
            raise InvalidRequest(
                f"unknown member {unknown[0][:64]!r}: give cluster, identity, request "
                "and optionally revision"
            )
        cluster = _name(document.get("cluster"), "cluster")
        registry = self.snapshots.registry
        if cluster not in registry.clusters:
            raise InvalidRequest(f"cluster {cluster!r} is not a registered Cluster")
        revision = _revision(document.get("revision", "current"))
        if "request" not in document:
            raise InvalidRequest("request is required")
        request = parse_request(document["request"])
        version = self.version(revision)
        engine, bundle = self._engine(version, cluster)
        spiffe_id, claims, identity = _identity(document.get("identity"), engine, registry)
        answer = explain(engine, bundle, spiffe_id, claims, request)
        return {"cluster": cluster, "revision": version.revision, "identity": identity, **answer}

    def _engine(self, version: PolicyVersion, cluster: str) -> tuple[Engine, dict[str, Any]]:
        registry = self.snapshots.registry
        key = (version.revision, registry.revision, cluster)
        with self._lock:
            held = self._engines.get(key)
            if held is not None:
                self._engines.move_to_end(key)
                return held
        policy = PolicySet.from_documents(documents_of(version))
        bundle = inventory_bundle(policy, registry, cluster, version.revision)
        built = (Engine(bundle, clock=self.clock), bundle)
        with self._lock:
            self._engines[key] = built
            while len(self._engines) > ENGINES:
                self._engines.popitem(last=False)
        return built


def _name(value: Any, member: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{member} must be a non-empty string")
    if len(value) > MAX_NAME:
        raise InvalidRequest(f"{member} is longer than {MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRequest(f"{member} must not contain control characters")
    return value


def _revision(value: Any) -> Revision:
    if value == "current":
        return "current"
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 10**18:
        raise InvalidRequest("revision must be a non-negative integer or 'current'")
    return value


def _identity(
    value: Any, engine: Engine, registry: Registry
) -> tuple[str, Mapping[str, Any], dict[str, Any]]:
    """(SPIFFE ID, claims, what the answer shows of it) for ``{"workload": NAME}`` (a
    Workload or a template-derived identity ``TEMPLATE/CLUSTER/NS/SA``) or
    ``{"spiffeId": ID}`` (its inventory entry in the bundle; an ID the inventory does
    not hold — another trust domain's, say — is asked about with no claims)."""
    if not isinstance(value, Mapping) or len(value) != 1:
        raise InvalidRequest('identity must be {"workload": NAME} or {"spiffeId": ID}')
    if "workload" in value:
        name = _name(value["workload"], "identity.workload")
        found = registry.identity_named(name)
        if found is None:
            raise InvalidRequest(
                f"identity.workload {name!r} is not a registered Workload nor an identity "
                "a WorkloadTemplate gives"
            )
        shown = {"workload": found.workload, "spiffeId": found.spiffe_id, "registered": True}
        return found.spiffe_id, found.claims, {**shown, "claims": dict(found.claims)}
    if "spiffeId" in value:
        spiffe_id = value["spiffeId"]
        if not isinstance(spiffe_id, str) or len(spiffe_id) > MAX_SPIFFE_ID:
            raise InvalidRequest(
                f"identity.spiffeId must be a string of at most {MAX_SPIFFE_ID} characters"
            )
        try:
            parse_spiffe_id(spiffe_id)
        except InvalidRequest as exc:
            raise InvalidRequest(f"identity.spiffeId: {exc}") from None
        entry = engine.identity(spiffe_id)
        claims: Mapping[str, Any] = (entry or {}).get("claims") or {}
        shown = {
            "workload": (entry or {}).get("workload"),
            "spiffeId": spiffe_id,
            "registered": entry is not None,
            "claims": dict(claims),
        }
        return spiffe_id, claims, shown
    raise InvalidRequest('identity must be {"workload": NAME} or {"spiffeId": ID}')
