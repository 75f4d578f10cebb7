"""``trustmesh demo``: the whole federation on one machine, in one command.

What it shows, with real processes and real HTTP, no test-only code paths:

1. A control plane (``trustmesh server``, embedded SQLite) starts as a subprocess.
2. Three simulated Kubernetes clusters -- ``eu-west``, ``us-east`` and ``ap-south`` --
   each serve their own OIDC service-account issuer (discovery + JWKS). They are
   registered with their issuer URL only, so the control plane finds their keys by
   OIDC discovery, exactly as it would for EKS, GKE or a kube-apiserver. Two workloads
   per cluster are registered with project, environment and tier claims.
3. A small policy is applied together with the registry: two GlobalRoles
   (``orders-reader``, ``ledger-writer``), RoleBindings by claims, by workload and one
   explicit deny, and a PolicyTest that states what every call of the demo must get.
4. One agent per cluster (``trustmesh agent``) starts with a credential that lets it act
   for that cluster only.
5. Traffic: every workload mints a projected service-account token from its own cluster
   (kept until near expiry, as the kubelet does), trades it at ``POST /oauth2/token``
   (RFC 8693) for a short-lived JWT-SVID per *other* cluster (renewed at ~80 % of its
   lifetime), and presents it with a service request to that cluster's agent at
   ``POST /v1/authorize``. Some calls are allowed, some denied by design (default deny,
   explicit deny); every decision is checked against what the policy in force says.
6. An intruder tries, every round, a service-account token from a cluster nobody
   registered (the exchange answers ``invalid_grant``) and a JWT-SVID whose payload it
   rewrote to claim another workload (the agent answers 401).
7. At a third of the run the policy changes: first a bad change, which a PolicyTest
   rejects (422) while the revision in force stays; then a good one, whose arrival at
   every agent is timed.
8. At half time a workload (``inventory``) is revoked, with a reason, as after a leaked
   credential. The demo keeps presenting the token the workload holds to every cluster
   it calls, a few milliseconds apart, and times how long each agent takes to refuse it
   (401 ``revoked``). The workload's own next calls with that token are refused too (as
   expected: that refusal is no failure); it then exchanges its service-account token
   again, gets a JWT-SVID issued after the revocation, and its calls are accepted again.
9. At two thirds the control plane's signing key rotates; traffic keeps verifying, first
   with the retired key (still published in JWKS), then with the new one.

A live table (or, with ``--plain`` or without a terminal, one line per notable event and
a periodic summary) shows it all. Ctrl-C or the end of ``--duration`` stops agents, then
the control plane, then the simulated clusters, prints a final summary and removes the
temporary data dir. No process outlives the demo, even when start-up fails halfway.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import httpx
import yaml
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trustmesh.common.tracing import format_traceparent, new_span_id, new_trace_id
from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo_audit import AuditFinale, run_finale

__all__ = [
    "BAD_CHANGE",
    "CLUSTERS",
    "GOOD_CHANGE",
    "ROUTES",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "DemoError",
    "Expect",
    "PolicyChangeSpec",
    "manifest",
    "policy_manifest",
    "run_demo",
]

TRUST_DOMAIN = "demo.trustmesh.io"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
API_VERSION = "trustmesh.io/v1alpha1"

ROUND_INTERVAL = 0.3  # seconds between traffic rounds (~3 rounds per second)
SUMMARY_INTERVAL = 2.0  # seconds between summary lines in plain mode
READY_TIMEOUT = 30.0  # seconds a subprocess may take to print its ready line
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
HTTP_TIMEOUT = 3.0
SA_TOKEN_TTL = 3600  # projected service-account tokens, as the kubelet requests them
RENEW_AT = 0.8  # renew tokens at 80 % of their lifetime
INTERACTIVE_POLICY_CHANGE = 8.0  # seconds into the traffic when running until Ctrl-C
INTERACTIVE_REVOCATION = 12.0
INTERACTIVE_ROTATION = 16.0
PROPAGATION_TIMEOUT = 15.0  # seconds every agent has to take up a new policy revision
PROPAGATION_POLL = 0.01
REVOKED_WORKLOAD = "inventory"
REVOCATION_REASON = "credentials leaked in a CI build log"
REVOCATION_TIMEOUT = 5.0  # seconds every target agent has to refuse the revoked token
REVOCATION_POLL = 0.005  # seconds between two rounds of probes at the target agents

SERVER_READY = re.compile(r"trustmesh server listening on (\S+) \(")
AGENT_READY = re.compile(r"trustmesh agent for cluster (\S+) ready on (\S+) \(")


class DemoError(RuntimeError):
    """The demo could not start, or its traffic did not behave as it should."""


# -- the federation ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    region: str
    environment: str


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    cluster: str
    namespace: str
    service_account: str
    project: str
    environment: str
    tier: str

    @property
    def spiffe_id(self) -> str:
        """The default SPIFFE ID of an entry that names none (DESIGN §2)."""
        return (
            f"spiffe://{TRUST_DOMAIN}/cluster/{self.cluster}"
            f"/ns/{self.namespace}/sa/{self.service_account}"
        )


CLUSTERS = (
    ClusterSpec("eu-west", "eu-west-1", "production"),
    ClusterSpec("us-east", "us-east-1", "production"),
    ClusterSpec("ap-south", "ap-south-1", "staging"),
)
WORKLOADS = (
    WorkloadSpec("payments", "eu-west", "shop", "payments", "shop", "production", "gold"),
    WorkloadSpec("checkout", "eu-west", "shop", "checkout", "shop", "production", "silver"),
    WorkloadSpec(
        "inventory", "us-east", "warehouse", "inventory", "warehouse", "production", "silver"
    ),
    WorkloadSpec("search", "us-east", "catalog", "search", "catalog", "production", "bronze"),
    WorkloadSpec("ledger", "ap-south", "finance", "ledger", "finance", "staging", "gold"),
    WorkloadSpec("reports", "ap-south", "finance", "reports", "finance", "staging", "bronze"),
)
WORKLOAD_BY_NAME = {wl.name: wl for wl in WORKLOADS}
ROGUE_CLUSTER = "rogue"
FORGED_AUDIENCE = "us-east"  # where the intruder's forged token wants to go


def cluster_audience(cluster: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/{cluster}"


def manifest(issuers: dict[str, str]) -> str:
    """Cluster (issuer only: keys by OIDC discovery) and Workload documents."""
    documents: list[dict[str, Any]] = []
    for spec in CLUSTERS:
        labels = {"region": spec.region, "environment": spec.environment}
        documents.append(
            _document("Cluster", spec.name, {"issuer": issuers[spec.name], "labels": labels})
        )
    for wl in WORKLOADS:
        selector = {
            "cluster": wl.cluster,
            "namespace": wl.namespace,
            "serviceAccount": wl.service_account,
        }
        claims = {"project": wl.project, "environment": wl.environment, "tier": wl.tier}
        documents.append(_document("Workload", wl.name, {"selector": selector, "claims": claims}))
    return yaml.safe_dump_all(documents, sort_keys=False)


def _document(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


# -- the policy ----------------------------------------------------------------------------
#
# Two services, two roles, four bindings. ROUTES is the demo's traffic *and* its
# expectation: what each (workload -> cluster) call must get under the initial policy
# and after the accepted change. The PolicyTest applied with the policy is made from the
# same table, so the control plane refuses to publish a policy that disagrees with it,
# and every decision an agent answers during the run is checked against it.


@dataclass(frozen=True)
class ServiceCall:
    method: str
    host: str
    path: str

    def request(self) -> dict[str, str]:
        """The flat service request of ``POST /v1/authorize`` (DESIGN §4)."""
        return {"host": self.host, "path": self.path, "method": self.method}

    def __str__(self) -> str:
        return f"{self.method} {self.host}{self.path}"

    @property
    def short(self) -> str:
        return f"{self.method} {self.path}"


ORDERS_READ = ServiceCall("GET", "orders.shop.internal", "/api/orders/1042")
LEDGER_WRITE = ServiceCall("POST", "ledger.finance.internal", "/api/ledger/entries")


@dataclass(frozen=True)
class Expect:
    """What a decision must be: ``allow`` or ``deny`` by the named RoleBinding, or the
    ``default deny`` of a request no binding allows."""

    effect: str
    binding: str = ""

    def matches(self, decision: dict[str, Any]) -> bool:
        bindings = decision.get("bindings") or []
        allowed, denied = decision.get("allowed") is True, decision.get("denied") is True
        if self.effect == "allow":
            return allowed and not denied and self.binding in bindings
        if self.effect == "deny":
            return denied and not allowed and self.binding in bindings
        return not allowed and not denied

    @property
    def verdict(self) -> str:
        return "allow" if self.effect == "allow" else "deny"

    def __str__(self) -> str:
        return f"{self.effect} by {self.binding}" if self.binding else self.effect


def allow(binding: str) -> Expect:
    return Expect("allow", binding)


def deny(binding: str) -> Expect:
    return Expect("deny", binding)


DEFAULT_DENY = Expect("default deny")


@dataclass(frozen=True)
class Route:
    """One (workload -> target cluster) flow: its request and what it must get, per
    policy stage (0: the initial policy, 1: after the accepted change)."""

    workload: str
    target: str
    call: ServiceCall
    expect: tuple[Expect, Expect]


def _route(
    workload: str, target: str, call: ServiceCall, before: Expect, after: Expect | None = None
) -> Route:
    return Route(workload, target, call, (before, after or before))


ROUTES = (
    _route("payments", "us-east", ORDERS_READ, allow("shop-reads-orders")),
    _route("payments", "ap-south", LEDGER_WRITE, allow("ledger-writers")),
    _route("checkout", "us-east", ORDERS_READ, allow("shop-reads-orders")),
    _route("checkout", "ap-south", LEDGER_WRITE, DEFAULT_DENY, allow("ledger-writers")),
    _route("inventory", "eu-west", ORDERS_READ, DEFAULT_DENY),
    _route("inventory", "ap-south", LEDGER_WRITE, DEFAULT_DENY),
    _route("search", "eu-west", ORDERS_READ, DEFAULT_DENY),
    _route("search", "ap-south", LEDGER_WRITE, deny("bronze-never-writes-ledger")),
    _route("ledger", "eu-west", LEDGER_WRITE, allow("finance-writes-ledger")),
    _route("ledger", "us-east", LEDGER_WRITE, allow("finance-writes-ledger")),
    _route("reports", "eu-west", LEDGER_WRITE, deny("bronze-never-writes-ledger")),
    _route("reports", "us-east", ORDERS_READ, DEFAULT_DENY),
)
# Checked by the PolicyTest only: shop reads orders in production clusters, not staging.
TEST_ONLY_ROUTES = (_route("checkout", "ap-south", ORDERS_READ, DEFAULT_DENY),)


@dataclass(frozen=True)
class PolicyChangeSpec:
    title: str
    stage: int  # the policy stage the manifest describes
    extra: tuple[dict[str, Any], ...] = ()  # documents beyond that stage's policy


BAD_CHANGE = PolicyChangeSpec(
    "every project may write the ledger (new RoleBinding everyone-writes-ledger)",
    0,
    (
        _document(
            "RoleBinding",
            "everyone-writes-ledger",
            {
                "role": "ledger-writer",
                "subjects": [{"matchExpressions": [{"key": "project", "operator": "Exists"}]}],
            },
        ),
    ),
)
GOOD_CHANGE = PolicyChangeSpec(
    "checkout may write the ledger (RoleBinding ledger-writers gains workload checkout)", 1
)


def _rule(call: ServiceCall, paths: str) -> dict[str, list[str]]:
    return {"services": [call.host], "paths": [paths], "methods": [call.method]}


def _binding(name: str, role: str, subjects: list[dict[str, Any]], **scope: Any) -> dict[str, Any]:
    return _document("RoleBinding", name, {"role": role, "subjects": subjects, **scope})


def policy_documents(stage: int) -> list[dict[str, Any]]:
    """GlobalRoles, RoleBindings and the PolicyTest of ``stage``."""
    writers = ["payments", "checkout"] if stage else ["payments"]
    production = {"selector": {"matchLabels": {"environment": "production"}}}
    return [
        _document("GlobalRole", "orders-reader", {"rules": [_rule(ORDERS_READ, "/api/orders/**")]}),
        _document("GlobalRole", "ledger-writer", {"rules": [_rule(LEDGER_WRITE, "/api/ledger/**")]}),
        _binding("shop-reads-orders", "orders-reader", [{"claims": {"project": "shop"}}], clusters=production),
        _binding("ledger-writers", "ledger-writer", [{"workload": name} for name in writers]),
        _binding("finance-writes-ledger", "ledger-writer", [{"claims": {"project": "finance"}}]),
        _binding("bronze-never-writes-ledger", "ledger-writer", [{"claims": {"tier": "bronze"}}], effect="deny"),
        _document("PolicyTest", "demo-expectations", {"cases": policy_test_cases(stage)}),
    ]  # fmt: skip


def policy_test_cases(stage: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{route.workload} -> {route.target}: {route.call} is {route.expect[stage]}",
            "subject": {"workload": route.workload},
            "cluster": route.target,
            "request": route.call.request(),
            "expect": route.expect[stage].verdict,
        }
        for route in (*ROUTES, *TEST_ONLY_ROUTES)
    ]


def policy_manifest(change: PolicyChangeSpec | int) -> str:
    """The whole policy of a stage (an int), or of a change (with its extra documents)."""
    if isinstance(change, int):
        change = PolicyChangeSpec("", change)
    return yaml.safe_dump_all([*policy_documents(change.stage), *change.extra], sort_keys=False)


def write_policy_files(root: Path) -> Path:
    """The manifests the demo applies, for reading (kept with ``--data-dir``)."""
    folder = root / "policy"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("initial.yaml", policy_manifest(0)),
        ("rejected-change.yaml", policy_manifest(BAD_CHANGE)),
        ("accepted-change.yaml", policy_manifest(GOOD_CHANGE)),
    ):
        (folder / name).write_text(content, encoding="utf-8")
    return folder


# -- subprocesses --------------------------------------------------------------------------


class Child:
    """A ``trustmesh`` subprocess whose stdout and stderr go to files in ``log_dir``.

    It runs in its own process group, so a Ctrl-C in the terminal reaches the demo only
    and the demo stops its children in order (agents first, then the control plane)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, process_group=0
            )

    def wait_ready(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        """Wait for the ready line on stdout; a clear error if the process dies or stays
        silent (with the end of its stderr)."""
        while True:
            text = self.stdout_path.read_text(encoding="utf-8", errors="replace")
            for line in text.splitlines(keepends=True):
                match = pattern.search(line)
                if match is not None and line.endswith("\n"):
                    return match
            code = self.proc.poll()
            if code is not None:
                raise DemoError(
                    f"{self.name} exited with code {code} before it was ready{self._stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} was not ready within {READY_TIMEOUT:.0f} s{self._stderr_tail()}"
                )
            time.sleep(0.05)

    def _stderr_tail(self) -> str:
        try:
            lines = (
                self.stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            )
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines else ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop_children(children: list[Child]) -> None:
    """SIGTERM to all of them at once, then wait for each (SIGKILL after a timeout)."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait_stopped()


def trustmesh_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli.main", *(str(arg) for arg in args)]


def write_secret(path: Path, secret: str) -> None:
    """Write a credential readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secret + "\n")


