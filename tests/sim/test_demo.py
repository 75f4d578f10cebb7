"""``trustmesh demo``: real subprocesses, real HTTP, real signals, nothing left behind."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

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
from trustmesh.sim.demo.display import ok_line, revocation_line, revocation_text, short_decision
from trustmesh.sim.demo.operator import Operator
from trustmesh.sim.demo.run import (
    lease_seconds,
    policy_change_time,
    revocation_time,
    rotation_time,
)
from trustmesh.sim.demo.scoreboard import (
    IntruderStats,
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

DEMO = [sys.executable, "-m", "trustmesh.cli.main", "demo"]


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def kill_leftovers(marker: str) -> None:
    for line in processes_mentioning(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


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
            rf"inventory@us-east -> {target} \S+ \S+: DENIED at revision 2 \(default deny", after
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
            r"^policy revision 1 in force \(PolicyTest 13/13 cases passed", output, re.M
        )
        check_traffic(output)
        check_policy_change(output)
        check_revocation(output)
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
            r"denied; [1-9]\d* at revision 1, [1-9]\d* at revision 2\); every refusal was "
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
    ):
        assert re.search(rf"[1-9]\d* {re.escape(kind)}", output), kind
    assert re.search(
        r"^audit: inclusion proof verified: entry \d+ \(revocation\.created, subject "
        r"spiffe://demo\.trustmesh\.io/cluster/us-east/ns/warehouse/sa/inventory",
        output,
        re.M,
    )
    assert re.search(r"^audit: consistency proof verified", output, re.M)
    assert re.search(
        r"^audit: trace [0-9a-f]{32}: token\.issued to \S+ \(control plane\) -> "
        r"(\d+ times )?authz\.decision at \S+: allowed",
        output,
        re.M,
    ), output
    assert "audit: every agent's events arrived, no sequence gaps" in output


def read_lines(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def test_sigint_stops_everything_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*DEMO, "--duration", "120", "--plain", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 45
        while not any("authenticated as" in line for line in seen):
            assert time.monotonic() < deadline, "no traffic within 45 s:\n" + "".join(seen)
            assert proc.poll() is None, "demo exited early:\n" + "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        assert sum("agent for" in line and "ready on" in line for line in seen) == 3
        assert processes_mentioning(str(data_dir)), "the agents and server should be running"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        time.sleep(0.2)  # let the reader thread drain the pipe
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert code == 0, output + stderr
        assert "interrupted: stopping agents, then proving the audit log" in output
        assert "audit: every agent's events arrived, no sequence gaps" in output
        assert "OK: every decision matched the policy in force" in output
        assert processes_mentioning(str(data_dir)) == []
        assert (data_dir / "policy" / "accepted-change.yaml").exists()
        assert (data_dir / "control-plane" / "admin.token").exists(), "a given data dir is kept"
        assert oct((data_dir / "agents" / "eu-west.token").stat().st_mode & 0o777) == "0o600"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(str(data_dir))


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
    for cluster in issuers:
        assert sum(d["spec"]["selector"]["cluster"] == cluster for d in workloads) == 2
    assert all(set(d["spec"]["claims"]) == {"project", "environment", "tier"} for d in workloads)


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
    results = run_policy_tests(policy, registry)
    assert results and all(r.passed for r in results), [r.describe() for r in results]
    effects = {route.expect[stage].effect for route in ROUTES}
    assert effects == {"allow", "deny", "default deny"}


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
