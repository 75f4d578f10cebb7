"""What the demo keeps count of while it runs: per flow and per intruder, the policy
change, the revocation and the key rotation, the mesh act (its calls over mTLS, the
certificate rotations the upstream saw, the suspended workload's cut-off), and the
judgement at the end (which problems the run showed, if any). The traffic and the
operator write it; the display reads it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.sim.demo.finale import AuditFinale
from trustmesh.sim.demo.scenario import DemoWorkload, Expect, MeshRoute, Route


@dataclass
class PairStats:
    """One (workload -> target cluster) flow."""

    route: Route
    workload: DemoWorkload
    spiffe_id: str
    exchanges: int = 0
    allowed: int = 0
    denied: int = 0
    unexpected: int = 0  # decisions that did not match the policy in force
    refused: int = 0  # authentication failures (and other refusals) of a legitimate call
    # Refusals of the token the demo revoked, the probe's that timed its cut-off
    # included: expected, not failures.
    revoked: int = 0
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
class LifecycleRun:
    """The life cycle act (``lifecycle.py``): the steps it completed and its figures."""

    completed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    onboarded: str = ""  # the SPIFFE ID the template gave
    pending_admitted: str = ""  # the Workload applied from get pending's suggestion
    fulfilled_s: float | None = None  # access request -> approval
    in_force_ms: float | None = None  # approval -> allowed at the agent
    gone_ms: float | None = None  # expiry -> denied at the agent
    retired: str = ""  # how the retired workload's exchange was refused

    def problems(self, interrupted: bool) -> list[str]:
        if self.errors or interrupted:
            return list(self.errors)
        if len(self.completed) < 6:
            return [f"the life cycle act stopped after {', '.join(self.completed) or 'nothing'}"]
        return []


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
    # Presentations of the revoked token while waiting for the cut-off; the last one at
    # each target was refused (one per entry of cut_off).
    probes: int = 0
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
class MeshFlow:
    """One call of the mesh act, made every round: what its answers were."""

    route: MeshRoute
    calls: int = 0
    allowed: int = 0  # the upstream answered (200)
    denied: int = 0  # ext_authz denied by policy (403)
    unexpected: int = 0  # allowed where the policy denies, or denied where it allows
    failed: int = 0  # any other answer while the workload was not cut off
    cut_off: int = 0  # refused after its workload's cut-off: expected, not failures
    last: str = ""  # the last answer, for the table
    last_failure: str = ""
    outcome: str = ""  # the last outcome, to report changes only

    @property
    def name(self) -> str:
        return self.route.name


@dataclass
class MeshCutOff:
    """The suspension of a mesh workload (DESIGN §5: no new credential, issued ones
    revoked), and what its mTLS calls got from then on."""

    workload: str
    reason: str
    at: float  # seconds into the traffic, just before the suspension request
    revoked_at: float | None = None  # certificates with notBefore <= it are revoked
    revision: int | None = None  # the revocation revision the suspension wrote
    held_serial: str = ""  # the SVID its sidecar served when it was suspended
    cut_off: float | None = None  # seconds until its calls were refused (401 revoked)
    probes: int = 0  # presentations while waiting for the cut-off
    refusals: Counter[str] = field(default_factory=Counter)  # after the cut-off, by answer
    accepted_after: int = 0  # answers (200, 403) that authenticated it after the cut-off
    new_svid: str = ""  # an SVID its sidecar got after the suspension: a problem
    errors: list[str] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())


@dataclass
class MeshRun:
    """The mesh act: its calls, the X.509-SVID serials seen, the cut-off."""

    svid_ttl: int  # the mesh workloads' maxTokenTTL, seconds
    flows: list[MeshFlow]
    rotation_due: bool = True  # False: the run is too short for a renewal at half-life
    # workload -> serials (hex) of the client certificates the upstream saw in XFCC,
    # in the order they appeared
    seen: dict[str, list[str]] = field(default_factory=dict)
    # workload -> serials of the X.509-SVIDs its sidecar served (its credential folder)
    held: dict[str, list[str]] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)  # what the upstream saw, last
    cut: MeshCutOff | None = None
    errors: list[str] = field(default_factory=list)

    def rotations_seen(self, workload: str) -> int:
        """Certificate changes the upstream saw for ``workload``, calls going on."""
        return max(0, len(self.seen.get(workload, [])) - 1)

    def rotations_held(self, workload: str) -> int:
        """Renewals of ``workload``'s X.509-SVID by its sidecar, seen in its folder."""
        return max(0, len(self.held.get(workload, [])) - 1)

    def totals(self) -> dict[str, int]:
        return {
            "calls": sum(f.calls for f in self.flows),
            "allowed": sum(f.allowed for f in self.flows),
            "denied": sum(f.denied for f in self.flows),
            "unexpected": sum(f.unexpected for f in self.flows),
            "failed": sum(f.failed for f in self.flows),
            "cut_off": sum(f.cut_off for f in self.flows),
        }

    def problems(self, interrupted: bool) -> list[str]:
        """What went wrong in the mesh act; a run cut short must only not have failed
        a call, decided one against the policy or let the suspended workload through."""
        t = self.totals()
        problems = list(self.errors)
        if t["failed"]:
            last = next(f.last_failure for f in self.flows if f.failed)
            problems.append(f"{t['failed']} mesh calls failed (first flow's last: {last})")
        if t["unexpected"]:
            problems.append(f"{t['unexpected']} mesh answers did not match the policy")
        cut = self.cut
        if cut is not None:
            problems += cut.errors
            if cut.accepted_after:
                problems.append(
                    f"{cut.workload} was authenticated {cut.accepted_after} times after its cut-off"
                )
            if cut.new_svid:
                problems.append(cut.new_svid)
        if interrupted:
            return problems
        if not t["allowed"] or not t["denied"]:
            problems.append(
                f"expected allowed and denied mesh calls, got {t['allowed']} and {t['denied']}"
            )
        if cut is None:
            problems.append("no mesh workload was suspended")
        elif cut.cut_off is None and not cut.errors:
            problems.append(f"{cut.workload}'s mTLS calls were never refused after its suspension")
        if not self.rotation_due:
            return problems
        for caller in sorted({f.route.workload for f in self.flows if f.route.status == 200}):
            if not self.rotations_seen(caller):
                problems.append(
                    f"the upstream saw no rotation of {caller}'s client certificate "
                    f"(X.509-SVIDs of {self.svid_ttl} s, renewed at half-life)"
                )
        return problems


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
    mesh: MeshRun | None = None  # None when the mesh act did not run (mesh_skipped: why)
    mesh_skipped: str = ""
    lifecycle: LifecycleRun | None = None

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
        if self.mesh is not None:
            problems += self.mesh.problems(self.interrupted)
        if self.lifecycle is not None:
            problems += self.lifecycle.problems(self.interrupted)
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