# -- the control plane's admin API -----------------------------------------------------------


class ApiError(DemoError):
    """The control plane answered an admin call with an error."""

    def __init__(self, path: str, status: int, document: dict[str, Any], text: str) -> None:
        self.status = status
        self.error = str(document.get("error") or "")
        self.description = str(document.get("error_description") or text[:200])
        problems = document.get("problems")
        self.problems = [str(p) for p in problems] if isinstance(problems, list) else []
        super().__init__(f"{path} answered {status}: {self.description}")


class Admin:
    """The few admin calls the demo needs, with the admin credential."""

    def __init__(self, http: httpx.Client, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        method: str = "POST",
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        try:
            response = self.http.request(method, self.url + path, json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise DemoError(f"{method} {path} failed: {exc}") from None
        document = _json(response)
        if response.status_code not in ok:
            raise ApiError(f"{method} {path}", response.status_code, document, response.text)
        return document

    def apply(self, files: dict[str, str], message: str) -> dict[str, Any]:
        """-> the apply result (``registryRevision``, ``policyRevision``, ``tests``...)."""
        body = {
            "files": [{"path": path, "content": content} for path, content in files.items()],
            "author": "trustmesh demo",
            "message": message,
        }
        result: dict[str, Any] = self.call("/v1/apply", body)
        return result

    def policy_revision(self) -> int:
        """The policy revision in force at the control plane."""
        return int(self.call("/v1/policy/versions/current", method="GET")["revision"])

    def cluster_credential(self, cluster: str) -> str:
        return str(self.call(f"/v1/clusters/{cluster}/credentials")["token"])

    def rotate_keys(self) -> tuple[str, str]:
        """-> (the retired kid, the new active kid)."""
        result = self.call("/v1/keys/rotate")
        active = str(result["active"]["kid"])
        retired = [k for k in result["keys"] if k["state"] == "retired"]
        latest = max(retired, key=lambda k: k.get("retired_at") or 0, default={"kid": "?"})
        return str(latest["kid"]), active

    def revoke_workload(self, workload: str, reason: str) -> dict[str, Any]:
        """-> the revocation entry (``revision``, ``revoked_at``...); 201 when new, 200
        when the same revocation was already in force."""
        body = {"kind": "workload", "value": workload, "reason": reason}
        result = self.call("/v1/revocations", body, ok=(200, 201))
        entry: dict[str, Any] = result["revocation"]
        return entry


def tests_passed(result: dict[str, Any]) -> str:
    tests = result.get("tests") or {}
    return f"{tests.get('passed', '?')}/{tests.get('total', '?')}"


# -- scoreboard ----------------------------------------------------------------------------


@dataclass
class PairStats:
    """One (workload -> target cluster) flow."""

    route: Route
    workload: WorkloadSpec
    spiffe_id: str
    exchanges: int = 0
    allowed: int = 0
    denied: int = 0
    unexpected: int = 0  # decisions that did not match the policy in force
    refused: int = 0  # authentication failures (and other refusals) of a legitimate call
    revoked: int = 0  # refusals of a token revoked by the demo: expected, not failures
    errors: int = 0
    last_decision: str = ""
    last_latency_ms: float | None = None
    last_kid: str = ""
    outcome: str = ""  # the last outcome, to report changes only

    @property
    def target(self) -> str:
        return self.route.target

    @property
    def name(self) -> str:
        wl = self.workload
        return f"{wl.name}@{wl.cluster} -> {self.target} {self.route.call}"


@dataclass
class IntruderStats:
    label: str
    short: str  # for the table
    target: str
    expected_error: str  # the OAuth error the refusal must carry
    attempts: int = 0
    unexpected: int = 0  # refused, but not with expected_error
    refused: int = 0
    accepted: int = 0
    errors: int = 0
    last_reason: str = ""


@dataclass
class Rotation:
    at: float  # seconds into the traffic
    old_kid: str
    new_kid: str
    old_key_calls: int = 0  # authenticated after the rotation with the retired key
    new_key_calls: int = 0


@dataclass
class PolicyChange:
    at: float  # seconds into the traffic
    rejected: str = ""  # how the control plane refused the bad change
    kept_revision: int | None = None  # the revision still in force after the refusal
    new_revision: int | None = None  # the accepted change
    propagation: float | None = None  # seconds until every agent decided with it
    per_agent: dict[str, float] = field(default_factory=dict)


@dataclass
class RevocationRun:
    """The live revocation of one workload, and what each target cluster made of it."""

    workload: str
    reason: str
    targets: tuple[str, ...]  # the clusters the workload calls
    at: float  # seconds into the traffic, just before the revocation request
    revision: int | None = None  # the control plane's revocation revision of the entry
    revoked_at: float | None = None  # tokens with iat <= revoked_at are revoked
    cut_off: dict[str, float] = field(default_factory=dict)  # target -> s until refused
    probes: int = 0  # presentations of the revoked token while waiting for the cut-off
    agent_revisions: dict[str, int] = field(default_factory=dict)  # /readyz afterwards
    resumed: dict[str, float] = field(default_factory=dict)  # target -> s until accepted again
    errors: list[str] = field(default_factory=list)

    def covers(self, workload: str, issued_at: float | None) -> bool:
        """Whether a token of ``workload`` issued at ``issued_at`` (its iat) is revoked."""
        return (
            workload == self.workload
            and self.revoked_at is not None
            and issued_at is not None
            and issued_at <= self.revoked_at
        )


@dataclass
class PolicyState:
    revision: int  # in force at the control plane
    tests: str  # the PolicyTest cases passed at the last accepted apply, "13/13"
    stages: dict[int, int]  # policy revision -> stage of ROUTES' expectations
    change: PolicyChange | None = None
    errors: list[str] = field(default_factory=list)
    first_mismatch: str = ""

    def expected(self, route: Route, revision: int) -> Expect | None:
        stage = self.stages.get(revision)
        return None if stage is None else route.expect[stage]


@dataclass
class Scoreboard:
    server_url: str
    agent_urls: dict[str, str]
    data_dir: Path
    temporary: bool
    duration: float
    pairs: list[PairStats]
    forged: IntruderStats
    tampered: IntruderStats
    policy: PolicyState
    started: float = field(default_factory=time.monotonic)
    by_revision: Counter[int] = field(default_factory=Counter)  # decisions per revision
    rotation: Rotation | None = None
    rotation_error: str = ""
    revocation: RevocationRun | None = None
    interrupted: bool = False
    sample_trace: str | None = None  # an allowed call's trace, shown by the audit finale
    audit: AuditFinale | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def totals(self) -> dict[str, int]:
        allowed, denied = sum(p.allowed for p in self.pairs), sum(p.denied for p in self.pairs)
        return {
            "exchanges": sum(p.exchanges for p in self.pairs),
            "decisions": allowed + denied,
            "allowed": allowed,
            "denied": denied,
            "unexpected": sum(p.unexpected for p in self.pairs),
            "refused": sum(p.refused for p in self.pairs),
            "revoked": sum(p.revoked for p in self.pairs),
            "errors": sum(p.errors for p in self.pairs),
            "intruder_attempts": self.forged.attempts + self.tampered.attempts,
            "intruder_refused": self.forged.refused + self.tampered.refused,
            "intruder_accepted": self.forged.accepted + self.tampered.accepted,
        }

    def problems(self) -> list[str]:
        """What went wrong, in words; empty when every decision matched the policy in
        force, every legitimate token was authenticated (but the revoked one, after its
        revocation), every intruder attempt was refused and the policy change, the
        revocation and the key rotation behaved."""
        t = self.totals()
        problems = self.traffic_problems(t) + self.intruder_problems(t)
        problems += self.policy.errors + self.coverage_problems(t)
        if self.revocation is not None:
            problems += self.revocation.errors
        if self.rotation_error:
            problems.append(self.rotation_error)
        if self.audit is not None:
            problems += self.audit.problems
        return problems

    def traffic_problems(self, t: dict[str, int]) -> list[str]:
        problems = []
        if t["refused"] or t["errors"]:
            problems.append(f"{t['refused']} legitimate calls refused, {t['errors']} failed")
        if t["unexpected"]:
            problems.append(
                f"{t['unexpected']} decisions did not match the policy in force "
                f"(first: {self.policy.first_mismatch})"
            )
        return problems

    def intruder_problems(self, t: dict[str, int]) -> list[str]:
        problems = []
        if t["intruder_accepted"]:
            problems.append(f"{t['intruder_accepted']} intruder attempts were ACCEPTED")
        for intruder in (self.forged, self.tampered):
            if intruder.unexpected:
                problems.append(
                    f"{intruder.unexpected} intruder attempts refused without "
                    f"{intruder.expected_error} (last: {intruder.last_reason})"
                )
        return problems

    def coverage_problems(self, t: dict[str, int]) -> list[str]:
        """A run that was not cut short must have shown allowed and denied calls on every
        flow, and decisions with the accepted change."""
        if self.interrupted:
            return []
        if t["decisions"] == 0:
            return ["no legitimate call was decided"]
        problems = []
        silent = [f"{p.workload.name}->{p.target}" for p in self.pairs if not p.allowed + p.denied]
        if silent:
            problems.append("no decision for " + ", ".join(silent))
        if not t["allowed"] or not t["denied"]:
            problems.append(
                f"expected allowed and denied calls, got {t['allowed']} and {t['denied']}"
            )
        change = self.policy.change
        if change and change.new_revision is not None and not self.by_revision[change.new_revision]:
            problems.append(f"no decision was made with policy revision {change.new_revision}")
        revocation = self.revocation
        if revocation is not None and revocation.revoked_at is not None:
            waiting = [t for t in revocation.targets if t not in revocation.resumed]
            if waiting:
                problems.append(
                    f"{revocation.workload} was not accepted again with a token issued after "
                    f"its revocation at {', '.join(waiting)}"
                )
        return problems


# -- traffic -------------------------------------------------------------------------------


@dataclass
class Lease:
    token: str
    renew_at: float  # time.time() after which a new one is fetched
    issued_at: float | None = None  # the token's iat (JWT-SVIDs), to tell revoked ones
    trace_id: str | None = None  # W3C trace of this token: its issuance and every use


class Refused(Exception):
    """The control plane or an agent said no to a token (as opposed to a transport
    failure, or a decision that denies the request)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description


class Events(Protocol):
    def event(self, text: str) -> None: ...


class Traffic:
    """Workloads minting, exchanging and presenting tokens; and the intruder."""

    def __init__(
        self,
        board: Scoreboard,
        http: httpx.Client,
        clusters: dict[str, SimulatedCluster],
        rogue: SimulatedCluster,
        events: Events,
        lease_seconds: int,
    ) -> None:
        self.board, self.http, self.clusters, self.rogue = board, http, clusters, rogue
        self.events, self.lease_seconds = events, lease_seconds
        self.sa_tokens: dict[str, Lease] = {}
        self.svids: dict[tuple[str, str], Lease] = {}
        self.round = 0
        self.new_key_seen = False

    # -- legitimate traffic

    def run_round(self) -> None:
        for pair in self.board.pairs:
            self.call(pair)
        self.forge_exchange()
        self.tamper()
        self.round += 1

    def sa_token(self, wl: WorkloadSpec) -> str:
        lease = self.sa_tokens.get(wl.name)
        if lease is None or time.time() >= lease.renew_at:
            token = self.clusters[wl.cluster].mint(
                wl.namespace, wl.service_account, ttl=SA_TOKEN_TTL
            )
            lease = Lease(token, time.time() + RENEW_AT * SA_TOKEN_TTL)
            self.sa_tokens[wl.name] = lease
        return lease.token

    def svid(self, pair: PairStats) -> Lease:
        """The JWT-SVID the workload holds for the pair's target (exchanged when it has
        none, or when the one it has is due for renewal)."""
        key = (pair.workload.name, pair.target)
        lease = self.svids.get(key)
        if lease is None or time.time() >= lease.renew_at:
            trace_id = new_trace_id()
            token, expires_in = self.exchange(self.sa_token(pair.workload), pair.target, trace_id)
            pair.exchanges += 1
            lease = Lease(token, time.time() + RENEW_AT * expires_in, issued_at(token), trace_id)
            self.svids[key] = lease
        return lease

    def exchange(
        self, subject_token: str, target: str, trace_id: str | None = None
    ) -> tuple[str, float]:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": JWT_TOKEN_TYPE,
            "audience": cluster_audience(target),
            "lifetime": str(self.lease_seconds),
        }
        response = self.http.post(
            self.board.server_url + "/oauth2/token", data=form, headers=_trace_headers(trace_id)
        )
        body = _json(response)
        if response.status_code != 200:
            raise Refused(
                response.status_code, str(body.get("error")), str(body.get("error_description"))
            )
        return str(body["access_token"]), float(body["expires_in"])

    def authorize(
        self, target: str, token: str, request: dict[str, str], trace_id: str | None = None
    ) -> dict[str, Any]:
        """The agent's decision (allowed or denied); Refused when the token does not
        authenticate (401) or the agent cannot decide."""
        response = self.http.post(
            self.board.agent_urls[target] + "/v1/authorize",
            json={"token": token, "request": request},
            headers=_trace_headers(trace_id),
        )
        body = _json(response)
        if response.status_code != 200 or body.get("authenticated") is not True:
            reason = str(body.get("reason") or body.get("error_description") or "")
            raise Refused(response.status_code, str(body.get("error") or "refused"), reason)
        return body

    def call(self, pair: PairStats) -> None:
        lease: Lease | None = None
        try:
            lease = self.svid(pair)
            started = time.perf_counter()
            body = self.authorize(
                pair.target, lease.token, pair.route.call.request(), lease.trace_id
            )
            pair.last_latency_ms = (time.perf_counter() - started) * 1000
            revision = int(body["policy_revision"])
        except Refused as exc:
            self.svids.pop((pair.workload.name, pair.target), None)  # exchange again
            self.refused(pair, lease, exc)
            return
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            pair.errors += 1
            self.outcome(
                pair, f"error: {type(exc).__name__}", f"{pair.name}: request failed ({exc!r})"
            )
            return
        self.authenticated(pair, body["identity"])
        self.decided(pair, body, revision)
        if self.board.sample_trace is None and body.get("allowed") and lease.trace_id:
            self.board.sample_trace = lease.trace_id
        self.resumed(pair, lease)

    def refused(self, pair: PairStats, lease: Lease | None, exc: Refused) -> None:
        """A refusal is expected only for a token the demo revoked (reason ``revoked``,
        token issued no later than the revocation); any other is a failure."""
        revocation = self.board.revocation
        if (
            lease is not None
            and exc.status == 401
            and exc.description == "revoked"
            and revocation is not None
            and revocation.covers(pair.workload.name, lease.issued_at)
        ):
            pair.revoked += 1
            self.outcome(
                pair,
                "revoked",
                f"{pair.name}: REFUSED as expected ({exc}): its token was issued before the "
                f"revocation; it exchanges its service-account token for a new one",
            )
            return
        pair.refused += 1
        self.outcome(pair, f"refused: {exc}", f"{pair.name}: REFUSED ({exc})")

    def resumed(self, pair: PairStats, lease: Lease) -> None:
        """Note the revoked workload's first accepted call, per target, with a token
        issued after its revocation; say so once it has been accepted again everywhere."""
        revocation = self.board.revocation
        if (
            revocation is None
            or revocation.revoked_at is None
            or pair.workload.name != revocation.workload
            or pair.target in revocation.resumed
            or revocation.covers(pair.workload.name, lease.issued_at)
        ):
            return
        revocation.resumed[pair.target] = self.board.elapsed() - revocation.at
        if set(revocation.resumed) >= set(revocation.targets):
            self.events.event(resumed_text(revocation))

    def decided(self, pair: PairStats, body: dict[str, Any], revision: int) -> None:
        """Count the decision and check it against the policy in force at ``revision``."""
        allowed = body.get("allowed") is True
        if allowed:
            pair.allowed += 1
        else:
            pair.denied += 1
        self.board.by_revision[revision] += 1
        pair.last_decision = short_decision(body)
        verdict = f"{'ALLOWED' if allowed else 'DENIED'} at revision {revision}"
        expect = self.board.policy.expected(pair.route, revision)
        if expect is not None and expect.matches(body):
            who = f"authenticated as {pair.spiffe_id} (kid {_short(pair.last_kid)}, "
            text = f"{pair.name}: {verdict} ({decision_detail(body)}); {who}{pair.last_latency_ms or 0:.1f} ms)"
            self.outcome(pair, verdict.split()[0], text)
            return
        pair.unexpected += 1
        wanted = f"expected {expect}" if expect else "no policy with that revision was applied"
        mismatch = f"{pair.name}: {verdict} ({body.get('reason')}), {wanted}"
        self.board.policy.first_mismatch = self.board.policy.first_mismatch or mismatch
        self.outcome(pair, f"unexpected {verdict}", f"UNEXPECTED DECISION: {mismatch}")

    def authenticated(self, pair: PairStats, identity: dict[str, Any]) -> None:
        pair.spiffe_id = str(identity.get("spiffe_id") or pair.spiffe_id)
        pair.last_kid = str(identity.get("kid") or "")
        rotation = self.board.rotation
        if rotation is None:
            return
        if pair.last_kid == rotation.new_kid:
            rotation.new_key_calls += 1
            if not self.new_key_seen:
                self.new_key_seen = True
                self.events.event(
                    f"{pair.name}: first call verified with the new key "
                    f"(kid {_short(rotation.new_kid)}); "
                    "tokens signed before the rotation keep verifying with the retired key"
                )
        else:
            rotation.old_key_calls += 1

    def outcome(self, pair: PairStats, outcome: str, text: str) -> None:
        """Report a flow's outcome when it changes: the first decision, a decision that
        changes with the policy, a failure, a recovery."""
        if outcome != pair.outcome:
            pair.outcome = outcome
            self.events.event(text)

    # -- the intruder

    def forge_exchange(self) -> None:
        """A token for shop/payments from a cluster nobody registered."""
        stats = self.board.forged
        stats.attempts += 1
        forged = self.rogue.mint("shop", "payments", ttl=600)
        try:
            self.exchange(forged, FORGED_AUDIENCE)
        except Refused as exc:
            self.intruder_refused(stats, exc, exc.error, f"refused at exchange: {exc}")
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            stats.errors += 1
            self.events.event(f"intruder: forged exchange failed in transport ({exc!r})")
            return
        stats.accepted += 1
        self.events.event("intruder: forged SA token was ACCEPTED by the control plane")

    def tamper(self) -> None:
        """Rewrite a legitimate JWT-SVID's payload to claim another workload."""
        stolen = self.steal()
        if stolen is None:
            return
        target, token = stolen
        stats = self.board.tampered
        stats.target = target
        stats.attempts += 1
        try:
            self.authorize(target, swap_payload(token, WORKLOADS[0]), LEDGER_WRITE.request())
        except Refused as exc:
            reason = exc.description or exc.error
            self.intruder_refused(stats, exc, reason, f"refused by agent {target}: {exc}")
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            stats.errors += 1
            self.events.event(f"intruder: tampered call failed in transport ({exc!r})")
            return
        stats.accepted += 1
        self.events.event(f"intruder: tampered JWT-SVID was ACCEPTED by agent {target}")

    def steal(self) -> tuple[str, str] | None:
        """A current JWT-SVID of some workload other than the one impersonated."""
        candidates = sorted(
            (key, lease.token) for key, lease in self.svids.items() if key[0] != WORKLOADS[0].name
        )
        if not candidates:
            return None
        (_, target), token = candidates[self.round % len(candidates)]
        return target, token

    def intruder_refused(self, stats: IntruderStats, exc: Refused, reason: str, text: str) -> None:
        stats.refused += 1
        if exc.error != stats.expected_error:
            stats.unexpected += 1
        if reason != stats.last_reason:
            stats.last_reason = reason
            self.events.event(f"intruder: {stats.label} {text}")


def decision_detail(body: dict[str, Any]) -> str:
    """Why, in a few words: the deciding RoleBinding, or the default deny."""
    bindings = body.get("bindings") or []
    if body.get("denied") is True and bindings:
        return f"explicit deny: RoleBinding {bindings[0]}"
    if body.get("allowed") is True and bindings:
        return f"RoleBinding {bindings[0]}"
    if body.get("allowed") is not True:
        return "default deny: no RoleBinding allows this request"
    return str(body.get("reason"))


def short_decision(body: dict[str, Any]) -> str:
    """For the table: ``r2 allow ledger-writers``, ``r1 default deny``."""
    bindings = body.get("bindings") or []
    if body.get("allowed") is True:
        what = f"allow {bindings[0]}" if bindings else "allow"
    else:
        what = f"deny {bindings[0]}" if body.get("denied") is True and bindings else "default deny"
    return f"r{body.get('revision')} {what}"[:34]


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, read without verifying it (the workload's own token)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims if isinstance(claims, dict) else {}


def issued_at(token: str) -> float | None:
    try:
        return float(unverified_claims(token)["iat"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def swap_payload(token: str, victim: WorkloadSpec) -> str:
    """The same header and signature over a payload rewritten to claim ``victim``."""
    header, _, signature = token.split(".")
    claims = unverified_claims(token)
    claims.update(
        sub=victim.spiffe_id,
        workload_id=victim.name,
        namespace=victim.namespace,
        service_account=victim.service_account,
        tier=victim.tier,
    )
    raw = json.dumps(claims, separators=(",", ":")).encode()
    forged = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return f"{header}.{forged}.{signature}"


def _trace_headers(trace_id: str | None) -> dict[str, str]:
    """A W3C ``traceparent`` naming the token's trace and a new span for this call."""
    return {"traceparent": format_traceparent(trace_id, new_span_id())} if trace_id else {}


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _short(kid: str) -> str:
    return kid[:10] if kid else "-"


# -- changes during the run: policy, signing key ------------------------------------------


class Operator:
    """What an operator does while traffic flows: change the policy, revoke a workload,
    rotate the key."""

    def __init__(self, board: Scoreboard, admin: Admin, http: httpx.Client, events: Events) -> None:
        self.board, self.admin, self.http, self.events = board, admin, http, events

    # -- policy

    def change_policy(self) -> None:
        """A bad change the PolicyTest rejects, then a good one, timed to every agent."""
        change = PolicyChange(self.board.elapsed())
        self.board.policy.change = change
        try:
            self.try_bad_change(change)
            self.make_good_change(change)
        except DemoError as exc:
            self.policy_problem(f"policy change failed: {exc}")

    def policy_problem(self, text: str) -> None:
        self.board.policy.errors.append(text)
        self.events.event(text)

    def try_bad_change(self, change: PolicyChange) -> None:
        before = self.board.policy.revision
        try:
            result = self.admin.apply(
                {"policy.yaml": policy_manifest(BAD_CHANGE)}, BAD_CHANGE.title
            )
        except ApiError as exc:
            if exc.status != 422 or exc.error != "policy_test_failed":
                raise
            change.rejected = f"{exc.status} {exc.error}"
            self.events.event(
                f"policy change: {BAD_CHANGE.title} -> REJECTED with {change.rejected}: "
                f"{exc.description}"
            )
            self.check_kept(change, before)
            return
        self.policy_problem(
            f"the bad policy change was ACCEPTED as revision {result.get('policyRevision')}"
        )

    def check_kept(self, change: PolicyChange, before: int) -> None:
        current = self.admin.policy_revision()
        agents = self.agent_revisions()
        change.kept_revision = current
        shown = ", ".join(f"{name} {rev}" for name, rev in agents.items())
        if current != before or any(rev != before for rev in agents.values()):
            self.policy_problem(
                f"after the rejected change the revision in force moved from {before} to "
                f"{current} (agents: {shown})"
            )
            return
        self.events.event(
            f"revision in force did not move: control plane at policy revision {current}, "
            f"agents at {shown}"
        )

    def make_good_change(self, change: PolicyChange) -> None:
        result = self.admin.apply({"policy.yaml": policy_manifest(GOOD_CHANGE)}, GOOD_CHANGE.title)
        applied = time.monotonic()
        revision = int(result["policyRevision"])
        policy = self.board.policy
        policy.stages[revision] = GOOD_CHANGE.stage  # before any agent can decide with it
        policy.revision, policy.tests = revision, tests_passed(result)
        change.new_revision = revision
        self.events.event(
            f"policy change: {GOOD_CHANGE.title} -> accepted as policy revision {revision} "
            f"(PolicyTest {policy.tests} cases passed)"
        )
        self.wait_for_agents(change, revision, applied)

    def wait_for_agents(self, change: PolicyChange, revision: int, since: float) -> None:
        """Poll every agent's /readyz until it reports ``revision``."""
        deadline = since + PROPAGATION_TIMEOUT
        while len(change.per_agent) < len(self.board.agent_urls):
            for name, seen in self.agent_revisions().items():
                if seen >= revision and name not in change.per_agent:
                    change.per_agent[name] = time.monotonic() - since
            if time.monotonic() > deadline:
                late = sorted(set(self.board.agent_urls) - set(change.per_agent))
                self.policy_problem(
                    f"policy revision {revision} not in force at {', '.join(late)} "
                    f"after {PROPAGATION_TIMEOUT:.0f} s"
                )
                return
            time.sleep(PROPAGATION_POLL)
        change.per_agent = {name: change.per_agent[name] for name in self.board.agent_urls}
        change.propagation = max(change.per_agent.values())
        self.events.event(propagation_text(change))

    def agent_revisions(self, key: str = "policy_revision") -> dict[str, int]:
        """Each agent's policy (or revocation) revision in force, from its /readyz (-1
        when it cannot say)."""
        revisions = {}
        for name, url in self.board.agent_urls.items():
            try:
                revisions[name] = int(_json(self.http.get(url + "/readyz"))[key])
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                revisions[name] = -1
        return revisions

    # -- revocation

    def revoke(self, traffic: Traffic) -> None:
        """Revoke a workload while it calls other clusters, and time how long each of
        them takes to refuse the token the workload holds."""
        pairs = [p for p in self.board.pairs if p.workload.name == REVOKED_WORKLOAD]
        run = RevocationRun(
            REVOKED_WORKLOAD,
            REVOCATION_REASON,
            tuple(p.target for p in pairs),
            self.board.elapsed(),
        )
        self.board.revocation = run
        try:
            held = {pair.target: (pair, traffic.svid(pair).token) for pair in pairs}
        except (Refused, httpx.HTTPError, ValueError, KeyError) as exc:
            self.revocation_problem(run, f"{run.workload} has no token to revoke: {exc}")
            return
        for target, (pair, token) in held.items():
            before = probe(traffic, pair, token)
            if before != "accepted":
                self.revocation_problem(
                    run, f"before its revocation, {run.workload}'s token was {before} at {target}"
                )
                return
        run.at = self.board.elapsed()
        started = time.monotonic()
        try:
            entry = self.admin.revoke_workload(run.workload, run.reason)
            run.revision, run.revoked_at = int(entry["revision"]), float(entry["revoked_at"])
        except (DemoError, KeyError, TypeError, ValueError) as exc:
            self.revocation_problem(run, f"revoking workload {run.workload} failed: {exc}")
            return
        self.time_cut_off(run, traffic, held, started)
        self.check_agents_know(run, started)
        if not run.errors:
            self.events.event(revocation_text(run))

    def revocation_problem(self, run: RevocationRun, text: str) -> None:
        run.errors.append(text)
        self.events.event(text)

    def time_cut_off(
        self,
        run: RevocationRun,
        traffic: Traffic,
        held: dict[str, tuple[PairStats, str]],
        started: float,
    ) -> None:
        """Present the held token to every target agent, a few ms apart, until each has
        refused it as revoked; ``started`` is just before the revocation request."""
        waiting = dict(held)
        while waiting:
            for target, (pair, token) in list(waiting.items()):
                answer = probe(traffic, pair, token)
                run.probes += 1
                if answer == "revoked":
                    run.cut_off[target] = time.monotonic() - started
                elif answer != "accepted":
                    self.revocation_problem(
                        run,
                        f"after the revocation, {run.workload}'s token was {answer} at {target}",
                    )
                else:
                    continue
                del waiting[target]
            if waiting and time.monotonic() - started > REVOCATION_TIMEOUT:
                self.revocation_problem(
                    run,
                    f"{run.workload}'s revoked token was still accepted at "
                    f"{', '.join(waiting)} {REVOCATION_TIMEOUT:.0f} s after the revocation",
                )
                return
            time.sleep(REVOCATION_POLL)
        run.cut_off = {t: run.cut_off[t] for t in run.targets if t in run.cut_off}

    def check_agents_know(self, run: RevocationRun, started: float) -> None:
        """Every agent -- those the workload does not call too -- reports the revocation
        revision in its /readyz."""
        revision = run.revision or 0
        while True:
            run.agent_revisions = self.agent_revisions("revocation_revision")
            late = [name for name, seen in run.agent_revisions.items() if seen < revision]
            if not late:
                return
            if time.monotonic() - started > REVOCATION_TIMEOUT:
                self.revocation_problem(
                    run,
                    f"revocation revision {revision} not in force at {', '.join(late)} "
                    f"{REVOCATION_TIMEOUT:.0f} s after the revocation",
                )
                return
            time.sleep(PROPAGATION_POLL)

    # -- signing key

    def rotate(self) -> None:
        try:
            old, new = self.admin.rotate_keys()
        except DemoError as exc:
            self.board.rotation_error = f"key rotation failed: {exc}"
            self.events.event(self.board.rotation_error)
            return
        self.board.rotation = Rotation(self.board.elapsed(), old, new)
        self.events.event(
            f"signing key rotated: kid {_short(old)} retired (still in JWKS), "
            f"kid {_short(new)} active; "
            "agents verify the new kid from their key set or refresh it on first sight"
        )


def probe(traffic: Traffic, pair: PairStats, token: str) -> str:
    """Present ``token`` with the pair's request: ``accepted``, ``revoked``, or what
    else happened. Not counted as traffic."""
    try:
        traffic.authorize(pair.target, token, pair.route.call.request())
    except Refused as exc:
        return (
            "revoked" if exc.status == 401 and exc.description == "revoked" else f"refused ({exc})"
        )
    except (httpx.HTTPError, ValueError) as exc:
        return f"not checked ({exc!r})"
    return "accepted"


def revocation_text(run: RevocationRun) -> str:
    cut = ", ".join(f"{target} after {seconds:.2f} s" for target, seconds in run.cut_off.items())
    return (
        f"revoked workload {run.workload} (reason: {run.reason}): cut off at {cut} "
        f"(revocation revision {run.revision}, in force at all {len(run.agent_revisions)} "
        f"agents; its token was accepted everywhere just before; {run.probes} presentations)"
    )


def resumed_text(run: RevocationRun) -> str:
    again = ", ".join(f"{target} after {run.resumed[target]:.2f} s" for target in run.targets)
    return (
        f"{run.workload} re-issued a token after the revocation: accepted again at {again} "
        "(new JWT-SVIDs, issued after the revocation's second)"
    )


def propagation_text(change: PolicyChange) -> str:
    agents = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in change.per_agent.items())
    return (
        f"policy revision {change.new_revision} in force at all {len(change.per_agent)} "
        f"agents after {change.propagation or 0:.2f} s ({agents})"
    )


# -- display -------------------------------------------------------------------------------

COLUMNS = (
    "FROM", "WORKLOAD", "TO", "REQUEST", "EXCH", "ALLOWED", "DENIED", "LAST DECISION",
    "REFUSED", "REVOKED", "KEY", "LAST MS",
)  # fmt: skip
NUMERIC = {"EXCH", "ALLOWED", "DENIED", "REFUSED", "REVOKED", "LAST MS"}


def stats_table(board: Scoreboard, title: str | None = None) -> Table:
    table = Table(title=title, expand=False, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in NUMERIC else "left")
    for p in board.pairs:
        refused = p.refused + p.errors
        table.add_row(
            p.workload.cluster, p.workload.name, p.target, p.route.call.short, str(p.exchanges),
            Text(str(p.allowed), style="green" if p.allowed else ""),
            Text(str(p.denied), style="yellow" if p.denied else ""),
            Text(p.last_decision, style="bold red" if p.unexpected else ""),
            Text(str(refused), style="bold red" if refused else ""),
            Text(str(p.revoked), style="yellow" if p.revoked else ""),
            _short(p.last_kid), "-" if p.last_latency_ms is None else f"{p.last_latency_ms:.1f}",
        )  # fmt: skip
    for intruder in (board.forged, board.tampered):
        table.add_row(
            ROGUE_CLUSTER, Text("intruder", style="red"), intruder.target, intruder.short,
            str(intruder.attempts),
            Text(str(intruder.accepted), style="bold red" if intruder.accepted else ""), "",
            intruder.last_reason[:34], Text(str(intruder.refused), style="yellow"), "", "", "",
        )  # fmt: skip
    return table


def rotation_line(board: Scoreboard) -> str:
    rotation = board.rotation
    if board.rotation_error:
        return board.rotation_error
    if rotation is None:
        return "signing key: not rotated yet"
    return (
        f"signing key rotated at {rotation.at:.1f} s: {_short(rotation.old_kid)} -> "
        f"{_short(rotation.new_kid)}; since then {rotation.old_key_calls} calls verified with the "
        f"retired key, {rotation.new_key_calls} with the new one"
    )


def revocation_line(board: Scoreboard) -> str:
    run = board.revocation
    if run is None:
        return f"revocation: workload {REVOKED_WORKLOAD} not revoked yet"
    if run.revoked_at is None:
        return f"revocation of workload {run.workload} failed: {'; '.join(run.errors)}"
    parts = [f"workload {run.workload} revoked at {run.at:.1f} s (reason: {run.reason}):"]
    cut = ", ".join(f"{target} after {seconds:.2f} s" for target, seconds in run.cut_off.items())
    parts.append(f"cut off at {cut or 'no cluster yet'};")
    refusals = sum(p.revoked for p in board.pairs)
    parts.append(f"{refusals} calls with its revoked token refused (expected);")
    if run.resumed:
        parts.append(
            f"accepted again with a new token at {', '.join(t for t in run.targets if t in run.resumed)}"
        )
    else:
        parts.append("no call with a new token yet")
    return " ".join(parts)


def policy_line(board: Scoreboard) -> str:
    change = board.policy.change
    if change is None:
        return "policy: not changed yet"
    parts = [f"policy changed at {change.at:.1f} s:"]
    if change.rejected:
        parts.append(
            f"bad change rejected ({change.rejected}), revision {change.kept_revision} kept;"
        )
    if change.propagation is not None:
        parts.append(
            f"good change accepted as revision {change.new_revision}, in force at all "
            f"{len(change.per_agent)} agents after {change.propagation:.2f} s"
        )
    elif change.new_revision is not None:
        parts.append(f"good change accepted as revision {change.new_revision}")
    return " ".join(parts)


def header_lines(board: Scoreboard) -> list[str]:
    agents = ", ".join(f"{name} {url}" for name, url in board.agent_urls.items())
    kept = "removed at the end" if board.temporary else "kept"
    policy = board.policy
    return [
        f"control plane {board.server_url} (trust domain spiffe://{TRUST_DOMAIN})",
        f"agents: {agents}",
        f"policy revision {policy.revision} in force (PolicyTest {policy.tests} cases passed; "
        f"manifests in {board.data_dir / 'policy'})",
        f"data dir: {board.data_dir} ({kept})",
    ]


def summary_line(board: Scoreboard) -> str:
    t = board.totals()
    return (
        f"summary at {board.elapsed():.1f} s: policy revision {board.policy.revision}; "
        f"{t['exchanges']} exchanges, {t['decisions']} decisions ({t['allowed']} allowed, "
        f"{t['denied']} denied, {t['unexpected']} unexpected), "
        f"{t['refused']} refused legitimate calls, {t['revoked']} refused as revoked "
        f"(expected), {t['errors']} errors, "
        f"{t['intruder_refused']}/{t['intruder_attempts']} intruder attempts refused"
    )


class PlainDisplay:
    """One line per notable event and a summary line every few seconds."""

    def __init__(self, console: Console, board: Scoreboard) -> None:
        self.console, self.board = console, board
        self.next_summary = SUMMARY_INTERVAL
        self.last_summary = -SUMMARY_INTERVAL

    def __enter__(self) -> PlainDisplay:
        for line in header_lines(self.board):
            self.say(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.board.elapsed() - self.last_summary > 0.5:
            self.event(summary_line(self.board))

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def event(self, text: str) -> None:
        self.say(f"[{self.board.elapsed():6.1f}s] {text}")

    def tick(self) -> None:
        if self.board.elapsed() >= self.next_summary:
            self.next_summary += SUMMARY_INTERVAL
            self.last_summary = self.board.elapsed()
            self.event(summary_line(self.board))


class LiveDisplay:
    """A live table, refreshed four times a second, with the last few events below it."""

    def __init__(self, console: Console, board: Scoreboard) -> None:
        self.console, self.board = console, board
        self.events: deque[str] = deque(maxlen=6)
        self.live = Live(
            console=console, refresh_per_second=4, get_renderable=self.render, transient=True
        )

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def event(self, text: str) -> None:
        self.events.append(f"[{self.board.elapsed():6.1f}s] {text}")

    def tick(self) -> None:
        pass  # Live refreshes on its own thread

    def render(self) -> RenderableType:
        board = self.board
        head = Text("\n".join(header_lines(board)), style="bold")
        stop = f"stops after {board.duration:.0f} s; " if board.duration else ""
        foot = Text.assemble(
            (policy_line(board) + "\n", "magenta"),
            (revocation_line(board) + "\n", "yellow"),
            (rotation_line(board) + "\n", "cyan"),
            (summary_line(board) + "\n", ""),
            ("\n".join(self.events) + "\n", "dim"),
            (f"{stop}Ctrl-C to stop", "bold"),
        )
        return Group(head, stats_table(board), foot)


class Display(Events, Protocol):
    def tick(self) -> None: ...
    def __enter__(self) -> Display: ...
    def __exit__(self, *exc: object) -> None: ...


def print_final(console: Console, board: Scoreboard) -> None:
    console.print(stats_table(board, title="trustmesh demo: final summary"))
    for line in (policy_line(board), revocation_line(board), rotation_line(board)):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for line in board.audit.lines if board.audit is not None else []:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    problems = board.problems()
    if problems:
        console.print(
            "PROBLEMS: " + "; ".join(problems), markup=False, style="bold red", soft_wrap=True
        )
        return
    console.print(ok_line(board), markup=False, highlight=False, style="bold green", soft_wrap=True)


def ok_line(board: Scoreboard) -> str:
    t = board.totals()
    revisions = ", ".join(f"{n} at revision {rev}" for rev, n in sorted(board.by_revision.items()))
    return (
        f"OK: every decision matched the policy in force ({t['allowed']} allowed, "
        f"{t['denied']} denied; {revisions or 'none'}); every refusal was expected: "
        f"{revoked_summary(board)}all {t['intruder_attempts']} intruder attempts; "
        f"no other legitimate call was refused ({t['decisions']} calls after "
        f"{t['exchanges']} token exchanges)"
    )


def revoked_summary(board: Scoreboard) -> str:
    run = board.revocation
    if run is None or run.revoked_at is None:
        return ""
    refusals = sum(p.revoked for p in board.pairs)
    return (
        f"{refusals} calls with {run.workload}'s token after its revocation (cut off at "
        f"{len(run.cut_off)}/{len(run.targets)} clusters, accepted again with a new token at "
        f"{len(run.resumed)}/{len(run.targets)}), "
    )


# -- start-up ------------------------------------------------------------------------------


@dataclass
class Federation:
    """Everything the start-up brought up; the ExitStack owns stopping it."""

    server_url: str
    admin: Admin
    clusters: dict[str, SimulatedCluster]
    rogue: SimulatedCluster
    agent_urls: dict[str, str]
    policy: PolicyState
    agents: list[Child]


def start_federation(
    stack: ExitStack, root: Path, http: httpx.Client, say: Callable[[str], None]
) -> Federation:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_url = start_server(stack, root, logs)
    say(f"control plane listening on {server_url}")
    token = (root / "control-plane" / "admin.token").read_text(encoding="utf-8").strip()
    admin = Admin(http, server_url, token)
    clusters = start_clusters(stack, root)
    for name, cluster in clusters.items():
        say(f"simulated cluster {name}: service-account issuer {cluster.issuer}")
    rogue = SimulatedCluster(ROGUE_CLUSTER)  # never registered: the intruder's cluster
    stack.enter_context(rogue.serve())
    policy = apply_initial(admin, root, {name: c.issuer for name, c in clusters.items()}, say)
    agents: list[Child] = []
    agent_urls = start_agents(stack, root, logs, admin, server_url, agents)
    for name, url in agent_urls.items():
        say(f"agent for {name} ready on {url}")
    return Federation(server_url, admin, clusters, rogue, agent_urls, policy, agents)


def apply_initial(
    admin: Admin, root: Path, issuers: dict[str, str], say: Callable[[str], None]
) -> PolicyState:
    """Registry and initial policy in one apply (the PolicyTest runs before publishing)."""
    files = {"registry.yaml": manifest(issuers), "policy.yaml": policy_manifest(0)}
    result = admin.apply(files, "trustmesh demo: registry and initial policy")
    revision = int(result["policyRevision"])
    say(
        f"registered {len(CLUSTERS)} clusters (keys by OIDC discovery) "
        f"and {len(WORKLOADS)} workloads: registry revision {result['registryRevision']}"
    )
    say(
        f"policy revision {revision}: GlobalRoles orders-reader, ledger-writer; RoleBindings "
        "shop-reads-orders (project shop, production clusters), ledger-writers (workload "
        "payments), finance-writes-ledger (project finance), bronze-never-writes-ledger "
        f"(deny, tier bronze); PolicyTest demo-expectations: {tests_passed(result)} cases passed"
    )
    write_policy_files(root)
    return PolicyState(revision, tests_passed(result), {revision: 0})


def start_server(stack: ExitStack, root: Path, logs: Path) -> str:
    argv = trustmesh_argv(
        "server", "--data-dir", root / "control-plane", "--listen", "127.0.0.1:0",
        "--trust-domain", TRUST_DOMAIN,
    )  # fmt: skip
    children: list[Child] = []
    stack.callback(stop_children, children)
    children.append(Child("control-plane", argv, logs))
    return children[0].wait_ready(SERVER_READY, time.monotonic() + READY_TIMEOUT).group(1)


def start_clusters(stack: ExitStack, root: Path) -> dict[str, SimulatedCluster]:
    clusters = {}
    for spec in CLUSTERS:
        cluster = SimulatedCluster(spec.name, data_dir=root / "clusters" / spec.name)
        stack.enter_context(cluster.serve())
        clusters[spec.name] = cluster
    return clusters


def start_agents(
    stack: ExitStack, root: Path, logs: Path, admin: Admin, server_url: str, agents: list[Child]
) -> dict[str, str]:
    """Start every agent (into ``agents``), then wait for all of them (they start in
    parallel)."""
    stack.callback(stop_children, agents)  # all at once, before the control plane stops
    for spec in CLUSTERS:
        data_dir = root / "agents" / spec.name
        data_dir.mkdir(parents=True, exist_ok=True)
        token_file = root / "agents" / f"{spec.name}.token"
        write_secret(token_file, admin.cluster_credential(spec.name))
        argv = trustmesh_argv(
            "agent", "--cluster", spec.name, "--server", server_url, "--listen", "127.0.0.1:0",
            "--data-dir", data_dir, "--token-file", token_file,
        )  # fmt: skip
        agents.append(Child(f"agent-{spec.name}", argv, logs))
    deadline = time.monotonic() + READY_TIMEOUT
    return {
        spec.name: agent.wait_ready(AGENT_READY, deadline).group(2)
        for spec, agent in zip(CLUSTERS, agents, strict=True)
    }


def data_root(stack: ExitStack, data_dir: Path | None) -> tuple[Path, bool]:
    """The demo's data dir, and whether it is a temporary one (removed at the end)."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return data_dir.resolve(), False
    root = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    return root, True


# -- signals ---------------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the demo as Ctrl-C does (KeyboardInterrupt), so cleanup runs."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """While shutting down, a second Ctrl-C must not cut the shutdown short."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the demo --------------------------------------------------------------------------------


def lease_seconds(duration: float) -> int:
    """JWT-SVID lifetime the workloads ask for: short enough that renewals (and tokens
    signed by the new key after the rotation) show within the demo."""
    return 15 if duration <= 0 else max(2, min(15, int(duration / 5)))


def policy_change_time(duration: float) -> float:
    return INTERACTIVE_POLICY_CHANGE if duration <= 0 else duration / 3


def revocation_time(duration: float) -> float:
    return INTERACTIVE_REVOCATION if duration <= 0 else duration / 2


def rotation_time(duration: float) -> float:
    return INTERACTIVE_ROTATION if duration <= 0 else 2 * duration / 3


def drive(traffic: Traffic, display: Display, operator: Operator, duration: float) -> None:
    """Traffic rounds until ``duration`` (0: until Ctrl-C); change the policy at a third,
    revoke a workload at half time, rotate the key at two thirds."""
    board = traffic.board
    change_at, rotate_at = policy_change_time(duration), rotation_time(duration)
    revoke_at = revocation_time(duration)
    while duration <= 0 or board.elapsed() < duration:
        began = time.monotonic()
        if board.policy.change is None and board.elapsed() >= change_at:
            operator.change_policy()
        if board.revocation is None and board.elapsed() >= revoke_at:
            operator.revoke(traffic)
        if board.rotation is None and not board.rotation_error and board.elapsed() >= rotate_at:
            operator.rotate()
        traffic.run_round()
        display.tick()
        time.sleep(max(0.0, ROUND_INTERVAL - (time.monotonic() - began)))


def finish_with_audit(
    board: Scoreboard, fed: Federation, http: httpx.Client, say: Callable[[str], None]
) -> None:
    """Stop the agents (they ship what their spools hold), then prove the log."""
    if board.audit is not None:
        return
    stop_children(fed.agents)
    board.audit = run_finale(http, fed.server_url, fed.admin.token, board.sample_trace, say)


def make_board(fed: Federation, root: Path, temporary: bool, duration: float) -> Scoreboard:
    pairs = [
        PairStats(
            route, WORKLOAD_BY_NAME[route.workload], WORKLOAD_BY_NAME[route.workload].spiffe_id
        )
        for route in ROUTES
    ]
    return Scoreboard(
        server_url=fed.server_url,
        agent_urls=fed.agent_urls,
        data_dir=root,
        temporary=temporary,
        duration=duration,
        pairs=pairs,
        forged=IntruderStats(
            f"forged SA token from unregistered cluster {ROGUE_CLUSTER!r} (claims shop/payments)",
            "forged SA token",
            "server",
            "invalid_grant",
        ),
        tampered=IntruderStats(
            "JWT-SVID with rewritten payload (claims payments)",
            "tampered JWT-SVID",
            "-",
            "invalid_token",
        ),
        policy=fed.policy,
    )


def make_console(plain: bool) -> Console:
    console = Console()
    if plain and not console.is_terminal:
        return Console(width=max(console.width, 160))
    return console


def run_demo(duration: float = 0.0, data_dir: Path | None = None, plain: bool = False) -> None:
    """Run the demo for ``duration`` seconds (0: until Ctrl-C). Returns normally when every
    decision matched the policy in force, every refusal was expected (the revoked token
    after its revocation, the intruder's attempts) and no other legitimate call was
    refused, and the policy change, the revocation and the key rotation behaved; raises
    DemoError with one line otherwise, or when start-up failed."""
    console = make_console(plain)
    plain = plain or not console.is_terminal

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    board: Scoreboard | None = None
    stack = ExitStack()
    with sigterm_interrupts():
        try:
            root, temporary = data_root(stack, data_dir)
            http = stack.enter_context(httpx.Client(timeout=HTTP_TIMEOUT))
            fed = start_federation(stack, root, http, say)
            board = make_board(fed, root, temporary, duration)
            display: Display = (
                PlainDisplay(console, board) if plain else LiveDisplay(console, board)
            )
            traffic = Traffic(
                board, http, fed.clusters, fed.rogue, display, lease_seconds(duration)
            )
            with display:
                drive(traffic, display, Operator(board, fed.admin, http, display), duration)
            finish_with_audit(board, fed, http, say)
        except KeyboardInterrupt:
            if board is not None:
                board.interrupted = True
                say("interrupted: stopping agents, then proving the audit log")
                with signals_ignored():
                    finish_with_audit(board, fed, http, say)
            say("stopping the control plane and simulated clusters")
        finally:
            with signals_ignored():
                stack.close()
    if board is None:
        say("stopped during start-up; nothing left running")
        return
    print_final(console, board)
    problems = board.problems()
    if problems:
        raise DemoError("demo finished with problems: " + "; ".join(problems))
