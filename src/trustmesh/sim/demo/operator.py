"""What an operator does while the traffic flows, and how long each takes to be in
force at every agent: a bad policy change (refused by its PolicyTest, the revision in
force unmoved) then a good one, timed to every agent; the revocation of a workload,
timed to each cluster it calls by probing with the token it holds; the rotation of
the control plane's signing key; and in the mesh act, the suspension of a workload,
timed until its mTLS calls are refused at the agent behind the Envoy it calls."""

from __future__ import annotations

import time

import httpx

from trustmesh.sim.demo._http import json_body
from trustmesh.sim.demo.admin import Admin, tests_passed
from trustmesh.sim.demo.display import (
    Events,
    mesh_cut_text,
    propagation_text,
    revocation_text,
    short_kid,
)
from trustmesh.sim.demo.errors import ApiError, DemoError
from trustmesh.sim.demo.mesh_traffic import MeshTraffic
from trustmesh.sim.demo.scenario import (
    BAD_CHANGE,
    GOOD_CHANGE,
    REVOCATION_REASON,
    REVOKED_WORKLOAD,
    SUSPENDED_WORKLOAD,
    SUSPENSION_REASON,
    policy_manifest,
)
from trustmesh.sim.demo.scoreboard import (
    MeshCutOff,
    PairStats,
    PolicyChange,
    RevocationRun,
    Rotation,
    Scoreboard,
)
from trustmesh.sim.demo.traffic import Refused, Traffic, probe
from trustmesh.sim.demo.upstream import serial_hex

PROPAGATION_TIMEOUT = 15.0  # seconds every agent has to take up a new policy revision
PROPAGATION_POLL = 0.01
REVOCATION_TIMEOUT = 5.0  # seconds every target agent has to refuse the revoked token
REVOCATION_POLL = 0.005  # seconds between two rounds of probes at the target agents
SUSPENSION_TIMEOUT = 5.0  # seconds the mesh's agent has to refuse the suspended workload


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
            if exc.answer_status != 422 or exc.answer_error != "policy_test_failed":
                raise
            change.rejected = f"{exc.answer_status} {exc.answer_error}"
            self.events.event(
                f"policy change: {BAD_CHANGE.title} -> REJECTED with {change.rejected}: "
                f"{exc.answer_description}"
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
                revisions[name] = int(json_body(self.http.get(url + "/readyz"))[key])
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
        refused it as revoked; ``started`` is just before the revocation request. The
        refusal that marks a cut-off is counted with the flow's refusals of the revoked
        token: the traffic may renew its token before it presents the revoked one again
        (in the run until Ctrl-C, renewal and revocation both fall at 12 s), and a count
        without it would say "0 refused" beside the cut-off that refusal measured."""
        waiting = dict(held)
        while waiting:
            for target, (pair, token) in list(waiting.items()):
                answer = probe(traffic, pair, token)
                run.probes += 1
                if answer == "revoked":
                    run.cut_off[target] = time.monotonic() - started
                    pair.revoked += 1
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
            f"signing key rotated: kid {short_kid(old)} retired (still in JWKS), "
            f"kid {short_kid(new)} active; "
            "agents verify the new kid from their key set or refresh it on first sight"
        )

    # -- the mesh act: suspension

    def suspend(self, mesh: MeshTraffic) -> None:
        """Suspend a mesh workload while it calls orders over mTLS, and time how long the
        agent behind orders' Envoy takes to refuse its certificate (401 revoked)."""
        run = mesh.run
        cut = MeshCutOff(SUSPENDED_WORKLOAD, SUSPENSION_REASON, self.board.elapsed())
        run.cut = cut
        route = next(
            f.route for f in run.flows if f.route.workload == cut.workload and f.route.status == 200
        )
        before = mesh.probe(route)
        if before.kind != "allowed":
            self.suspension_problem(
                cut, f"before its suspension, {cut.workload}'s call got {before.text}"
            )
            return
        leaf = mesh.held(cut.workload)
        cut.held_serial = serial_hex(leaf.serial_number) if leaf is not None else ""
        cut.at = self.board.elapsed()
        started = time.monotonic()
        try:
            result = self.admin.suspend_workload(cut.workload, cut.reason)
            entry = result["revocation"]
            cut.revision, cut.revoked_at = int(entry["revision"]), float(entry["revoked_at"])
        except (DemoError, KeyError, TypeError, ValueError) as exc:
            self.suspension_problem(cut, f"suspending workload {cut.workload} failed: {exc}")
            return
        flow = next(f for f in run.flows if f.route == route)
        while True:
            answer = mesh.probe(route)
            cut.probes += 1
            if answer.text == "401 revoked":
                cut.cut_off = time.monotonic() - started
                cut.refusals[answer.text] += 1
                flow.calls += 1  # the refusal that marks the cut-off counts, as for tokens
                flow.cut_off += 1
                break
            if answer.kind != "allowed":
                self.suspension_problem(
                    cut, f"after its suspension, {cut.workload}'s call got {answer.text}"
                )
                return
            if time.monotonic() - started > SUSPENSION_TIMEOUT:
                self.suspension_problem(
                    cut,
                    f"{cut.workload}'s mTLS calls were still allowed "
                    f"{SUSPENSION_TIMEOUT:.0f} s after its suspension",
                )
                return
            time.sleep(REVOCATION_POLL)
        self.events.event(mesh_cut_text(cut, route.target))

    def suspension_problem(self, cut: MeshCutOff, text: str) -> None:
        cut.errors.append(text)
        self.events.event(f"mesh: {text}")
